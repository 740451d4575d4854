"""Driver of bench/vs-llamacpp: llama.cpp through llama-cpp-python's low-level API (one
llama_decode per step over every sequence, as llama-server does with parallel slots), Enclave
through `enclave bench` (its serving engine in process), on the same file with the same threads.

Single stream, as llama-bench measures: pp = 512 prompt tokens in one batch, tg = 128 tokens
decoded one at a time (tokens/s, median of RUNS). Aggregate: N sequences of 128 random prompt
tokens submitted at once, each decoding 128 tokens greedily; output tokens / wall time.
"""

import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import time

import llama_cpp
import numpy as np

THREADS = int(os.environ.get("THREADS", "2"))
RUNS = int(os.environ.get("RUNS", "3"))
FORMATS = os.environ.get("FORMATS", "dense q8_0 gguf").split()
CONCURRENCY = [1, 4, 16]
ENCLAVE = "target/release/enclave"

# llama.cpp logs every load and context creation to stderr; keep the table readable.
_QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))


class LlamaCpp:
    def __init__(self, path, n_seq):
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            sys.exit(f"llama.cpp cannot load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = 512 + 128 + 16 if n_seq == 1 else n_seq * 272
        cparams.n_batch = 2048
        cparams.n_ubatch = 512
        cparams.n_seq_max = n_seq
        cparams.n_threads = THREADS
        cparams.n_threads_batch = THREADS
        cparams.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.batch = llama_cpp.llama_batch_init(2048, 0, max(n_seq, 1))

    def decode(self, entries):
        """entries: (token, pos, seq, want_logits); returns the logits rows wanted, in order."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if want else 0
        if llama_cpp.llama_decode(self.ctx, b) != 0:
            sys.exit("llama_decode failed")
        rows = []
        for i, (_, _, _, want) in enumerate(entries):
            if want:
                ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
                rows.append(int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax()))
        return rows

    def clear(self):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def close(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(1000, 100000) for _ in range(n)]


def llama_single(path):
    engine = LlamaCpp(path, 1)
    pp, tg = [], []
    for run in range(RUNS + 1):  # the first run warms up
        engine.clear()
        ids = prompt(512, run)
        t = time.perf_counter()
        engine.decode([(tok, i, 0, i == 511) for i, tok in enumerate(ids)])
        t_pp = time.perf_counter() - t
        tok, t = ids[-1], time.perf_counter()
        for i in range(128):
            (tok,) = engine.decode([(tok, 512 + i, 0, True)])
        t_tg = time.perf_counter() - t
        if run:
            pp.append(512 / t_pp)
            tg.append(128 / t_tg)
    engine.close()
    return statistics.median(pp), statistics.median(tg)


def llama_aggregate(path, n):
    engine = LlamaCpp(path, n)
    results = []
    for run in range(RUNS):
        engine.clear()
        prompts = [prompt(128, 1000 * run + s) for s in range(n)]
        t = time.perf_counter()
        # Prompts in batches of at most n_batch tokens, then one decode step for all sequences.
        entries = [(tok, i, s, i == 127) for s, ids in enumerate(prompts) for i, tok in enumerate(ids)]
        last = []
        for start in range(0, len(entries), 2048):
            last += engine.decode(entries[start : start + 2048])
        for step in range(127):
            last = engine.decode([(last[s], 128 + step, s, True) for s in range(n)])
        results.append(n * 128 / (time.perf_counter() - t))
    engine.close()
    return statistics.median(results)


def enclave(path, fmt, concurrency, prompt_len, output_len):
    cmd = [ENCLAVE, "bench", "--model", path, "--threads", str(THREADS), "--json",
           "--concurrency", ",".join(map(str, concurrency)), "--prompt-len", str(prompt_len),
           "--output-len", str(output_len), "--no-prefix-caching"]
    if fmt != "dense":
        cmd += ["--quantize", fmt]
    runs = []
    for _ in range(RUNS):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    return runs


def main():
    rows = []
    for path in sys.argv[1:]:
        name = os.path.basename(path)
        pp, tg = llama_single(path)
        agg = {n: llama_aggregate(path, n) for n in CONCURRENCY}
        for fmt in FORMATS:
            single = enclave(path, fmt, [1], 512, 128)
            e_pp = statistics.median(512 / r[0]["ttft_median_s"] for r in single)
            e_tg = statistics.median(1 / r[0]["itl_median_s"] for r in single)
            multi = enclave(path, fmt, CONCURRENCY, 128, 128)
            e_agg = {n: statistics.median(r[i]["output_tokens_per_s"] for r in multi) for i, n in enumerate(CONCURRENCY)}
            rows.append((name, fmt, "pp512 tok/s", pp, e_pp))
            rows.append((name, fmt, "tg128 tok/s", tg, e_tg))
            for n in CONCURRENCY:
                rows.append((name, fmt, f"{n} concurrent, output tok/s", agg[n], e_agg[n]))
    print(f"\nthreads {THREADS}, median of {RUNS} runs, llama-cpp-python {llama_cpp.__version__}\n")
    print("| model | Enclave weights | measure | llama.cpp | Enclave | Enclave / llama.cpp |")
    print("|---|---|---|---:|---:|---:|")
    for name, fmt, measure, theirs, ours in rows:
        print(f"| {name} | {fmt} | {measure} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
