#!/usr/bin/env python3
"""How far llama.cpp's arithmetic sits from the exact arithmetic on the Gemma 3 270M Q4_K_M file.

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install "transformers>=4.50,<5" torch gguf \
        accelerate "llama-cpp-python==0.3.36"
    /tmp/fx/bin/python scripts/compare_gemma3_numerics.py

For each golden prompt followed by llama.cpp's greedy continuation
(fixtures/gguf/gemma3-270m-llamacpp.json), compares log-probabilities of the next token at every
position from: `transformers` on the dequantised file (float32, the reference); llama.cpp on the
file as is (its defaults: 8-bit activations in the products, f16 KV cache); and llama.cpp on the
same weights dequantised to an F32 GGUF (no activation quantization, f32 KV cache). Prints the
mean and largest |Δ log p| of the reference's argmax token, and the largest |Δ logit|.
"""

import json
import os
import tempfile

import gguf
import llama_cpp
import numpy as np
import torch
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "gemma-3-270m-q4_k_m.gguf")
GOLDENS = os.path.join(ROOT, "fixtures", "gguf", "gemma3-270m-llamacpp.json")


def write_f32_copy(path):
    reader = gguf.GGUFReader(MODEL)
    writer = gguf.GGUFWriter(path, arch="gemma3")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[1])
        else:
            writer.add_key_value(key, field.contents(), kind)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape(list(reversed([int(x) for x in t.shape]))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_logits(path, seq, **kwargs):
    llm = llama_cpp.Llama(path, n_ctx=512, n_threads=2, logits_all=True, verbose=False, **kwargs)
    llm.eval(seq)
    out = np.array(llm.scores[: len(seq)], dtype=np.float64)
    del llm
    return out


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main():
    with open(GOLDENS, encoding="utf-8") as f:
        cases = json.load(f)["greedy"]
    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(MODEL), gguf_file=os.path.basename(MODEL), dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        f32_path = os.path.join(tmp, "gemma-f32.gguf")
        write_f32_copy(f32_path)
        rows = {"llama.cpp defaults, Q4_K_M file": [], "llama.cpp, F32 copy, f32 KV": []}
        for case in cases:
            seq = case["ids"] + case["greedy"][:-1]
            with torch.no_grad():
                ref = reference(torch.tensor([seq])).logits[0].double().numpy()
            ref_lp = log_softmax(ref)
            top = ref.argmax(-1)
            for label, logits in (
                ("llama.cpp defaults, Q4_K_M file", llama_logits(MODEL, seq)),
                ("llama.cpp, F32 copy, f32 KV", llama_logits(f32_path, seq, flash_attn=False, type_k=0, type_v=0)),
            ):
                lp = log_softmax(logits)
                delta = np.abs(np.take_along_axis(lp - ref_lp, top[:, None], 1)[:, 0])
                rows[label].append((delta, np.abs(logits - ref).max()))
    print("| compared with transformers (f32, dequantised file) | mean abs d log p | max abs d log p | max abs d logit |")
    print("|---|---:|---:|---:|")
    for label, results in rows.items():
        deltas = np.concatenate([d for d, _ in results])
        print(f"| {label} | {deltas.mean():.4f} | {deltas.max():.4f} | {max(m for _, m in results):.3f} |")


if __name__ == "__main__":
    main()
