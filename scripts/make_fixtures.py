#!/usr/bin/env python3
"""Builds Enclave's committed test fixtures with the reference implementation.

Run once by a developer (CI never runs it and never needs torch):

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install "transformers>=4.50,<5" torch safetensors
    /tmp/fx/bin/python scripts/make_fixtures.py            # everything
    /tmp/fx/bin/python scripts/make_fixtures.py gemma3     # only models/gemma3

It writes, under fixtures/:
  tiny-tokenizer/                 a small byte-level BPE tokenizer (trained here) with the
                                  DeepSeek-R1 chat template, shared by the tiny models
  models/<name>/                  tiny random-weight models saved by `transformers`
                                  (config.json, generation_config.json, safetensors, tokenizer)
  models/<name>/goldens.json      prompts and greedy continuations from `transformers` (f32)
  models/<name>/goldens.safetensors  logits at every position of every prompt (f32)
  models/gemma3/                  a tiny Gemma 3 text model (sliding-window and global layers,
                                  QK-norm, extra norms, GeGLU, scaled embedding), see make_gemma3
  models/deepseek-*/              tiny DeepseekV2/V3 models (MLA, MoE, YaRN; one FP8 checkpoint), see
                                  make_deepseek_models
  tokenizer/deepseek-v3.json      encode/decode goldens for the real DeepSeek-V3 tokenizer
  chat-template/deepseek.json     apply_chat_template goldens for the V3 and R1 templates

transformers 4.x is required: it is what DeepSeek, vLLM and SGLang users run, and it prepends BOS
for the DeepSeek-V3 tokenizer as `add_bos_token: true` says (5.x does not).
"""

import copy
import json
import math
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")

assert transformers.__version__.startswith("4."), "use transformers 4.x (see the docstring)"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
SPECIALS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
TINY_VOCAB = 512

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Enclave runs DeepSeek models inside the organisation's own network.",
    "Banks, hospitals and public offices keep their prompts on their own machines.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Numbers: 1234567890, 3.14159, 2026-11-23, 42.",
    "你好，世界！深度求索的模型在本地运行。",
    "日本語のテキストも少し含めます。",
    "Emoji: 😀🎉🚀 and accents: café, naïve, Zürich.",
    "Hello, how are you today? I am fine, thank you very much.",
    "Please think step by step and then give the final answer.",
] * 20


def train_tiny_tokenizer(out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    with open(os.path.join(SHARED, "deepseek-r1", "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()
    fast = LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=EOS,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = template
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def randomize_(model, std):
    """Random weights with a wide spread, so logits have clear margins and every parameter
    (norm weights and biases included) matters to the output."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def greedy(model, ids, n):
    """Greedy continuation by full recomputation: the reference forward, no cache tricks."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(torch.argmax(logits)))
    return out[len(ids):]


def save_model(name, model, tokenizer, prompts, sources, shard=False):
    out = os.path.join(FIXTURES, "models", name)
    shutil.rmtree(out, ignore_errors=True)
    set_generation_config(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="150KB" if shard else "1GB")
    tokenizer.save_pretrained(out)
    write_goldens(out, model, prompts, sources)


def set_generation_config(model, tokenizer):
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.95


def self_consistency(model, ids):
    """Max |Δlogit| between the reference's full forward and its own cached incremental
    forward: how well conditioned the random model is. Goldens are only useful for a 1e-4
    tolerance when the reference agrees with itself far below that."""
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
        out = model(torch.tensor([ids[:2]]), use_cache=True)
        rows, past = [out.logits[0]], out.past_key_values
        for t in ids[2:]:
            out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            rows.append(out.logits[0])
            past = out.past_key_values
    return float((torch.cat(rows) - full).abs().max())


def write_goldens(out, model, prompts, sources, column_stride=1, greedy_tokens=32):
    """goldens.json (prompts, greedy continuations) and goldens.safetensors (f32 logits at every
    position; with `column_stride` > 1 only every that-many-th vocabulary column, to keep
    fixtures with a 129280-token vocabulary small: the greedy continuations still check the
    argmax over the whole vocabulary at every generated position)."""
    goldens = {"transformers": transformers.__version__, "column_stride": column_stride, "prompts": []}
    logits = {}
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            full = model(torch.tensor([ids])).logits[0].float()
            logits[f"logits.{i}"] = full[:, ::column_stride].contiguous()
            top2 = torch.topk(full, 2, dim=-1).values
            drift = self_consistency(model, ids)
            assert drift < 3e-5, f"{out}: prompt {i} is ill-conditioned (reference drift {drift})"
            goldens["prompts"].append(
                {
                    **sources[i],
                    "ids": ids,
                    "greedy": greedy(model, ids, greedy_tokens),
                    "min_top1_margin": float((top2[:, 0] - top2[:, 1]).min()),
                    "reference_drift": drift,
                }
            )
    save_file(logits, os.path.join(out, "goldens.safetensors"))
    with open(os.path.join(out, "goldens.json"), "w", encoding="utf-8") as f:
        json.dump(goldens, f, indent=1, ensure_ascii=False)
        f.write("\n")


def make_models(tokenizer):
    texts = [
        "The quick brown fox",
        "def add(a, b):\n    return a + b",
        "你好，世界！ Numbers: 1234567890.",
        "Hello, how are you today? I am fine, thank you very much. Please think step by step.",
    ]
    prompts = [tokenizer.encode(t) for t in texts]
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    prompts.append(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    sources = [{"text": t} for t in texts] + [{"chat": chat}]
    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            tie_word_embeddings=False,
            **common,
        )
    ).eval()
    randomize_(llama, 0.15)
    save_model("llama-llama3-rope", llama, tokenizer, prompts, sources, shard=True)

    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            use_sliding_window=False,
            **common,
        )
    ).eval()
    randomize_(qwen, 0.15)
    save_model("qwen2", qwen, tokenizer, prompts, sources)

    qwen_tied = Qwen2ForCausalLM(
        Qwen2Config(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            **common,
        )
    ).eval()
    randomize_(qwen_tied, 0.15)
    qwen_tied.tie_weights()
    save_model("qwen2-tied", qwen_tied, tokenizer, prompts, sources)


