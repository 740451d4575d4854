//! Who is calling, once authenticated: the identity, its tenant, and what it may do.

use crate::error::{GatewayError, Result};
use crate::limits::{Limits, Subject};
use crate::rbac::{ModelScope, Permission, Permissions};

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An API key, by its public id.
    ApiKey { id: String },
    /// A client certificate (mTLS), by its subject.
    Certificate { subject: String },
    /// An OIDC/JWT bearer token, by its `sub`.
    Token { subject: String },
    /// Authentication is disabled (`--no-auth`, loopback only): every local caller.
    Unauthenticated,
}

/// An authenticated caller, as the server's handlers see it.
#[derive(Debug, Clone)]
pub struct Principal {
    pub identity: Identity,
    pub tenant: String,
    pub role: String,
    pub permissions: Permissions,
    tenant_models: ModelScope,
    key_models: ModelScope,
    pub tenant_limits: Limits,
    pub key_limits: Limits,
    /// When the credential stops working (Unix seconds): an API key's expiry. Tokens and
    /// certificates are sessions of an identity, not grants, so they set none.
    pub expires_at: Option<i64>,
}

/// Where a principal's tenant and key draw their scopes and limits from.
pub(crate) struct Grants {
    pub tenant_models: ModelScope,
    pub key_models: ModelScope,
    pub tenant_limits: Limits,
    pub key_limits: Limits,
    pub expires_at: Option<i64>,
}

impl Principal {
    pub(crate) fn new(
        identity: Identity,
        tenant: String,
        role: String,
        permissions: Permissions,
        grants: Grants,
    ) -> Self {
        Self {
            identity,
            tenant,
            role,
            permissions,
            tenant_models: grants.tenant_models,
            key_models: grants.key_models,
            tenant_limits: grants.tenant_limits,
            key_limits: grants.key_limits,
            expires_at: grants.expires_at,
        }
    }

    /// The allowances a request of this principal draws on (none when nothing is limited).
    pub fn rate_subjects(&self) -> Vec<(Subject, Limits)> {
        let mut subjects = Vec::new();
        if let (Identity::ApiKey { id }, false) = (&self.identity, self.key_limits.is_unlimited()) {
            subjects.push((Subject::Key(id.clone()), self.key_limits));
        }
        if !self.tenant_limits.is_unlimited() {
            subjects.push((Subject::Tenant(self.tenant.clone()), self.tenant_limits));
        }
        subjects
    }

    /// The key's id (or the certificate's subject) for usage records; `""` without
    /// authentication.
    pub fn key_id(&self) -> &str {
        match &self.identity {
            Identity::ApiKey { id } => id,
            Identity::Certificate { subject } | Identity::Token { subject } => subject,
            Identity::Unauthenticated => "",
        }
    }

    /// The caller when authentication is disabled: the `default` tenant, every permission,
    /// every model.
    pub fn unauthenticated() -> Self {
        Self::new(
            Identity::Unauthenticated,
            "default".into(),
            "admin".into(),
            Permissions::all(),
            Grants {
                tenant_models: ModelScope::all(),
                key_models: ModelScope::all(),
                tenant_limits: Limits::default(),
                key_limits: Limits::default(),
                expires_at: None,
            },
        )
    }

    pub fn can(&self, permission: Permission) -> bool {
        self.permissions.contains(permission)
    }

    /// Whether both the tenant and the key may use `model`.
    pub fn may_use_model(&self, model: &str) -> bool {
        self.tenant_models.allows(model) && self.key_models.allows(model)
    }

    /// Refuses a key this caller would create that could do more than the caller: a model
    /// pattern its own key's patterns do not cover, a limit looser than its own key's (or
    /// none where it has one), or an expiry later than its own (or none where it has one).
    pub fn check_delegation(
        &self,
        models: &[String],
        limits: &Limits,
        expires_at: Option<i64>,
    ) -> Result<()> {
        if let Some(pattern) = models.iter().find(|p| !self.key_models.covers(p)) {
            return Err(GatewayError::Denied {
                field: "models",
                message: format!(
                    "`{}` is not within the creator's own models ({}); a key cannot reach \
                     further than the key that creates it",
                    pattern.escape_debug(),
                    self.key_models.patterns().join(", ")
                ),
            });
        }
        let own = &self.key_limits;
        for (name, theirs, mine) in [
            (
                "requests_per_minute",
                limits.requests_per_minute,
                own.requests_per_minute,
            ),
            (
                "tokens_per_minute",
                limits.tokens_per_minute,
                own.tokens_per_minute,
            ),
            (
                "concurrent_requests",
                limits.concurrent_requests,
                own.concurrent_requests,
            ),
        ] {
            if let Some(mine) = mine {
                if theirs.is_none_or(|theirs| theirs > mine) {
                    return Err(GatewayError::Denied {
                        field: "limits",
                        message: format!(
                            "`{name}` must be at most the creator's own {mine}, got {}",
                            theirs.map_or("no limit".into(), |t| t.to_string())
                        ),
                    });
                }
            }
        }
        if let Some(mine) = self.expires_at {
            if expires_at.is_none_or(|theirs| theirs > mine) {
                return Err(GatewayError::Denied {
                    field: "expires",
                    message: format!(
                        "the key must expire no later than its creator's key (Unix time {mine})"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The identity for logs and audit records (`key:0123abcd…`, `unauthenticated`).
    pub fn subject(&self) -> String {
        match &self.identity {
            Identity::ApiKey { id } => format!("key:{id}"),
            Identity::Certificate { subject } => format!("cert:{subject}"),
            Identity::Token { subject } => format!("token:{subject}"),
            Identity::Unauthenticated => "unauthenticated".into(),
        }
    }
}
