//! A broken model folder gives one clear line naming the file, tensor or limit — never a panic.

use std::collections::HashMap;
use std::path::Path;

use candle_core::safetensors::{load, save};
use enclave_models::{DType, Device, LoadOptions, Logits, Model, Tensor};

use crate::model_dir;

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> String {
    let err = Model::load(
        dir,
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(!err.contains('\n'), "error is not one line: {err}");
    err
}

#[test]
fn missing_folder_names_config_json() {
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
}

#[test]
fn missing_weights_are_reported() {
    let dir = copy_fixture("qwen2");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("no model.safetensors"), "{err}");
}

#[test]
fn truncated_safetensors_header_names_the_file() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..20]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors: not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn truncated_tensor_data_names_the_file() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors: not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn corrupt_safetensors_header_names_the_file() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors: not a valid safetensors file"),
        "{err}"
    );
    assert!(err.contains("JSON"), "{err}");
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    save(&tensors, &path).unwrap();
}

#[test]
fn wrong_tensor_shape_names_tensor_file_and_shapes() {
    let dir = copy_fixture("qwen2");
    let name = "model.layers.1.self_attn.k_proj.weight";
    rewrite_weights(dir.path(), |t| {
        let narrowed = t[name].narrow(0, 0, 16).unwrap().contiguous().unwrap();
        t.insert(name.into(), narrowed);
    });
    let err = load_err(dir.path());
    assert!(err.contains(name), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("[16, 64]") && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("qwen2");
    rewrite_weights(dir.path(), |t| {
        t.remove("model.norm.weight");
    });
    let err = load_err(dir.path());
    assert!(err.contains("`model.norm.weight` is missing"), "{err}");
}

#[test]
fn shard_index_pointing_at_a_missing_file_names_it() {
    let dir = copy_fixture("llama-llama3-rope");
    std::fs::remove_file(dir.path().join("model-00003-of-00005.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00003-of-00005.safetensors"), "{err}");
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("Qwen2ForCausalLM", "MambaForCausalLM")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("unsupported architecture \"MambaForCausalLM\""),
        "{err}"
    );
}

#[test]
fn invalid_config_json_names_the_file() {
    let dir = copy_fixture("qwen2");
    std::fs::write(dir.path().join("config.json"), "{\"architectures\": [").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json: invalid JSON"), "{err}");
}

#[test]
fn missing_config_field_is_named() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("hidden_size"), "{err}");
}

#[test]
fn sequences_past_the_context_are_refused() {
    let model = Model::load(
        &model_dir("qwen2"),
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        },
    )
    .unwrap();
    let limit = model.info().max_position_embeddings;
    let mut cache = model.new_cache();
    let err = model
        .forward(&vec![5; limit + 1], &mut cache, Logits::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("context of {limit} tokens")), "{err}");
    let err = model
        .forward(&[600], &mut cache, Logits::Last)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token id 600 is outside the vocabulary"),
        "{err}"
    );
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, config.to_string()).unwrap();
}

/// Inconsistent MoE and MLA settings are refused before any weight is read, naming the field.
#[test]
fn inconsistent_deepseek_configs_name_the_field() {
    use serde_json::json;
    let cases: &[(&str, &str, serde_json::Value, &str)] = &[
        (
            "deepseek-v3",
            "num_experts_per_tok",
            json!(9),
            "num_experts_per_tok: 9 must be between 1 and n_routed_experts (8)",
        ),
        (
            "deepseek-v3",
            "topk_group",
            json!(5),
            "topk_group: 5 must be between 1 and n_group (4)",
        ),
        (
            "deepseek-v3",
            "n_group",
            json!(3),
            "n_group: 3 must divide n_routed_experts (8)",
        ),
        (
            "deepseek-v3",
            "topk_method",
            json!("fancy"),
            "topk_method: \"fancy\" is not supported",
        ),
        (
            "deepseek-v3",
            "scoring_func",
            json!("relu"),
            "scoring_func: \"relu\" is not supported",
        ),
        (
            "deepseek-v2-lite",
            "qk_rope_head_dim",
            json!(7),
            "qk_rope_head_dim: 7 must be even",
        ),
        (
            "deepseek-v2-lite",
            "kv_lora_rank",
            json!(0),
            "kv_lora_rank: must be positive",
        ),
        (
            "deepseek-v2-lite",
            "rope_scaling",
            json!({"type": "yarn"}),
            "rope_scaling.factor: missing",
        ),
    ];
    for (fixture, key, value, expected) in cases {
        let dir = copy_fixture(fixture);
        edit_config(dir.path(), |c| {
            c.insert((*key).into(), value.clone());
        });
        let err = load_err(dir.path());
        assert!(err.contains("config.json"), "{err}");
        assert!(err.contains(expected), "{key}: {err}");
    }
}

#[test]
fn fp8_weight_without_its_block_scales_is_named() {
    let dir = copy_fixture("deepseek-v3-fp8");
    let scale = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv";
    rewrite_weights(dir.path(), |t| {
        assert!(t.remove(scale).is_some());
    });
    let err = load_err(dir.path());
    assert!(err.contains(scale), "{err}");
    assert!(
        err.contains("`model.layers.1.self_attn.kv_b_proj.weight` is float8_e4m3"),
        "{err}"
    );
}

#[test]
fn fp8_block_scales_of_the_wrong_shape_are_named() {
    let dir = copy_fixture("deepseek-v3-fp8");
    // 200 x 136 in 128 x 128 blocks needs a 2 x 2 grid; a 1 x 2 grid is what inferring the block
    // from the shapes (or flooring) would accept.
    let scale = "model.layers.0.mlp.gate_proj.weight_scale_inv";
    rewrite_weights(dir.path(), |t| {
        let narrowed = t[scale].narrow(0, 0, 1).unwrap().contiguous().unwrap();
        t.insert(scale.into(), narrowed);
    });
    let err = load_err(dir.path());
    assert!(err.contains(scale) && err.contains("[2, 2]"), "{err}");
}

#[test]
fn unsupported_quantization_method_is_named() {
    let dir = copy_fixture("deepseek-v3-fp8");
    edit_config(dir.path(), |c| {
        c.insert(
            "quantization_config".into(),
            serde_json::json!({"quant_method": "awq", "bits": 4}),
        );
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("quantization_config.quant_method: \"awq\" is not supported"),
        "{err}"
    );
}
