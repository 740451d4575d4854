//! DeepSeek-V2/V3 specifics: the two MLA forms agree, the cache holds only latents, and MoE
//! runs only the chosen experts. (Logits and greedy continuations against `transformers` are
//! in `numerics.rs`, which covers these fixtures with the others.)

use enclave_models::layers::moe::{RouterSpec, Scoring, TopkMethod};
use enclave_models::{DType, ExpertStats, Logits, MlaForm, Model};
use serde_json::Value;

use crate::numerics::{goldens, load_model, max_abs_diff};
use crate::{model_dir, DEEPSEEK_MODELS};

fn config(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("config.json")).unwrap())
        .unwrap()
}

fn field(config: &Value, key: &str) -> usize {
    config[key].as_u64().unwrap() as usize
}

fn model_with_form(name: &str, form: MlaForm) -> Model {
    let mut model = load_model(name, DType::F32);
    model.set_mla_form(form);
    model
}

/// Prefill of a first chunk, then one token at a time, all in one form; every position's logits.
fn chunked_then_incremental(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let split = (ids.len() / 2).max(1);
    let mut rows: Vec<Vec<f32>> = model
        .forward(&ids[..split], &mut cache, Logits::All)
        .unwrap()
        .to_vec2()
        .unwrap();
    for &id in &ids[split..] {
        let row = model.forward(&[id], &mut cache, Logits::Last).unwrap();
        rows.push(row.squeeze(0).unwrap().to_vec1().unwrap());
    }
    rows
}

/// The expanded form (keys and values up-projected from the latents) and the weight-absorbed
/// form (attention in latent space) give the same logits, both against the goldens, for a
/// whole-prompt forward and for chunked prefill followed by decoding.
#[test]
fn expanded_and_absorbed_mla_give_the_same_logits() {
    for name in DEEPSEEK_MODELS {
        let expanded = model_with_form(name, MlaForm::Expanded);
        let absorbed = model_with_form(name, MlaForm::Absorbed);
        for golden in goldens(name) {
            let full = |model: &Model| -> Vec<Vec<f32>> {
                let mut cache = model.new_cache();
                model
                    .forward(&golden.ids, &mut cache, Logits::All)
                    .unwrap()
                    .to_vec2()
                    .unwrap()
            };
            let (e, a) = (full(&expanded), full(&absorbed));
            let (e_inc, a_inc) = (
                chunked_then_incremental(&expanded, &golden.ids),
                chunked_then_incremental(&absorbed, &golden.ids),
            );
            for pos in 0..golden.ids.len() {
                let forms = max_abs_diff(&e[pos], &a[pos]);
                assert!(
                    forms <= 1e-4,
                    "{name} position {pos}: forms differ by {forms}"
                );
                for (label, rows) in [
                    ("expanded", &e),
                    ("absorbed", &a),
                    ("expanded+cache", &e_inc),
                    ("absorbed+cache", &a_inc),
                ] {
                    let diff = max_abs_diff(&golden.columns(&rows[pos]), &golden.logits[pos]);
                    assert!(
                        diff <= 1e-4,
                        "{name} {label} position {pos}: max |Δlogit| = {diff}"
                    );
                }
            }
        }
    }
}

/// The cache stores one latent (`kv_lora_rank`) and one shared rotary key
/// (`qk_rope_head_dim`) per token and layer — not per-head keys and values.
#[test]
fn cache_holds_only_the_latent_and_rotary_key() {
    for name in DEEPSEEK_MODELS {
        let config = config(name);
        let layers = field(&config, "num_hidden_layers");
        let latent = field(&config, "kv_lora_rank") + field(&config, "qk_rope_head_dim");
        let model = load_model(name, DType::F32);
        let expected = latent * layers * DType::F32.size_in_bytes();
        assert_eq!(model.kv_bytes_per_token(), expected, "{name}");
        let mut cache = model.new_cache();
        model
            .forward(&[1, 2, 3, 4], &mut cache, Logits::Last)
            .unwrap();
        model.forward(&[5], &mut cache, Logits::Last).unwrap();
        assert_eq!(cache.stored_bytes_per_token(), Some(expected), "{name}");
        // What expanded keys and values would take: heads x (qk_head_dim + v_head_dim).
        let heads = field(&config, "num_attention_heads");
        let expanded = heads
            * (field(&config, "qk_nope_head_dim")
                + field(&config, "qk_rope_head_dim")
                + field(&config, "v_head_dim"))
            * layers
            * 4;
        assert!(expected < expanded, "{name}: {expected} vs {expanded}");
    }
}

