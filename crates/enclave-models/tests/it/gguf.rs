//! GGUF files written from the safetensors fixtures by `scripts/make_gguf_fixtures.py` (with
//! llama.cpp's `gguf` package, laid out as its converter does) load to the same model:
//! identical logits from f32/bf16 tensors, and Q8_0 close enough to keep the greedy tokens.

use enclave_models::{DType, Device, LoadOptions, Logits, Model, Tensor};

use crate::fixtures;
use crate::numerics::{argmax, goldens, load_model};

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

fn assert_same_logits(reference: &Model, gguf: &Model, tolerance: f32) {
    assert_eq!(gguf.info().vocab_size, reference.info().vocab_size);
    assert_eq!(gguf.kv_layout(), reference.kv_layout());
    let (a, b) = (logits(reference, PROMPT), logits(gguf, PROMPT));
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tolerance, "max |Δlogit| {worst}");
}

#[test]
fn f32_gguf_gives_the_safetensors_logits() {
    assert_same_logits(
        &load_model("qwen2", DType::F32),
        &load_gguf("qwen2-f32.gguf"),
        1e-6,
    );
}

/// DeepSeek-V2-Lite's shape as `deepseek2`: no query LoRA, softmax routing over experts sliced
/// from stacked tensors, `kv_b_proj` rebuilt from the split `attn_k_b`/`attn_v_b`, YaRN.
#[test]
fn deepseek_v2_lite_gguf_gives_the_safetensors_logits() {
    assert_same_logits(
        &load_model("deepseek-v2-lite", DType::F32),
        &load_gguf("deepseek-v2-lite-f32.gguf"),
        1e-5,
    );
}

/// The V3 fixture (real vocabulary, query LoRA, sigmoid grouped routing with correction bias,
/// a shared expert, tied embeddings) in BF16 as the converter writes it. GGUF has one YaRN
/// scale (`mscale_all_dim`, as the log multiplier) and llama.cpp takes `mscale` to equal it, as
/// in every released DeepSeek checkpoint; the fixture sets them apart on purpose, so the
/// reference here is the same safetensors with `mscale` = `mscale_all_dim`.
#[test]
fn deepseek_v3_gguf_gives_the_safetensors_logits() {
    let reference = deepseek_v3_with_gguf_mscale();
    assert_same_logits(&reference, &load_gguf("deepseek-v3-bf16.gguf"), 1e-5);
}

fn deepseek_v3_with_gguf_mscale() -> Model {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("models/deepseek-v3");
    for file in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    let all_dim = config["rope_scaling"]["mscale_all_dim"].clone();
    config["rope_scaling"]["mscale"] = all_dim;
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    Model::load(
        dir.path(),
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        },
    )
    .unwrap()
}

/// Q8_0 (8-bit blocks of 32 with an f16 scale) keeps greedy decoding wherever the f32 model
/// is decisive. The fixtures' random weights give near-ties (top-two margins of a few
/// hundredths of a nat), where any rounding may flip the choice, so tokens are compared up to
/// the first step whose f32 top-two margin is small, and step by step (teacher-forced on the
/// f32 tokens) wherever the margin is large. The mean |Δ log-probability| of the chosen tokens
/// is quoted in BENCHMARKS.md.
#[test]
fn q8_0_gguf_keeps_the_greedy_tokens() {
    assert_keeps_greedy_tokens(
        &load_model("qwen2", DType::F32),
        &load_gguf("qwen2-q8_0.gguf"),
        &prompts("qwen2"),
        8,
    );
}

/// Quantized stacked experts (gate/up rows of 64 take Q8_0; down rows of 24 fall back to F16).
#[test]
fn deepseek_v2_lite_q8_0_gguf_keeps_the_greedy_tokens() {
    let q8 = load_gguf("deepseek-v2-lite-q8_0.gguf");
    assert!(q8
        .info()
        .quantized_projections
        .iter()
        .any(|(format, _)| *format == candle_core::quantized::GgmlDType::Q8_0));
    assert_keeps_greedy_tokens(
        &load_model("deepseek-v2-lite", DType::F32),
        &q8,
        &prompts("deepseek-v2-lite"),
        8,
    );
}

/// With a hidden size of 16 only the attention output (32-wide rows) fits Q8_0 blocks; the
/// rest falls back to F16 as in the converter. 16 dimensions over a 129k vocabulary leave the
/// logits nearly flat, so few steps are decisive: the bound on |Δlogit| carries this check.
#[test]
fn deepseek_v3_q8_0_gguf_keeps_the_greedy_tokens() {
    assert_keeps_greedy_tokens(
        &deepseek_v3_with_gguf_mscale(),
        &load_gguf("deepseek-v3-q8_0.gguf"),
        &prompts("deepseek-v3"),
        1,
    );
}

/// Over `prompts` (24 greedy tokens each): the free-running greedy continuation is identical up
/// to the first step whose f32 top-two margin is under `DECISIVE`, the argmax is identical at
/// every step (teacher-forced on the f32 tokens) whose margin is at least that, and the mean
/// |Δ log-probability| of the chosen tokens is small.
fn assert_keeps_greedy_tokens(
    reference: &Model,
    q8: &Model,
    prompts: &[Vec<u32>],
    min_decisive: usize,
) {
    // As in the `--quantize` tests: twice the largest |Δlogit| Q8_0 shows on these random
    // fixtures (about 0.33); a smaller margin cannot be trusted to survive quantization.
    const DECISIVE: f32 = 0.75;
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
    let (mut decisive, mut free, mut total, mut count, mut worst) = (0, 0, 0.0, 0, 0f32);
    for prompt in prompts {
        let want = greedy(reference, prompt, 24);
        let mut ids = prompt.clone();
        ids.extend(&want);
        let (a, b) = (logits(reference, &ids), logits(q8, &ids));
        let steps: Vec<usize> = (prompt.len() - 1..ids.len() - 1).collect();
        let first_close = steps
            .iter()
            .position(|&k| margin(&a[k]) < DECISIVE)
            .unwrap_or(steps.len());
        let got = greedy(q8, prompt, first_close);
        assert_eq!(got, want[..first_close], "prompt {prompt:?}");
        free += first_close;
        for &k in &steps {
            let id = ids[k + 1] as usize;
            total += (log_softmax(&a[k])[id] - log_softmax(&b[k])[id]).abs();
            count += 1;
            worst = a[k]
                .iter()
                .zip(&b[k])
                .map(|(x, y)| (x - y).abs())
                .fold(worst, f32::max);
            if margin(&a[k]) >= DECISIVE {
                decisive += 1;
                assert_eq!(argmax(&b[k]), argmax(&a[k]), "prompt {prompt:?}, step {k}");
            }
        }
    }
    let mean = total / count as f32;
    eprintln!(
        "q8_0: {free} free-running greedy tokens equal, argmax equal at all {decisive} decisive steps of {count}, mean |Δlogprob| {mean:.5}, max |Δlogit| {worst:.3}"
    );
    assert!(mean < 0.05, "mean |Δlogprob| {mean}");
    assert!(worst < DECISIVE, "max |Δlogit| {worst}");
    assert!(
        decisive >= min_decisive,
        "the fixture is decisive at only {decisive} steps"
    );
}

/// The fixture's golden prompts (text and chat), and [`PROMPT`] where the vocabulary has it.
fn prompts(name: &str) -> Vec<Vec<u32>> {
    let mut prompts: Vec<Vec<u32>> = goldens(name).into_iter().map(|g| g.ids).collect();
    prompts.push(PROMPT.to_vec());
    prompts
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
