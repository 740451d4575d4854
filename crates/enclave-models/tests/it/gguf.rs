//! GGUF files written from the safetensors fixtures by `scripts/make_gguf_fixtures.py` (with
//! llama.cpp's `gguf` package) load to the same model: identical f32 logits, and Q8_0 close
//! enough to keep the greedy tokens.

use enclave_models::{DType, Device, LoadOptions, Logits, Model, Tensor};

use crate::fixtures;
use crate::numerics::{argmax, load_model};

fn load_gguf(name: &str) -> Model {
    Model::load_gguf(
        &fixtures().join("gguf").join(name),
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        },
    )
    .unwrap()
}

fn logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    model
        .forward(ids, &mut cache, Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut next: Tensor = model.forward(prompt, &mut cache, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let row: Vec<f32> = next.squeeze(0).unwrap().to_vec1().unwrap();
        let id = row
            .iter()
            .enumerate()
            .fold(0, |best, (i, &l)| if l > row[best] { i } else { best }) as u32;
        out.push(id);
        next = model.forward(&[id], &mut cache, Logits::Last).unwrap();
    }
    out
}

const PROMPT: &[u32] = &[0, 17, 250, 3, 99, 400, 7, 12, 301, 45, 88, 5];

#[test]
fn f32_gguf_gives_the_safetensors_logits() {
    let reference = load_model("qwen2", DType::F32);
    let gguf = load_gguf("qwen2-f32.gguf");
    assert_eq!(gguf.info().vocab_size, reference.info().vocab_size);
    assert_eq!(gguf.kv_layout(), reference.kv_layout());
    let (a, b) = (logits(&reference, PROMPT), logits(&gguf, PROMPT));
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-6, "max |Δlogit| {worst}");
}

/// Q8_0 (8-bit blocks of 32 with an f16 scale) keeps greedy decoding wherever the f32 model
/// is decisive. The fixture's random weights give near-ties (top-two margins of a few
/// hundredths of a nat), where any rounding may flip the choice, so — as for comparisons with
/// llama.cpp — tokens are compared up to the first step whose f32 top-two margin is under
/// 0.1 nats, and step by step (teacher-forced on the f32 tokens) wherever the margin is at
/// least that. The mean |Δ log-probability| of the chosen tokens is quoted in BENCHMARKS.md.
#[test]
fn q8_0_gguf_keeps_the_greedy_tokens() {
    const DECISIVE: f32 = 0.1;
    let reference = load_model("qwen2", DType::F32);
    let q8 = load_gguf("qwen2-q8_0.gguf");
    let want = greedy(&reference, PROMPT, 24);
    let mut ids = PROMPT.to_vec();
    ids.extend(&want);
    let (a, b) = (logits(&reference, &ids), logits(&q8, &ids));
    let log_softmax = |row: &[f32]| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|l| (l - max).exp()).sum();
        row.iter().map(|l| l - max - sum.ln()).collect::<Vec<f32>>()
    };
    let margin = |row: &[f32]| {
        let mut sorted = row.to_vec();
        sorted.sort_by(|x, y| y.total_cmp(x));
        sorted[0] - sorted[1]
    };
    let steps: Vec<usize> = (PROMPT.len() - 1..ids.len() - 1).collect();
    let first_close = steps
        .iter()
        .position(|&k| margin(&a[k]) < DECISIVE)
        .unwrap_or(steps.len());
    assert!(
        first_close >= 4,
        "the fixture is decisive for only {first_close} steps"
    );
    let got = greedy(&q8, PROMPT, first_close);
    assert_eq!(got, want[..first_close]);
    let (mut decisive, mut total) = (0, 0.0);
    for &k in &steps {
        let id = ids[k + 1] as usize;
        total += (log_softmax(&a[k])[id] - log_softmax(&b[k])[id]).abs();
        if margin(&a[k]) >= DECISIVE {
            decisive += 1;
            assert_eq!(argmax(&b[k]), argmax(&a[k]), "step {k}");
        }
    }
    let mean = total / steps.len() as f32;
    eprintln!(
        "q8_0: greedy equal for the first {first_close} tokens, argmax equal at all {decisive} decisive steps, mean |Δlogprob| {mean:.5}"
    );
    assert!(mean < 0.05, "mean |Δlogprob| {mean}");
}

#[test]
fn broken_gguf_files_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read(fixtures().join("gguf/qwen2-f32.gguf")).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &source[..source.len() / 2]).unwrap();
    let options = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let error = Model::load_gguf(&truncated, &options)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("truncated.gguf") && error.contains("tensor"),
        "{error}"
    );

    // The embedding's type field rewritten to 16 (IQ2_XXS), a type candle has no kernel for.
    let mut iq = source.clone();
    let name = b"token_embd.weight";
    let at = iq.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let dims = u32::from_le_bytes(iq[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * dims;
    iq[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes());
    let iq_path = dir.path().join("iq2.gguf");
    std::fs::write(&iq_path, &iq).unwrap();
    let error = Model::load_gguf(&iq_path, &options)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("iq2.gguf") && error.contains("IQ2_XXS") && error.contains("not supported"),
        "{error}"
    );

    let not_gguf = dir.path().join("notes.gguf");
    std::fs::write(&not_gguf, b"hello world, not a model").unwrap();
    let error = Model::load_gguf(&not_gguf, &options)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("notes.gguf") && error.contains("GGUF"),
        "{error}"
    );

    // Same file, another architecture name.
    let file = enclave_models::GgufFile::open(&fixtures().join("gguf/qwen2-f32.gguf")).unwrap();
    let mut metadata: Vec<(String, candle_core::quantized::gguf_file::Value)> = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in &mut metadata {
        if k == "general.architecture" {
            *v = candle_core::quantized::gguf_file::Value::String("mamba".into());
        }
    }
    let unknown = dir.path().join("mamba.gguf");
    let mut out = std::fs::File::create(&unknown).unwrap();
    let refs: Vec<(&str, &candle_core::quantized::gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut out, &refs, &[]).unwrap();
    drop(out);
    let error = Model::load_gguf(&unknown, &options)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("mamba") && error.contains("not supported"),
        "{error}"
    );
}
