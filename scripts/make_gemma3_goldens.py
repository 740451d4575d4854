#!/usr/bin/env python3
"""Goldens for the Gemma 3 270M GGUF, from llama.cpp (through llama-cpp-python) and from
Hugging Face `transformers` (which dequantises the same file and runs its reference code).

Run once by a developer after `scripts/fetch-demo-model` (CI only reads the results):

    python3 -m venv /tmp/llama && /tmp/llama/bin/pip install llama-cpp-python numpy
    /tmp/llama/bin/python scripts/make_gemma3_goldens.py llama-cpp
    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install "transformers>=4.50,<5" torch gguf accelerate
    /tmp/fx/bin/python scripts/make_gemma3_goldens.py transformers

`llama-cpp` writes fixtures/gguf/gemma3-270m-llamacpp.json:
  tokenize   texts and the ids llama.cpp gives them (BOS added, special tokens parsed, as its
             completion endpoint does)
  greedy     for prompts in English, Chinese and code: 32 greedy tokens, and at every step
             llama.cpp's own margin between its top two logits (nats), so a test knows from which
             step rounding may legitimately flip the choice

`transformers` writes fixtures/gguf/gemma3-270m-transformers.json: the same prompts' ids, 32
greedy tokens with the top-two margin at each step, and the log-probability of each chosen token,
all in float32 on the dequantised weights; and fixtures/chat-template/gemma.json: Gemma's chat
template (crates/enclave-engine/src/templates/gemma.jinja, used for Gemma GGUF files that carry
none) rendered by `apply_chat_template`.
"""

import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "gemma-3-270m-q4_k_m.gguf")
OUT = os.path.join(ROOT, "fixtures", "gguf", "gemma3-270m-llamacpp.json")
OUT_TRANSFORMERS = os.path.join(ROOT, "fixtures", "gguf", "gemma3-270m-transformers.json")

TOKENIZE = [
    "Hello world",
    " Hello  world   with   spaces ",
    "Line one\nLine two\n\n\nLine five\ttabbed",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！深度求索的模型在本地运行。",
    "日本語のテキストも少し含めます。",
    "Emoji: 😀🎉🚀 and accents: café, naïve, Zürich.",
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}",
    "Numbers: 1234567890, 3.14159, 2026-11-30, 42.",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "Ünïcödé ᚠᛇᚻ ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width",
    "   leading spaces and trailing   ",
    "",
]

GREEDY = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "中国的首都是",
    "人工智能的发展",
    "def fibonacci(n):\n",
    "<start_of_turn>user\nWrite one sentence about the sea.<end_of_turn>\n<start_of_turn>model\n",
]
STEPS = 32


def sha256_of_model():
    with open(MODEL, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def llama_cpp_goldens():
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(MODEL, n_ctx=512, n_threads=2, n_batch=512, seed=0, logits_all=True, verbose=False)
    sha256 = sha256_of_model()
    tokenize = [
        {"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)}
        for t in TOKENIZE
    ]
    greedy = []
    for prompt in GREEDY:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        tokens, margins = [], []
        for _ in range(STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            top = np.argsort(logits)[::-1][:2]
            tokens.append(int(top[0]))
            margins.append(float(logits[top[0]] - logits[top[1]]))
            llm.eval([int(top[0])])
        greedy.append(
            {
                "prompt": prompt,
                "ids": ids,
                "greedy": tokens,
                "top2_margins": margins,
                "text": llm.detokenize(tokens).decode("utf-8", errors="replace"),
            }
        )
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(
            {
                "llama_cpp_python": llama_cpp.__version__,
                "model_sha256": sha256,
                "tokenize": tokenize,
                "greedy": greedy,
            },
            f,
            indent=1,
            ensure_ascii=False,
        )
        f.write("\n")
    print("wrote", OUT)


def transformers_goldens():
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    with open(OUT, encoding="utf-8") as f:
        prompts = [(g["prompt"], g["ids"]) for g in json.load(f)["greedy"]]
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(MODEL),
        gguf_file=os.path.basename(MODEL),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    greedy = []
    with torch.no_grad():
        for prompt, ids in prompts:
            seq = list(ids)
            tokens, margins, logprobs = [], [], []
            for _ in range(STEPS):
                # Full recomputation: the reference forward, no cache.
                logits = model(torch.tensor([seq])).logits[0, -1].double()
                top = torch.topk(logits, 2)
                tokens.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                logprobs.append(float(torch.log_softmax(logits, -1)[top.indices[0]]))
                seq.append(tokens[-1])
            greedy.append(
                {"prompt": prompt, "ids": ids, "greedy": tokens, "top2_margins": margins, "logprobs": logprobs}
            )
    with open(OUT_TRANSFORMERS, "w", encoding="utf-8") as f:
        json.dump(
            {"transformers": transformers.__version__, "model_sha256": sha256_of_model(), "greedy": greedy},
            f,
            indent=1,
            ensure_ascii=False,
        )
        f.write("\n")
    print("wrote", OUT_TRANSFORMERS)
    chat_template_goldens()


GEMMA_CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Why is the sky blue?"}],
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "user_only_chinese": [{"role": "user", "content": "你好，请介绍一下你自己。"}],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "  Another one?\n"},
    ],
    "content_parts": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": [{"type": "text", "text": " Hello "}, {"type": "text", "text": "there"}]},
    ],
}


def chat_template_goldens():
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(ROOT, "crates", "enclave-engine", "src", "templates", "gemma.jinja"), encoding="utf-8") as f:
        template = f.read()
    tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(ROOT, "fixtures", "tiny-tokenizer", "tokenizer.json"), bos_token="<bos>"
    )
    cases = []
    for name, messages in GEMMA_CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            text = tok.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            cases.append(
                {"conversation": name, "messages": messages, "add_generation_prompt": add_generation_prompt, "text": text}
            )
    out = os.path.join(ROOT, "fixtures", "chat-template", "gemma.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", out)


if __name__ == "__main__":
    if sys.argv[1:] == ["llama-cpp"]:
        llama_cpp_goldens()
    elif sys.argv[1:] == ["transformers"]:
        transformers_goldens()
    elif sys.argv[1:] == ["chat-template"]:
        chat_template_goldens()
    else:
        sys.exit("usage: make_gemma3_goldens.py llama-cpp|transformers|chat-template")
