//! Model math on candle: shared layers, one file per architecture, and weight loading.
//!
//! Invariants:
//! - Models are stateless: they never own a KV cache, a request or a thread. The caller owns a
//!   [`KvCache`] and passes it to every forward.
//! - Weights are memory-mapped and copied once into the compute dtype; the mapped pages of each
//!   tensor are released as soon as it is copied, so peak memory is one copy of the weights.

pub mod deepseek;
mod error;
pub mod gemma3;
pub mod gguf;
mod hf_defaults;
pub mod kv_cache;
pub mod layers;
pub mod llama;
mod model;
pub mod qwen2;
pub mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use deepseek::{ExpertStats, MlaForm};
pub use error::{ModelError, Result};
pub use gguf::GgufFile;
pub use kv_cache::{KvCache, KvLayout, PagedKvCache, SeqSlice};
pub use layers::decoder::activation_dtype;
pub use model::{
    checkpoint_dtype, Architecture, LoadOptions, Logits, Model, ModelInfo, Quantization,
};
