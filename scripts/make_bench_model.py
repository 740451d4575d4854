#!/usr/bin/env python3
"""Writes a randomly initialised model folder shaped like a real DeepSeek model, for benchmarks
(no weights are downloaded; the numbers measure the engine, not the answers).

    python3 scripts/make_bench_model.py OUT_DIR [SHAPE]      # needs only numpy

SHAPE is one of:
  r1-distill-qwen-1.5b   (default) DeepSeek-R1-Distill-Qwen-1.5B: Qwen2, 28 layers (3.5 GB)
  v2-lite-4l             DeepSeek-V2-Lite at its real widths (MLA, 64 experts, 6 routed + 2
                         shared per token, YaRN) but 4 of its 27 layers: 1 dense + 3 MoE (4.4 GB)

Weights are bfloat16 like the real checkpoints, sharded at 2 GB. The tokenizer is the real
DeepSeek-V3 one from ../shared/fixtures (benchmarks feed prompt ids; it only decodes output).
"""

import json
import os
import shutil
import struct
import sys

import numpy as np

QWEN_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
}
V2_LITE_4L = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "vocab_size": 102400,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
}
SHAPES = {"r1-distill-qwen-1.5b": QWEN_1_5B, "v2-lite-4l": V2_LITE_4L}
SHARD_BYTES = 2 << 30


def tensor_shapes(c):
    if c["model_type"] == "deepseek_v2":
        yield from deepseek_tensor_shapes(c)
        return
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, shape in [("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h))]:
            yield p + f"self_attn.{name}.weight", shape
            yield p + f"self_attn.{name}.bias", shape[:1]
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def deepseek_tensor_shapes(c):
    h, v, heads = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
    nope, rope, vd, rank = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (heads * (nope + rope), h)
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (rank + rope, h)
        yield p + "self_attn.kv_a_layernorm.weight", (rank,)
        yield p + "self_attn.kv_b_proj.weight", (heads * (nope + vd), rank)
        yield p + "self_attn.o_proj.weight", (h, heads * vd)
        mlps = []
        if layer < c["first_k_dense_replace"]:
            mlps.append(("mlp.", c["intermediate_size"]))
        else:
            yield p + "mlp.gate.weight", (c["n_routed_experts"], h)
            mlps += [(f"mlp.experts.{e}.", c["moe_intermediate_size"]) for e in range(c["n_routed_experts"])]
            mlps.append(("mlp.shared_experts.", c["moe_intermediate_size"] * c["n_shared_experts"]))
        for prefix, i in mlps:
            yield p + prefix + "gate_proj.weight", (i, h)
            yield p + prefix + "up_proj.weight", (i, h)
            yield p + prefix + "down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def bf16_random(rng, shape, name):
    n = int(np.prod(shape))
    if name.endswith("norm.weight"):
        values = np.ones(n, dtype=np.float32)
    else:
        values = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_shard(path, tensors, rng):
    header, offset = {}, 0
    for name, shape in tensors:
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            f.write(bf16_random(rng, shape, name))


def main():
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in SHAPES):
        sys.exit(__doc__)
    out = sys.argv[1]
    config = SHAPES[sys.argv[2] if len(sys.argv) == 3 else "r1-distill-qwen-1.5b"]
    os.makedirs(out, exist_ok=True)
    shards, current, size = [], [], 0
    for name, shape in tensor_shapes(config):
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(out, fname), tensors, rng)
        weight_map.update({name: fname for name, _ in tensors})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, f, indent=2)
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures")
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(shared, "deepseek-v3-tokenizer", fname), out)
    print("wrote", out)


if __name__ == "__main__":
    main()
