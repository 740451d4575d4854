//! The one error type of `enclave-engine`.

use std::path::PathBuf;

use enclave_models::ModelError;

/// Everything that can go wrong between a prompt and its tokens. Each message is one line that
/// names the file, field or limit involved.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    InvalidRequest(String),
    /// The bounded queue is full; the caller should retry later.
    #[error("the server is at capacity ({in_flight} requests in flight); retry later")]
    Overloaded { in_flight: usize },
    /// One flow (tenant) holds its whole share of the queue; others may still be accepted.
    #[error("this tenant has {most} requests running or queued, the most one tenant may hold; retry later")]
    FlowFull { most: usize },
    /// A broken invariant or a stopped engine thread: a server error, never the client's.
    #[error("internal error: {0}")]
    Internal(String),
    #[error(
        "this model's maximum context length is {limit} tokens, but {requested} were requested \
         ({prompt} in the prompt, {completion} for the completion)"
    )]
    ContextOverflow {
        limit: usize,
        requested: usize,
        prompt: usize,
        completion: usize,
    },
}

pub type Result<T> = std::result::Result<T, EngineError>;
