//! From text to tokens and back: tokenizer, chat template, incremental detokenizer, request
//! validation, sampling, and the generation loop over a model from `enclave-models`.
//!
//! Invariants:
//! - Nothing here knows HTTP or OpenAI JSON; callers convert to and from these types.
//! - A [`ValidRequest`] is only made by [`Engine::validate`]; nothing downstream re-checks it.

pub mod block_manager;
pub mod chat_template;
pub mod detokenizer;
mod engine;
mod error;
pub mod generation_config;
mod gguf_tokenizer;
pub mod sampler;
pub mod scheduler;
pub mod serving;
pub mod tokenizer;

pub use chat_template::ChatTemplate;
pub use detokenizer::IncrementalDetokenizer;
pub use engine::{
    DTypeChoice, Engine, EngineConfig, FinishReason, GenerateRequest, Generation, Prompt,
    TokenEvent, ValidRequest, WeightFormat, MAX_STOP_BYTES, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS,
};
pub use error::{EngineError, Result};
pub use generation_config::GenerationConfig;
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::Flow;
pub use serving::{
    EngineHandle, Event, PromptLogprob, RequestStream, ServingConfig, ServingCore, ServingStats,
    Usage, DEFAULT_MAX_NUM_BATCHED_TOKENS,
};
pub use tokenizer::{SpecialTokens, Tokenizer};
