//! The one error type of the gateway.

/// What went wrong in access control or its database.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A value given to the gateway (a name, a pattern, a role) is not acceptable; `field`
    /// names it as the caller knows it (`tenant`, `models`, `role`).
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The named thing does not exist (`tenant \`acme\``, `key \`…\``).
    #[error("{0} does not exist")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0} exists already")]
    Exists(String),
    /// The caller may not do this (a key broader than its creator's); `field` names what
    /// exceeded.
    #[error("{field}: {message}")]
    Denied {
        field: &'static str,
        message: String,
    },
    /// The credentials presented identify no one (unknown, malformed, expired or revoked);
    /// the reason is for the log, never for the client.
    #[error("not authenticated: {0}")]
    Unauthenticated(&'static str),
    /// A bounded resource is full for now (the audit queue under `reject`); retry shortly.
    #[error("{0}")]
    Busy(&'static str),
    /// A background task this needs has stopped (the process is shutting down).
    #[error("{0} has stopped")]
    Stopped(&'static str),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database schema: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

impl GatewayError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }
}

pub type Result<T, E = GatewayError> = std::result::Result<T, E>;
