#!/usr/bin/env python3
"""Writes GGUF copies of the tiny safetensors fixtures, the way llama.cpp's
`convert_hf_to_gguf.py` lays them out, using the `gguf` package that ships with llama.cpp
(tensor names from its `TensorNameMap`, metadata keys from its `GGUFWriter`; the DeepSeek
layout — stacked experts, MLA's split `attn_k_b`/`attn_v_b`, MLA stored as multi-query
attention over the latent — follows `conversion/deepseek.py` of llama.cpp as vendored by
llama-cpp-python 0.3.36).

    python3 -m venv /tmp/gguf-env && /tmp/gguf-env/bin/pip install gguf numpy
    /tmp/gguf-env/bin/python scripts/make_gguf_fixtures.py      # writes fixtures/gguf/*.gguf

Run by hand; the files are committed, so tests need no Python.
"""

import json
import os
import shutil
import struct
import sys
import tempfile

import gguf
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "gguf")

SHARED = os.path.join(ROOT, "..", "shared", "fixtures")

# llama.cpp's token types.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def load_tensors(path):
    """A safetensors file as float32 numpy arrays (numpy has no bfloat16, so BF16 is widened by
    hand: its bits are the top half of a float32's)."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = data[start:end]
        kind = meta["dtype"]
        if kind == "BF16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif kind in ("F32", "F16"):
            array = np.frombuffer(raw, dtype=np.float32 if kind == "F32" else np.float16).astype(np.float32)
        else:
            sys.exit(f"{name}: dtype {kind} not handled")
        out[name] = array.reshape(meta["shape"])
    return out


def tokenizer_metadata(writer, model_dir, pre, vocab_size=None):
    """`tokenizer.ggml.*` as convert_hf_to_gguf.py writes a byte-level BPE ("gpt2") vocabulary,
    padded to `vocab_size` with unused `[PAD{i}]` tokens as the converter does."""
    tok = json.load(open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8"))
    cfg = json.load(open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8"))
    vocab = dict(tok["model"]["vocab"])
    added = {t["id"]: t for t in tok["added_tokens"]}
    for i, t in added.items():
        vocab[t["content"]] = i
    size = max(vocab.values()) + 1
    padding = USER_DEFINED
    if vocab_size is not None:
        assert vocab_size >= size, (vocab_size, size)
        size, padding = vocab_size, UNUSED
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(padding)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(CONTROL if added[i]["special"] else USER_DEFINED)
        else:
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    def special_id(key):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if value is not None else None

    if (bos := special_id("bos_token")) is not None:
        writer.add_bos_token_id(bos)
    if (eos := special_id("eos_token")) is not None:
        writer.add_eos_token_id(eos)
    writer.add_add_bos_token(bool(cfg.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(cfg.get("add_eos_token", False)))
    template = cfg.get("chat_template")
    template_file = os.path.join(model_dir, "chat_template.jinja")
    if template is None and os.path.exists(template_file):
        template = open(template_file, encoding="utf-8").read()
    if template:
        writer.add_chat_template(template)
    return size


def qwen2_metadata(writer, config):
    """A `qwen2` file's hyperparameters from its `config.json`, as the converter writes them."""
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def write_qwen2(name, qtype):
    """fixtures/models/qwen2 as a `qwen2` GGUF; matrices stored as `qtype`."""
    src = os.path.join(ROOT, "fixtures", "models", "qwen2")
    config = json.load(open(os.path.join(src, "config.json")))
    tensors = load_tensors(os.path.join(src, "model.safetensors"))
    path = os.path.join(OUT, name)
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("enclave tiny qwen2 fixture")
    qwen2_metadata(writer, config)
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32 else gguf.LlamaFileType.MOSTLY_Q8_0
    )
    vocab = tokenizer_metadata(writer, src, "default")
    assert vocab == config["vocab_size"], (vocab, config["vocab_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    for hf_name, data in sorted(tensors.items()):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            sys.exit(f"no GGUF name for {hf_name}")
        data = data.astype(np.float32)
        # As the converter: 1-D tensors (norms, biases) stay f32; matrices take the file type.
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and data.shape[1] % 32 == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print("wrote", os.path.relpath(path, ROOT), os.path.getsize(path), "bytes")


def write_deepseek(fixture, name, qtype, tokenizer_dir, pre):
    """A DeepSeek-V2/V3 fixture as a `deepseek2` GGUF: the converter's metadata (MLA as
    multi-query attention over the latent, per-head sizes under `*_length_mla`, YaRN's
    `mscale_all_dim` as 0.1 × the log multiplier), experts stacked per layer, `kv_b_proj` split
    into `attn_k_b` (transposed) and `attn_v_b`, multi-token-prediction layers dropped.
    Matrices take `qtype` where their rows fit its blocks and fall back to F16 otherwise, as the
    converter does; the router and 1-D tensors stay F32."""
    src = os.path.join(ROOT, "fixtures", "models", fixture)
    config = json.load(open(os.path.join(src, "config.json")))
    tensors = load_tensors(os.path.join(src, "model.safetensors"))
    path = os.path.join(OUT, name)
    layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(path, "deepseek2")
    writer.add_name(f"enclave tiny {fixture} fixture")
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_group_count(config["n_group"])
    writer.add_expert_group_used_count(config["topk_group"])
    sigmoid = config["scoring_func"] == "sigmoid"
    writer.add_expert_gating_func(
        gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX
    )
    file_type = {
        gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
        gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
        gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype]
    writer.add_file_type(file_type)
    rope = config["rope_scaling"]
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    writer.add_leading_dense_block_count(config["first_k_dense_replace"])
    writer.add_vocab_size(config["vocab_size"])
    if config.get("q_lora_rank") is not None:
        writer.add_q_lora_rank(config["q_lora_rank"])
    rank, nope, rot, v = (config[k] for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    writer.add_kv_lora_rank(rank)
    writer.add_key_length(rank + rot)
    writer.add_value_length(rank)
    writer.add_key_length_mla(nope + rot)
    writer.add_value_length_mla(v)
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_shared_count(config["n_shared_experts"])
    writer.add_expert_weights_scale(config["routed_scaling_factor"])
    if config.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(rot)
    writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    tokenizer_metadata(writer, tokenizer_dir, pre, config["vocab_size"])

    heads = config["num_attention_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, layers)
    out = {}
    experts = {}
    for hf_name, data in tensors.items():
        parts = hf_name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= layers:
            continue  # multi-token prediction
        if config.get("tie_word_embeddings") and hf_name == "lm_head.weight":
            continue
        if ".mlp.experts." in hf_name:
            experts[hf_name] = data
            continue
        if hf_name.endswith("e_score_correction_bias"):
            out[f"blk.{parts[2]}.exp_probs_b.bias"] = data
            continue
        if hf_name.endswith("kv_b_proj.weight"):
            kv_b = data.reshape(heads, nope + v, rank)
            out[f"blk.{parts[2]}.attn_k_b.weight"] = np.ascontiguousarray(kv_b[:, :nope, :].transpose(0, 2, 1))
            out[f"blk.{parts[2]}.attn_v_b.weight"] = np.ascontiguousarray(kv_b[:, nope:, :])
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            sys.exit(f"no GGUF name for {hf_name}")
        out[gguf_name] = data
    for layer in range(config["first_k_dense_replace"], layers):
        for which in ("gate", "up", "down"):
            stack = [experts.pop(f"model.layers.{layer}.mlp.experts.{i}.{which}_proj.weight") for i in range(config["n_routed_experts"])]
            out[f"blk.{layer}.ffn_{which}_exps.weight"] = np.stack(stack)
    assert not experts, sorted(experts)[:3]

    for gguf_name, data in sorted(out.items()):
        data = np.ascontiguousarray(data, dtype=np.float32)
        kind = qtype
        if data.ndim == 1 or ".ffn_gate_inp." in gguf_name:
            kind = gguf.GGMLQuantizationType.F32
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 != 0:
            kind = gguf.GGMLQuantizationType.F16
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print("wrote", os.path.relpath(path, ROOT), os.path.getsize(path), "bytes")


def main():
    os.makedirs(OUT, exist_ok=True)
    write_qwen2("qwen2-f32.gguf", gguf.GGMLQuantizationType.F32)
    write_qwen2("qwen2-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)
    lite = os.path.join(ROOT, "fixtures", "models", "deepseek-v2-lite")
    write_deepseek("deepseek-v2-lite", "deepseek-v2-lite-f32.gguf", gguf.GGMLQuantizationType.F32, lite, "default")
    write_deepseek("deepseek-v2-lite", "deepseek-v2-lite-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0, lite, "default")
    # The V3 fixture uses the real DeepSeek-V3 vocabulary with DeepSeek-R1's tokenizer_config.
    with tempfile.TemporaryDirectory() as real:
        shutil.copy(os.path.join(SHARED, "deepseek-v3-tokenizer", "tokenizer.json"), real)
        shutil.copy(os.path.join(SHARED, "deepseek-r1", "tokenizer_config.json"), real)
        write_deepseek("deepseek-v3", "deepseek-v3-bf16.gguf", gguf.GGMLQuantizationType.BF16, real, "deepseek-v3")
        write_deepseek("deepseek-v3", "deepseek-v3-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0, real, "deepseek-v3")


if __name__ == "__main__":
    main()