def make_gemma3(tokenizer):
    """Gemma 3 with every feature visible in a short prompt: a 6-layer stack (layer 5 global),
    a window of 5 so the tiny prompts run past it, head_dim unlike hidden/heads, a query scalar
    unlike head_dim, and linear rope scaling on the global layer only."""
    texts = [
        "The quick brown fox",
        "def add(a, b):\n    return a + b",
        "你好，世界！ Numbers: 1234567890.",
        "Hello, how are you today? I am fine, thank you very much. Please think step by step.",
    ]
    prompts = [tokenizer.encode(t) for t in texts]
    sources = [{"text": t} for t in texts]
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        query_pre_attn_scalar=20,
        max_position_embeddings=512,
        sliding_window=5,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        attn_implementation="eager",
        torch_dtype="float32",
    )
    model = Gemma3ForCausalLM(config).eval()
    randomize_(model, 0.15)
    with torch.no_grad():
        # Gemma norms scale by 1 + w: keep the stored w near 0 so scales stay near 1 and the
        # random model is well conditioned.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(1.0)
    model.tie_weights()
    assert [t for t in model.config.layer_types] == ["sliding_attention"] * 5 + ["full_attention"]
    save_model("gemma3", model, tokenizer, prompts, sources)


def yarn_mscale(factor, mscale):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def deepseek_common(tokenizer):
    return dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_bias=False,
        torch_dtype="float32",
    )


def randomize_router_bias_(model, gen):
    """`e_score_correction_bias` is a buffer (zeros at init); make it non-zero so the biased
    choice and the unbiased weights really differ. Kept positive: transformers masks the experts
    of dropped groups with 0.0 where DeepSeek's inference code (and Enclave) use -inf, which
    only differ when a kept expert's biased score is negative; positive sigmoid scores plus a
    positive bias never are, so the goldens hold for both."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.rand(b.shape, generator=gen))


def fix_v2_softmax_scale_(model, config):
    """transformers 4.57's native DeepseekV2Attention leaves out the YaRN `mscale_all_dim`
    factor on the softmax scale that DeepSeek's reference code (modeling_deepseek.py of
    DeepSeek-V2/V2-Lite), vLLM and transformers' own DeepseekV3Attention apply; restore it so the
    goldens follow the reference semantics."""
    rs = config.rope_scaling
    m = yarn_mscale(rs["factor"], rs.get("mscale_all_dim", 0)) if rs.get("mscale_all_dim") else 1.0
    for layer in model.model.layers:
        assert abs(layer.self_attn.scaling - layer.self_attn.qk_head_dim ** -0.5) < 1e-12
        layer.self_attn.scaling *= m * m


def r1_tokenizer(workdir):
    """The real DeepSeek-V3 vocabulary with DeepSeek-R1's tokenizer_config (chat template)."""
    shutil.copy(os.path.join(SHARED, "deepseek-v3-tokenizer", "tokenizer.json"), workdir)
    shutil.copy(os.path.join(SHARED, "deepseek-r1", "tokenizer_config.json"), workdir)
    return AutoTokenizer.from_pretrained(workdir)


