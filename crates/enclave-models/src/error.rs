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
    /// Every architecture this build supports is named, from the one list of them.
    #[error("unsupported architecture {0:?}; supported: {supported}", supported = crate::model::Architecture::ALL.map(crate::model::Architecture::hf_name).join(", "))]
    UnsupportedArchitecture(String),
    #[error("sequence of {requested} tokens exceeds the model's context of {limit} tokens")]
    ContextOverflow { requested: usize, limit: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Architecture;

    #[test]
    fn the_unsupported_architecture_message_names_every_supported_one() {
        let message = ModelError::UnsupportedArchitecture("MistralForCausalLM".into()).to_string();
        assert!(message.contains("\"MistralForCausalLM\""), "{message}");
        for architecture in Architecture::ALL {
            assert!(message.contains(architecture.hf_name()), "{message}");
        }
    }
}
