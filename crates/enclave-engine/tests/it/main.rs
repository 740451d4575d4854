//! Integration tests of `enclave-engine` against goldens from Hugging Face `transformers` 4.x
//! and the real DeepSeek tokenizer files in `../shared/fixtures`.

// Test helpers may panic: a failed fixture read is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chat_template;
mod detokenizer;
mod engine;
mod gemma3_llamacpp;
mod gguf;
mod sampler;
mod serving;
mod tokenizer;

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The real DeepSeek tokenizer files, beside the repository (`../shared/fixtures`).
pub fn shared_fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    assert!(
        dir.join("deepseek-v3-tokenizer/tokenizer.json").is_file(),
        "the shared fixtures must be checked out beside the repository: {}",
        dir.display()
    );
    dir
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn deepseek_v3_tokenizer() -> enclave_engine::Tokenizer {
    enclave_engine::Tokenizer::from_dir(&shared_fixtures().join("deepseek-v3-tokenizer")).unwrap()
}
