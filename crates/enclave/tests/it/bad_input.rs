//! Bad input: one clear line on stderr naming what is wrong, a non-zero exit, never a panic.

use std::path::Path;

use crate::{enclave, model_dir, stderr};

fn fails_with(args: &[&str], expected: &[&str]) {
    let out = enclave(args);
    assert!(!out.status.success(), "should fail: {args:?}");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    let line = err.trim_end();
    assert_eq!(line.lines().count(), 1, "one line expected: {err}");
    assert!(line.starts_with("error: "), "{err}");
    for part in expected {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

fn generate(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["generate", "--model", dir.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(args: Vec<String>, expected: &[&str]) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&refs, expected);
}

#[test]
fn missing_model_folder() {
    run(
        generate(Path::new("/no/such/model"), &["--prompt", "hi"]),
        &["/no/such/model", "not found"],
    );
}

#[test]
fn missing_weights_file() {
    let dir = copy_fixture("qwen2");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    run(
        generate(dir.path(), &["--prompt", "hi"]),
        &["no model.safetensors"],
    );
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    run(
        generate(dir.path(), &["--prompt", "hi"]),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn corrupt_safetensors_header() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    run(
        generate(dir.path(), &["--prompt", "hi"]),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn tensor_with_the_wrong_shape() {
    let dir = copy_fixture("qwen2");
    // Claim a wider MLP than the weights have: every up_proj now has the wrong shape.
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"),
    )
    .unwrap();
    run(
        generate(dir.path(), &["--prompt", "hi"]),
        &[
            "model.safetensors",
            "model.layers.0.mlp.gate_proj.weight",
            "[160, 64]",
            "[128, 64]",
        ],
    );
}

#[test]
fn unsupported_architecture() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("Qwen2ForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    run(
        generate(dir.path(), &["--prompt", "hi"]),
        &["unsupported architecture", "GPTNeoXForCausalLM"],
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let ids = vec!["7"; 600].join(",");
    run(
        generate(&model_dir("qwen2"), &["--prompt-ids", &ids]),
        &["maximum context length is 512 tokens", "600 in the prompt"],
    );
    run(
        generate(
            &model_dir("qwen2"),
            &["--prompt", "hello", "--max-model-len", "4"],
        ),
        &["maximum context length is 4 tokens"],
    );
}

#[test]
fn invalid_sampling_parameters() {
    run(
        generate(&model_dir("qwen2"), &["--prompt", "hi", "--top-p", "1.5"]),
        &["`top_p` must be in (0, 1], got 1.5"],
    );
    run(
        generate(
            &model_dir("qwen2"),
            &["--prompt", "hi", "--max-tokens", "0"],
        ),
        &["`max_tokens` must be at least 1"],
    );
}

#[test]
fn token_ids_outside_the_vocabulary() {
    run(
        generate(&model_dir("qwen2"), &["--prompt-ids", "1,99999"]),
        &["99999", "outside the vocabulary"],
    );
}