def fp8_quantize(w, block=128):
    """DeepSeek-V3's block FP8: one float32 `weight_scale_inv` per 128x128 block (edge blocks
    partial, scale grid ceil-divided), scale = amax / 448, stored e4m3fn = w / scale."""
    out_f, in_f = w.shape
    rows, cols = math.ceil(out_f / block), math.ceil(in_f / block)
    scale = torch.empty(rows, cols, dtype=torch.float32)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    deq = torch.empty(out_f, in_f, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            blk = w[r * block:(r + 1) * block, c * block:(c + 1) * block].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[r, c] = s
            qb = (blk / s).to(torch.float8_e4m3fn)
            q[r * block:(r + 1) * block, c * block:(c + 1) * block] = qb
            deq[r * block:(r + 1) * block, c * block:(c + 1) * block] = qb.float() * s
    return q, scale, deq


def is_fp8_weight(name, p):
    """The matrices DeepSeek-V3 ships in FP8: every projection of attention and MLP/experts;
    not the embedding, the head or the router."""
    return (
        p.dim() == 2
        and name.startswith("model.layers.")
        and not name.endswith("mlp.gate.weight")
    )


def make_deepseek_models(tiny_tokenizer):
    texts = [
        "The quick brown fox",
        "def add(a, b):\n    return a + b",
        "你好，世界！ Numbers: 1234567890.",
        "Hello, how are you today? I am fine, thank you very much. Please think step by step.",
    ]
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    gen = torch.Generator().manual_seed(99)

    # DeepSeek-V2-Lite-like: no q LoRA, softmax greedy routing, 2 shared experts, first layer
    # dense, YaRN with V2-Lite's mscale values.
    prompts = [tiny_tokenizer.encode(t) for t in texts]
    prompts.append(tiny_tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    sources = [{"text": t} for t in texts] + [{"chat": chat}]
    v2_config = DeepseekV2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        topk_method="greedy",
        scoring_func="softmax",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        tie_word_embeddings=False,
        **deepseek_common(tiny_tokenizer),
    )
    torch.manual_seed(0)
    v2 = DeepseekV2ForCausalLM(v2_config).eval()
    randomize_(v2, 0.15)
    fix_v2_softmax_scale_(v2, v2_config)
    save_model("deepseek-v2-lite", v2, tiny_tokenizer, prompts, sources)

    # DeepSeek-V3-like with the real vocabulary (129280): q LoRA, sigmoid noaux_tc grouped
    # routing with a non-zero correction bias, a shared expert, first layer dense, YaRN with
    # mscale != mscale_all_dim. Stored in bf16 (as V3's non-FP8 tensors are); the goldens come
    # from the same bf16 values in f32. Tied embeddings keep the fixture at a few MB.
    with tempfile.TemporaryDirectory() as workdir:
        real = r1_tokenizer(workdir)
        v3_texts = texts[:3]
        v3_chat = [{"role": "user", "content": "你好"}]
        prompts = [real.encode(t) for t in v3_texts]
        prompts.append(real.apply_chat_template(v3_chat, add_generation_prompt=True))
        sources = [{"text": t} for t in v3_texts] + [{"chat": v3_chat}]
        v3_config = DeepseekV3Config(
            vocab_size=129280,
            hidden_size=16,
            intermediate_size=40,
            moe_intermediate_size=12,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            num_nextn_predict_layers=1,
            max_position_embeddings=256,
            rope_theta=10000.0,
            rope_scaling={
                "type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 0.707,
            },
            tie_word_embeddings=True,
            **deepseek_common(real),
        )
        torch.manual_seed(0)
        v3 = DeepseekV3ForCausalLM(v3_config).eval()
        randomize_(v3, 0.2)
        randomize_router_bias_(v3, gen)
        v3.tie_weights()
        with torch.no_grad():
            for p in list(v3.parameters()) + list(v3.buffers()):
                p.copy_(p.to(torch.bfloat16).float())
        out = os.path.join(FIXTURES, "models", "deepseek-v3")
        shutil.rmtree(out, ignore_errors=True)
        set_generation_config(v3, real)
        stored = copy.deepcopy(v3).to(torch.bfloat16)
        stored.config.torch_dtype = "bfloat16"
        stored.save_pretrained(out, safe_serialization=True)
        write_goldens(out, v3, prompts, sources, column_stride=16, greedy_tokens=24)

    # An FP8 checkpoint laid out as DeepSeek-V3's: e4m3 projections with float32
    # `weight_scale_inv` per 128x128 block; sides of 136 and 200 give partial edge blocks. Also
    # carries tensors of one MTP layer (num_nextn_predict_layers), which loaders must skip.
    prompts = [tiny_tokenizer.encode(t) for t in texts[:2]]
    sources = [{"text": t} for t in texts[:2]]
    fp8_config = DeepseekV3Config(
        vocab_size=TINY_VOCAB,
        hidden_size=136,
        intermediate_size=200,
        moe_intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=72,
        kv_lora_rank=40,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        **deepseek_common(tiny_tokenizer),
    )
    torch.manual_seed(0)
    fp8 = DeepseekV3ForCausalLM(fp8_config).eval()
    randomize_(fp8, 0.1)
    randomize_router_bias_(fp8, gen)
    tensors = {}
    with torch.no_grad():
        for name, p in fp8.named_parameters():
            if is_fp8_weight(name, p):
                q, scale, deq = fp8_quantize(p.data)
                p.copy_(deq)
                tensors[name] = q
                tensors[name.replace(".weight", ".weight_scale_inv")] = scale
            else:
                p.copy_(p.to(torch.bfloat16).float())
                tensors[name] = p.to(torch.bfloat16).contiguous()
        for name, b in fp8.named_buffers():
            if name.endswith("e_score_correction_bias"):
                tensors[name] = b.float().contiguous()
        mtp = f"model.layers.{fp8_config.num_hidden_layers}"
        q, scale, _ = fp8_quantize(torch.randn(136, 272, generator=gen) * 0.1)
        tensors[f"{mtp}.eh_proj.weight"] = q
        tensors[f"{mtp}.eh_proj.weight_scale_inv"] = scale
        tensors[f"{mtp}.enorm.weight"] = torch.ones(136, dtype=torch.bfloat16)
        tensors[f"{mtp}.hnorm.weight"] = torch.ones(136, dtype=torch.bfloat16)
    out = os.path.join(FIXTURES, "models", "deepseek-v3-fp8")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = fp8_config.to_dict()
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    set_generation_config(fp8, tiny_tokenizer)
    fp8.generation_config.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    write_goldens(out, fp8, prompts, sources, greedy_tokens=24)


def make_routing_goldens():
    """DeepSeek-V2's `group_limited_greedy` router (transformers' DeepseekV2MoEGate) at
    DeepSeek-V2-like settings (8 groups, 3 kept, 6 of 32 experts, routed_scaling_factor 16) on
    random hidden states: the model fixtures cover `greedy` and `noaux_tc`."""
    config = DeepseekV2Config(
        hidden_size=64,
        n_routed_experts=32,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=3,
        topk_method="group_limited_greedy",
        routed_scaling_factor=16.0,
        norm_topk_prob=False,
    )
    gen = torch.Generator().manual_seed(7)
    gate = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2MoEGate(config)
    with torch.no_grad():
        gate.weight.copy_(0.3 * torch.randn(gate.weight.shape, generator=gen))
        hidden = torch.randn(1, 64, 64, generator=gen)
        idx, weights = gate(hidden)
    cases = []
    for t in range(hidden.shape[1]):
        order = torch.argsort(idx[t])
        cases.append({"experts": idx[t][order].tolist(), "weights": weights[t][order].tolist()})
    out = os.path.join(FIXTURES, "routing")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "deepseek-v2-group-limited.json"), "w") as f:
        json.dump(
            {
                "transformers": transformers.__version__,
                "config": {k: getattr(config, k) for k in (
                    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                    "topk_method", "routed_scaling_factor", "norm_topk_prob")},
                "gate_weight": gate.weight.tolist(),
                "hidden": hidden[0].tolist(),
                "tokens": cases,
            },
            f,
        )
        f.write("\n")


