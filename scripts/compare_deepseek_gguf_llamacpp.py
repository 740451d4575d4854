#!/usr/bin/env python3
"""llama.cpp reads our DeepSeek-V3 fixture GGUF as `transformers` reads the safetensors.

Checks the `deepseek2` layout of scripts/make_gguf_fixtures.py against llama.cpp itself (not
only against our reader): llama.cpp's logits on fixtures/gguf/deepseek-v3-bf16.gguf next to
`transformers`' on fixtures/models/deepseek-v3 (with `mscale` = `mscale_all_dim`, the one YaRN
scale GGUF stores). Two environments, as elsewhere:

    /work/pyenv-llama/bin/python scripts/compare_deepseek_gguf_llamacpp.py llama-cpp   # llama-cpp-python
    /tmp/fx/bin/python scripts/compare_deepseek_gguf_llamacpp.py transformers          # torch + transformers
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LOGITS = os.path.join(tempfile.gettempdir(), "deepseek-v3-llamacpp-logits.npy")
# "你好，世界！ Numbers: 1234567890." with BOS, from the fixture's goldens.
IDS = [0, 30594, 303, 3427, 1175, 16639, 28, 223, 6895, 18009, 25744, 18, 16]


def llama_cpp_logits():
    import llama_cpp

    model = llama_cpp.Llama(
        os.path.join(ROOT, "fixtures", "gguf", "deepseek-v3-bf16.gguf"),
        n_ctx=64, logits_all=True, verbose=False, n_threads=2,
        type_k=0, type_v=0,  # f32 cache
    )
    model.eval(IDS)
    np.save(LOGITS, np.array(model.scores[: len(IDS)]))
    print("wrote", LOGITS)


def transformers_logits():
    import torch
    from transformers import AutoModelForCausalLM

    src = os.path.join(ROOT, "fixtures", "models", "deepseek-v3")
    with tempfile.TemporaryDirectory() as d:
        for f in ["model.safetensors", "generation_config.json"]:
            shutil.copy(os.path.join(src, f), d)
        config = json.load(open(os.path.join(src, "config.json")))
        config["rope_scaling"]["mscale"] = config["rope_scaling"]["mscale_all_dim"]
        json.dump(config, open(os.path.join(d, "config.json"), "w"))
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            ours = model(torch.tensor([IDS])).logits[0].numpy()
    theirs = np.load(LOGITS)
    delta = np.abs(ours - theirs)
    same = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    print(f"llama.cpp vs transformers: max |Δlogit| {delta.max():.4f}, mean {delta.mean():.5f}, "
          f"argmax equal at {same:.0%} of {len(IDS)} positions")


if __name__ == "__main__":
    {"llama-cpp": llama_cpp_logits, "transformers": transformers_logits}[sys.argv[1]]()
