//! The real Gemma 3 270M GGUF (Q4_K_M) against llama.cpp's tokens and greedy choices
//! (`fixtures/gguf/gemma3-270m-llamacpp.json`) and against `transformers` running the
//! dequantised file (`fixtures/gguf/gemma3-270m-transformers.json`), both from
//! `scripts/make_gemma3_goldens.py`.
//!
//! The model file is fetched by `scripts/fetch-demo-model` (`.ci/run` does); without it these
//! tests say so and pass, so a fresh checkout's `cargo test` needs no download.

use std::path::PathBuf;

use enclave_engine::Tokenizer;
use enclave_models::{DType, Device, GgufFile, LoadOptions, Logits, Model, Quantization};

use crate::{fixtures, ids, read_json};

fn model_path() -> Option<PathBuf> {
    let path = fixtures().join("../models/gemma-3-270m-q4_k_m.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-demo-model to check Gemma 3 against llama.cpp",
            path.display()
        );
        None
    }
}

fn goldens() -> serde_json::Value {
    read_json(fixtures().join("gguf/gemma3-270m-llamacpp.json"))
}

fn transformers_goldens() -> serde_json::Value {
    read_json(fixtures().join("gguf/gemma3-270m-transformers.json"))
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn load(path: &std::path::Path, keep_blocks: bool, quantize: Option<Quantization>) -> Model {
    let options = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let file = GgufFile::open(path).unwrap();
    let mut model = if keep_blocks {
        Model::from_gguf(file, &options).unwrap()
    } else {
        Model::from_gguf_dequantized(file, &options).unwrap()
    };
    if let Some(q) = quantize {
        model.quantize(q).unwrap();
    }
    model
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

fn log_softmax_at(row: &[f32], token: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[token as usize] as f64 - max - sum.ln()
}

/// Free-running greedy decoding of `n` tokens; also each step's logits row.
fn greedy(model: &Model, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let (mut tokens, mut rows) = (Vec::new(), Vec::new());
    while tokens.len() < n {
        let row: Vec<f32> = model
            .forward(&input, &mut cache, Logits::Last)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = argmax(&row);
        tokens.push(next);
        rows.push(row);
        input = vec![next];
    }
    (tokens, rows)
}

/// Logits predicting each token of `continuation` after `prompt`, decoded one token at a time
/// (the path generated tokens take: one-row products, on quantized weights with quantized
/// activations).
fn teacher_forced(model: &Model, prompt: &[u32], continuation: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut rows = Vec::new();
    for &token in continuation {
        let row: Vec<f32> = model
            .forward(&input, &mut cache, Logits::Last)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        rows.push(row);
        input = vec![token];
    }
    rows
}

#[test]
fn gemma3_prompt_ids_equal_llama_cpps() {
    let Some(path) = model_path() else { return };
    let file = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(file.metadata(), &path).unwrap();
    let goldens = goldens();
    let cases = goldens["tokenize"]
        .as_array()
        .unwrap()
        .iter()
        .chain(goldens["greedy"].as_array().unwrap());
    let mut checked = 0;
    for case in cases {
        let text = case
            .get("text")
            .filter(|_| case.get("prompt").is_none())
            .or_else(|| case.get("prompt"))
            .and_then(|t| t.as_str())
            .unwrap();
        let ours = tokenizer.encode(text, true).unwrap();
        assert_eq!(ours, ids(&case["ids"]), "{text:?}");
        checked += 1;
    }
    assert!(checked >= 15);
}

/// Dequantised to f32, the file computes what `transformers` computes on it: 32 greedy tokens
/// on every prompt (English, Chinese, code, chat) up to a step where the reference's own
/// top-two margin is under 0.01, and the chosen tokens' log-probabilities within 2e-3.
#[test]
fn gemma3_dequantised_equals_transformers() {
    let Some(path) = model_path() else { return };
    let model = load(&path, false, None);
    let goldens = transformers_goldens();
    let mut steps = 0;
    for case in goldens["greedy"].as_array().unwrap() {
        let expected = ids(&case["greedy"]);
        let decided = floats(&case["top2_margins"])
            .iter()
            .position(|&m| m < 0.01)
            .unwrap_or(expected.len());
        let (ours, rows) = greedy(&model, &ids(&case["ids"]), decided);
        assert_eq!(ours, expected[..decided], "{:?}", case["prompt"]);
        for ((row, &token), want) in rows.iter().zip(&ours).zip(floats(&case["logprobs"])) {
            let got = log_softmax_at(row, token);
            assert!(
                (got - want).abs() < 2e-3,
                "{:?}: log p {got} vs {want}",
                case["prompt"]
            );
        }
        steps += decided;
    }
    eprintln!("greedy steps equal to transformers: {steps}");
    assert!(steps >= 150);
}

/// How close each way of computing the file comes to llama.cpp. llama.cpp quantizes
/// activations to 8 bits for its products, which moves its logits 0.1–0.4 nats from the exact
/// arithmetic on this file (`transformers` itself leaves llama.cpp's greedy path at steps where
/// llama.cpp's margin is 0.11 or 0.2: BENCHMARKS.md), so agreement is checked where llama.cpp is
/// decided by more than that: at every step of its greedy continuation (teacher-forced) whose
/// top-two margin is at least 0.5 nats, our argmax is its token.
#[test]
fn gemma3_agrees_with_llama_cpp_where_it_is_decided() {
    let Some(path) = model_path() else { return };
    let goldens = goldens();
    for (label, model, min_percent) in [
        ("dequantised", load(&path, false, None), 100),
        ("gguf blocks", load(&path, true, None), 95),
    ] {
        let (mut decided, mut agreed, mut total) = (0, 0, 0);
        for case in goldens["greedy"].as_array().unwrap() {
            let expected = ids(&case["greedy"]);
            let margins = floats(&case["top2_margins"]);
            let rows = teacher_forced(&model, &ids(&case["ids"]), &expected);
            for (step, (row, &token)) in rows.iter().zip(&expected).enumerate() {
                total += 1;
                if margins[step] >= 0.5 {
                    decided += 1;
                    if argmax(row) == token {
                        agreed += 1;
                    } else {
                        eprintln!(
                            "{label}: {:?} step {step}: {} instead of llama.cpp's {token} (its margin {})",
                            case["prompt"],
                            argmax(row),
                            margins[step]
                        );
                    }
                }
            }
        }
        eprintln!("{label}: llama.cpp's token at {agreed} of the {decided} steps (of {total}) where it is decided");
        assert!(decided >= 120);
        assert!(
            agreed * 100 >= decided * min_percent,
            "{label}: {agreed} of {decided}"
        );
    }
}

/// `--quantize q8_0` on the real model (its dequantised weights re-quantized) keeps the greedy
/// tokens of the dequantised model where that model is decided (all but at most 1 %), with the
/// chosen tokens' log-probabilities close.
#[test]
fn gemma3_q8_0_keeps_the_dequantised_greedy_tokens() {
    let Some(path) = model_path() else { return };
    let goldens = transformers_goldens();
    let model = load(&path, false, Some(Quantization::Q8_0));
    let (mut deltas, mut decided, mut kept) = (Vec::new(), 0, 0);
    for case in goldens["greedy"].as_array().unwrap() {
        let expected = ids(&case["greedy"]);
        let margins = floats(&case["top2_margins"]);
        let rows = teacher_forced(&model, &ids(&case["ids"]), &expected);
        for (step, ((row, &token), want)) in rows
            .iter()
            .zip(&expected)
            .zip(floats(&case["logprobs"]))
            .enumerate()
        {
            deltas.push((log_softmax_at(row, token) - want).abs());
            if margins[step] >= 0.5 {
                decided += 1;
                if argmax(row) == token {
                    kept += 1;
                } else {
                    eprintln!(
                        "q8_0: {:?} step {step}: {} instead of {token} (margin {})",
                        case["prompt"],
                        argmax(row),
                        margins[step]
                    );
                }
            }
        }
    }
    let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
    eprintln!(
        "q8_0: reference token at {kept} of {decided} decided steps; mean |Δlogprob| {mean:.4}"
    );
    assert!(decided >= 120);
    // 8-bit activations (prompt rows included, as in llama.cpp) move logits by up to a few
    // tenths of a nat, so a step decided by a little over 0.5 may flip.
    assert!(kept * 100 >= decided * 99, "{kept} of {decided}");
    assert!(mean < 0.05, "mean |Δlogprob| {mean}");
}

/// The issue's own criterion, on the file's own blocks (what `enclave serve` runs on a GGUF
/// file): free-running greedy decoding of 32 tokens equals llama.cpp's up to the first step where
/// llama.cpp's top-two margin is under 0.1 nats, on at least 5 of the 6 golden prompts. The one
/// left ("人工智能的发展") parts at its first step, where llama.cpp's margin is 0.2 nats but the
/// exact arithmetic on the dequantised file (= `transformers`) has a 0.04-nat tie between the
/// same two tokens: llama.cpp's own rounding (f16 KV cache, 8-bit activations) decides it.
#[test]
fn gemma3_gguf_greedy_equals_llama_cpps_until_its_first_near_tie() {
    let Some(path) = model_path() else { return };
    let goldens = goldens();
    let model = load(&path, true, None);
    let mut equal = 0;
    for case in goldens["greedy"].as_array().unwrap() {
        let expected = ids(&case["greedy"]);
        let margins = floats(&case["top2_margins"]);
        let decided = margins
            .iter()
            .position(|&m| m < 0.1)
            .unwrap_or(expected.len());
        let (ours, _) = greedy(&model, &ids(&case["ids"]), expected.len());
        if ours[..decided] == expected[..decided] {
            equal += 1;
        } else {
            eprintln!(
                "{:?}: ours {:?} vs llama.cpp's {:?} within its first {decided} steps",
                case["prompt"],
                &ours[..decided],
                &expected[..decided]
            );
        }
    }
    eprintln!("greedy equal to llama.cpp's until its first near-tie on {equal} of 6 prompts");
    assert!(equal >= 5, "{equal} prompts");
}
