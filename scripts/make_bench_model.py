#!/usr/bin/env python3
"""Writes a randomly initialised model folder shaped like DeepSeek-R1-Distill-Qwen-1.5B, for
benchmarks (no weights are downloaded; the numbers measure the engine, not the answers).

    python3 scripts/make_bench_model.py OUT_DIR        # needs only numpy

Weights are bfloat16 like the real checkpoint (3.5 GB), sharded at 2 GB. The tokenizer is the
real DeepSeek-V3 one from ../shared/fixtures (its ids are a subset of this vocabulary).
"""

import json
import os
import shutil
import struct
import sys

import numpy as np

CONFIG = {
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
SHARD_BYTES = 2 << 30


def tensor_shapes(c):
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
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    shards, current, size = [], [], 0
    for name, shape in tensor_shapes(CONFIG):
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
        json.dump(CONFIG, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, f, indent=2)
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures")
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(shared, "deepseek-v3-tokenizer", fname), out)
    print("wrote", out)


if __name__ == "__main__":
    main()
