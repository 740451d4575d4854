#!/usr/bin/env python3
"""Writes GGUF copies of the tiny safetensors fixtures, the way llama.cpp's
`convert_hf_to_gguf.py` lays them out, using the `gguf` package that ships with llama.cpp
(tensor names from its `TensorNameMap`, metadata keys from its `GGUFWriter`).

    python3 -m venv /tmp/gguf-env && /tmp/gguf-env/bin/pip install gguf safetensors numpy
    /tmp/gguf-env/bin/python scripts/make_gguf_fixtures.py      # writes fixtures/gguf/*.gguf

Run by hand; the files are committed, so tests need no Python.
"""

import json
import os
import sys

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "gguf")

# llama.cpp's token types.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def tokenizer_metadata(writer, model_dir, pre):
    """`tokenizer.ggml.*` as convert_hf_to_gguf.py writes a byte-level BPE ("gpt2") vocabulary."""
    tok = json.load(open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8"))
    cfg = json.load(open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8"))
    vocab = dict(tok["model"]["vocab"])
    added = {t["id"]: t for t in tok["added_tokens"]}
    for i, t in added.items():
        vocab[t["content"]] = i
    size = max(vocab.values()) + 1
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(USER_DEFINED)
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


def write_qwen2(name, qtype):
    """fixtures/models/qwen2 as a `qwen2` GGUF; matrices stored as `qtype`."""
    src = os.path.join(ROOT, "fixtures", "models", "qwen2")
    config = json.load(open(os.path.join(src, "config.json")))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    path = os.path.join(OUT, name)
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("enclave tiny qwen2 fixture")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
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


def main():
    os.makedirs(OUT, exist_ok=True)
    write_qwen2("qwen2-f32.gguf", gguf.GGMLQuantizationType.F32)
    write_qwen2("qwen2-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)


if __name__ == "__main__":
    main()