/// Each token runs on exactly `num_experts_per_tok` routed experts (plus the shared ones) in
/// every MoE layer, for prefill and for decoding.
#[test]
fn moe_runs_only_the_chosen_experts() {
    for name in DEEPSEEK_MODELS {
        let config = config(name);
        let layers = field(&config, "num_hidden_layers");
        let moe_layers = layers - field(&config, "first_k_dense_replace");
        let top_k = field(&config, "num_experts_per_tok") as u64;
        let n_experts = field(&config, "n_routed_experts") as u64;
        assert!(top_k < n_experts);
        let model = load_model(name, DType::F32);
        assert_eq!(model.expert_stats(), ExpertStats::default());
        let mut cache = model.new_cache();
        let prompt = [3u32, 1, 4, 1, 5, 9, 2, 6];
        model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let tokens = prompt.len() as u64 * moe_layers as u64;
        assert_eq!(
            model.expert_stats(),
            ExpertStats {
                routed_rows: tokens * top_k,
                shared_rows: tokens,
            },
            "{name}: not tokens x num_experts_per_tok (tokens x n_routed_experts would be {})",
            tokens * n_experts
        );
        model.forward(&[7], &mut cache, Logits::Last).unwrap();
        let tokens = tokens + moe_layers as u64;
        assert_eq!(model.expert_stats().routed_rows, tokens * top_k, "{name}");
    }
}

/// The FP8 checkpoint loads in every supported weight dtype; bf16 keeps its top-1 tokens.
#[test]
fn fp8_checkpoint_loads_as_bf16() {
    let model = load_model("deepseek-v3-fp8", DType::BF16);
    assert_eq!(model.info().dtype, DType::BF16);
    let golden = &goldens("deepseek-v3-fp8")[0];
    let mut cache = model.new_cache();
    let logits: Vec<Vec<f32>> = model
        .forward(&golden.ids, &mut cache, Logits::All)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (ours, theirs) in logits.iter().zip(&golden.logits) {
        // bf16 rounds the dequantised weights: close, not exact.
        assert!(max_abs_diff(ours, theirs) < 0.1);
    }
}

/// DeepSeek-V2's `group_limited_greedy` routing against transformers' `DeepseekV2MoEGate`
/// (the model fixtures cover `greedy` and `noaux_tc`): same experts, same weights.
#[test]
fn group_limited_greedy_routing_matches_transformers() {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(crate::fixtures().join("routing/deepseek-v2-group-limited.json"))
            .unwrap(),
    )
    .unwrap();
    let matrix = |v: &Value| -> Vec<Vec<f32>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    };
    let (weight, hidden) = (matrix(&golden["gate_weight"]), matrix(&golden["hidden"]));
    let config = &golden["config"];
    let spec = RouterSpec {
        num_experts: config["n_routed_experts"].as_u64().unwrap() as usize,
        top_k: config["num_experts_per_tok"].as_u64().unwrap() as usize,
        scoring: Scoring::Softmax,
        method: TopkMethod::GroupLimitedGreedy,
        n_group: config["n_group"].as_u64().unwrap() as usize,
        topk_group: config["topk_group"].as_u64().unwrap() as usize,
        norm_topk_prob: false,
        routed_scaling_factor: config["routed_scaling_factor"].as_f64().unwrap(),
        scale_after_norm: false,
    };
    let tokens = golden["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), hidden.len());
    for (t, (h, expected)) in hidden.iter().zip(tokens).enumerate() {
        let logits: Vec<f32> = weight
            .iter()
            .map(|w| w.iter().zip(h).map(|(a, b)| a * b).sum())
            .collect();
        let routing = spec.route(&logits, None);
        let mut chosen: Vec<(usize, f32)> = routing
            .experts
            .iter()
            .copied()
            .zip(routing.weights.iter().copied())
            .collect();
        chosen.sort_by_key(|&(e, _)| e);
        let experts: Vec<usize> = expected["experts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(
            chosen.iter().map(|c| c.0).collect::<Vec<_>>(),
            experts,
            "token {t}"
        );
        for ((_, w), expected) in chosen.iter().zip(expected["weights"].as_array().unwrap()) {
            let expected = expected.as_f64().unwrap() as f32;
            let tolerance = 2e-5 * expected.abs().max(1.0);
            assert!(
                (w - expected).abs() <= tolerance,
                "token {t}: weight {w} vs {expected}"
            );
        }
    }
}