TOKENIZER_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "   many   spaces   between   ",
    "tabs\tand\nnewlines\r\nmixed\n\n\n",
    "你好，世界！",
    "深度求索（DeepSeek）是一家人工智能公司。",
    "日本語とカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "Emoji: 😀🎉🚀👩‍👩‍👧‍👦",
    "Accents: café naïve Zürich façade",
    "1234567890",
    "3.14159265358979",
    "phone 13800138000 and year 2026",
    "def add(a, b):\n    return a + b\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "<html><body class=\"x\">&amp;</body></html>",
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?q=1&r=2#frag",
    "email@example.org",
    "<｜begin▁of▁sentence｜>literal BOS inside",
    "<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>",
    "<think>\nreasoning\n</think>\n\nanswer",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather",
    "",
    " ",
    "\n",
    "a",
    "ALL CAPS SENTENCE WITH NUMBERS 123 AND SYMBOLS !@#$%^&*()",
    "Ünïcödé ∑ ∫ ≈ ≠ ∞ → ← ↑ ↓",
    "Mixed 中文 and English 混合 text 123 数字",
    "    indented code\n        more indented",
    "x" * 100,
    "don't won't can't I'm you're",
]


def make_tokenizer_goldens():
    tok = AutoTokenizer.from_pretrained(os.path.join(SHARED, "deepseek-v3-tokenizer"))
    cases = []
    for s in TOKENIZER_STRINGS:
        with_special = tok.encode(s, add_special_tokens=True)
        without = tok.encode(s, add_special_tokens=False)
        cases.append(
            {
                "text": s,
                "ids_with_special": with_special,
                "ids_without_special": without,
                "decoded": tok.decode(with_special),
                "decoded_skip_special": tok.decode(with_special, skip_special_tokens=True),
            }
        )
    out = os.path.join(FIXTURES, "tokenizer")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "deepseek-v3.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "user_only_chinese": [{"role": "user", "content": "你好，请介绍一下你自己。"}],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "11"},
        {"role": "user", "content": "And one more."},
    ],
    "two_system_messages": [
        {"role": "system", "content": "First system part."},
        {"role": "system", "content": "Second system part."},
        {"role": "user", "content": "Hi"},
    ],
    "assistant_with_think": [
        {"role": "user", "content": "What is 3 * 4?"},
        {"role": "assistant", "content": "<think>\n3 times 4 is 12.\n</think>\n\nThe answer is 12."},
        {"role": "user", "content": "And 5 * 6?"},
    ],
    "tool_calls": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris and Beijing?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18}"},
        {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp_c\": 25}"},
        {"role": "assistant", "content": "Paris is 18°C and Beijing is 25°C."},
        {"role": "user", "content": "Thanks!"},
    ],
    "tool_outputs_last": [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": -3}"},
    ],
}


