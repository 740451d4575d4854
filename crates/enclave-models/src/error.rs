//! The one error type of `enclave-models`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
///
/// Messages are one line and name the file, tensor or limit involved, so the CLI can print them
/// as they are.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    #[error("unsupported architecture {0:?}; supported: LlamaForCausalLM, Qwen2ForCausalLM, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM")]
    UnsupportedArchitecture(String),
    #[error("sequence of {requested} tokens exceeds the model's context of {limit} tokens")]
    ContextOverflow { requested: usize, limit: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
