//! Logits and greedy continuations against goldens saved by `transformers` in float32
//! (`scripts/make_fixtures.py`).

use candle_core::safetensors::load;
use enclave_models::{DType, Device, LoadOptions, Logits, Model};
use serde_json::Value;

use crate::{model_dir, MODELS};

pub struct Golden {
    pub ids: Vec<u32>,
    pub greedy: Vec<u32>,
    /// Logits at every position; only every `column_stride`-th vocabulary column.
    pub logits: Vec<Vec<f32>>,
    pub column_stride: usize,
}

impl Golden {
    /// Our row reduced to the columns the golden kept.
    pub fn columns(&self, row: &[f32]) -> Vec<f32> {
        row.iter().step_by(self.column_stride).copied().collect()
    }
}

pub fn goldens(name: &str) -> Vec<Golden> {
    let dir = model_dir(name);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap()).unwrap();
    let tensors = load(dir.join("goldens.safetensors"), &Device::Cpu).unwrap();
    let column_stride = meta["column_stride"].as_u64().unwrap_or(1) as usize;
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| Golden {
            ids: ids(&p["ids"]),
            greedy: ids(&p["greedy"]),
            logits: tensors[&format!("logits.{i}")].to_vec2().unwrap(),
            column_stride,
        })
        .collect()
}

pub fn load_model(name: &str, dtype: DType) -> Model {
    Model::load(
        &model_dir(name),
        &LoadOptions {
            dtype,
            device: Device::Cpu,
        },
    )
    .unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Every position of every prompt, from one forward over the whole prompt, within 1e-4.
#[test]
fn f32_logits_match_transformers_at_every_position() {
    for name in MODELS {
        let model = load_model(name, DType::F32);
        for (p, golden) in goldens(name).iter().enumerate() {
            let mut cache = model.new_cache();
            let logits: Vec<Vec<f32>> = model
                .forward(&golden.ids, &mut cache, Logits::All)
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(logits.len(), golden.ids.len());
            for (pos, (ours, theirs)) in logits.iter().zip(&golden.logits).enumerate() {
                let diff = max_abs_diff(&golden.columns(ours), theirs);
                assert!(
                    diff <= 1e-4,
                    "{name} prompt {p} position {pos}: max |Δlogit| = {diff}"
                );
            }
        }
    }
}

/// The same logits when the prompt is fed in uneven chunks and then one token at a time
/// through the KV cache, as prefill-then-decode does.
#[test]
fn cached_incremental_forward_matches_full_forward() {
    for name in MODELS {
        let model = load_model(name, DType::F32);
        for golden in goldens(name) {
            let mut cache = model.new_cache();
            let split = golden.ids.len() / 3;
            let mut rows: Vec<Vec<f32>> = model
                .forward(&golden.ids[..split.max(1)], &mut cache, Logits::All)
                .unwrap()
                .to_vec2()
                .unwrap();
            for &id in &golden.ids[split.max(1)..] {
                let row = model.forward(&[id], &mut cache, Logits::Last).unwrap();
                rows.push(row.squeeze(0).unwrap().to_vec1().unwrap());
            }
            assert_eq!(cache.len(), golden.ids.len());
            for (pos, (ours, theirs)) in rows.iter().zip(&golden.logits).enumerate() {
                let diff = max_abs_diff(&golden.columns(ours), theirs);
                assert!(diff <= 1e-4, "{name} position {pos}: max |Δlogit| = {diff}");
            }
        }
    }
}

/// Greedy continuations of 32 tokens are token-for-token those of `transformers`.
#[test]
fn greedy_continuations_match_transformers() {
    for name in MODELS {
        let model = load_model(name, DType::F32);
        for golden in goldens(name) {
            let mut cache = model.new_cache();
            let mut input = golden.ids.clone();
            let mut out = Vec::new();
            while out.len() < golden.greedy.len() {
                let logits: Vec<f32> = model
                    .forward(&input, &mut cache, Logits::Last)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let next = argmax(&logits) as u32;
                out.push(next);
                input = vec![next];
            }
            assert!(golden.greedy.len() >= 24);
            assert_eq!(out, golden.greedy, "{name}: prompt {:?}", golden.ids);
        }
    }
}

/// bf16 agrees with the f32 reference on the top-1 token at >= 95% of positions.
#[test]
fn bf16_top1_agrees_with_reference() {
    let (mut agree, mut total) = (0usize, 0usize);
    for name in MODELS {
        let model = load_model(name, DType::BF16);
        assert_eq!(model.info().dtype, DType::BF16);
        // On CPU, bf16 weights are widened as they are read; activations stay f32.
        assert_eq!(model.info().activation_dtype, DType::F32);
        for golden in goldens(name) {
            let mut cache = model.new_cache();
            let logits: Vec<Vec<f32>> = model
                .forward(&golden.ids, &mut cache, Logits::All)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (ours, theirs) in logits.iter().zip(&golden.logits) {
                total += 1;
                agree += usize::from(argmax(&golden.columns(ours)) == argmax(theirs));
            }
        }
    }
    let rate = agree as f64 / total as f64;
    assert!(
        rate >= 0.95,
        "bf16 top-1 agreement {agree}/{total} = {rate:.3}"
    );
}

#[test]
fn info_reports_shape_and_kv_bytes() {
    let model = load_model("llama-llama3-rope", DType::F32);
    let info = model.info();
    assert_eq!(info.num_layers, 2);
    assert_eq!(info.vocab_size, 512);
    // 2 layers x (keys + values) x 2 KV heads x head_dim 16 x f32.
    assert_eq!(model.kv_bytes_per_token(), 2 * 2 * 2 * 16 * 4);
    let mut cache = model.new_cache();
    model.forward(&[1, 2, 3], &mut cache, Logits::Last).unwrap();
    assert_eq!(
        cache.stored_bytes_per_token(),
        Some(model.kv_bytes_per_token())
    );
    // Untied: embedding + head + 2 layers of (attention + MLP + 2 norms) + final norm.
    let layer = 4 * 64 * 16 + 2 * 2 * 64 * 16 + 4 * 16 * 64 + 3 * 64 * 160 + 2 * 64;
    assert_eq!(info.weight_bytes, 4 * (2 * 512 * 64 + 2 * layer + 64));
}
