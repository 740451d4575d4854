//! Integration tests of `enclave-models`: numerics against `transformers` goldens, and the
//! errors a broken model folder gives.

// Test helpers may panic: a failed fixture read is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bad_input;
mod deepseek;
mod gguf;
mod numerics;
mod paged;
mod quantize;

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub const MODELS: &[&str] = &[
    "llama-llama3-rope",
    "qwen2",
    "qwen2-tied",
    "gemma3",
    "deepseek-v2-lite",
    "deepseek-v3",
    "deepseek-v3-fp8",
];

/// The DeepSeek (MLA + MoE) fixtures among [`MODELS`].
pub const DEEPSEEK_MODELS: &[&str] = &["deepseek-v2-lite", "deepseek-v3", "deepseek-v3-fp8"];
