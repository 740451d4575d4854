#!/usr/bin/env python3
"""Writes random-weight GGUF files shaped like DeepSeek-R1-Distill-Qwen-1.5B (`qwen2`, 28
layers, 151936-token vocabulary), for the race with llama.cpp: an F16 file written directly
with the `gguf` package (numpy only), then Q8_0 and Q4_K_M made from it by llama.cpp's own
quantizer (`llama_model_quantize`, as `llama-quantize` does).

    python scripts/make_bench_gguf.py OUT_DIR      # needs gguf, numpy, llama-cpp-python

Writes OUT_DIR/qwen-1.5b-shape-{f16,q8_0,q4_k_m}.gguf (3.6, 1.9 and 1.1 GB); existing files
are kept. The vocabulary is DeepSeek-V3's (../shared/fixtures) padded with unused tokens to
151936: benchmarks feed token ids, so only the size matters.
"""

import os
import sys

import gguf
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHARED = os.path.join(ROOT, "..", "shared", "fixtures")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_bench_model import QWEN_1_5B, tensor_shapes  # noqa: E402
from make_gguf_fixtures import qwen2_metadata, tokenizer_metadata  # noqa: E402


def write_f16(path):
    c = QWEN_1_5B
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("random weights shaped like DeepSeek-R1-Distill-Qwen-1.5B")
    qwen2_metadata(writer, c)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokenizer_metadata(writer, os.path.join(SHARED, "deepseek-v3-tokenizer"), "deepseek-v3", c["vocab_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c["num_hidden_layers"])
    rng = np.random.default_rng(0)
    for hf_name, shape in tensor_shapes(c):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if hf_name.endswith("norm.weight"):
            data = np.ones(shape, dtype=np.float32)
        else:
            data = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        # As the converter: 1-D tensors stay F32, matrices take the file type.
        writer.add_tensor(name, data if data.ndim == 1 else data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def quantize(source, path, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 2
    if llama_cpp.llama_model_quantize(source.encode(), path.encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {source}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    f16 = os.path.join(out, "qwen-1.5b-shape-f16.gguf")
    if not os.path.exists(f16):
        write_f16(f16 + ".part")
        os.rename(f16 + ".part", f16)
    for suffix, ftype in [("q8_0", 7), ("q4_k_m", 15)]:  # LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_K_M
        path = os.path.join(out, f"qwen-1.5b-shape-{suffix}.gguf")
        if not os.path.exists(path):
            quantize(f16, path + ".part", ftype)
            os.rename(path + ".part", path)
        print("ready", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