def make_chat_template_goldens():
    v3_dir = os.path.join(SHARED, "deepseek-v3-tokenizer")
    with tempfile.TemporaryDirectory() as r1_dir:
        shutil.copy(os.path.join(v3_dir, "tokenizer.json"), r1_dir)
        shutil.copy(os.path.join(SHARED, "deepseek-r1", "tokenizer_config.json"), r1_dir)
        tokenizers_by_name = {
            "deepseek-v3": AutoTokenizer.from_pretrained(v3_dir),
            "deepseek-r1": AutoTokenizer.from_pretrained(r1_dir),
        }
        cases = []
        for template, tok in tokenizers_by_name.items():
            for name, messages in CONVERSATIONS.items():
                for add_generation_prompt in (True, False):
                    tools = [WEATHER_TOOL] if name.startswith("tool") else None
                    text = tok.apply_chat_template(
                        messages,
                        tools=tools,
                        tokenize=False,
                        add_generation_prompt=add_generation_prompt,
                    )
                    ids = tok.apply_chat_template(
                        messages, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt
                    )
                    cases.append(
                        {
                            "template": template,
                            "conversation": name,
                            "messages": messages,
                            "tools": tools,
                            "add_generation_prompt": add_generation_prompt,
                            "text": text,
                            "ids": ids,
                        }
                    )
    out = os.path.join(FIXTURES, "chat-template")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "deepseek.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main():
    if not os.path.isdir(SHARED):
        sys.exit(f"shared fixtures not found at {SHARED}")
    if sys.argv[1:] == ["gemma3"]:
        # Only the Gemma 3 fixture, on the committed tiny tokenizer.
        make_gemma3(AutoTokenizer.from_pretrained(os.path.join(FIXTURES, "tiny-tokenizer")))
        return
    tiny_dir = os.path.join(FIXTURES, "tiny-tokenizer")
    shutil.rmtree(tiny_dir, ignore_errors=True)
    tokenizer = train_tiny_tokenizer(tiny_dir)
    make_models(tokenizer)
    make_gemma3(tokenizer)
    make_deepseek_models(tokenizer)
    make_routing_goldens()
    make_tokenizer_goldens()
    make_chat_template_goldens()
    print("fixtures written to", FIXTURES)


if __name__ == "__main__":
    main()
