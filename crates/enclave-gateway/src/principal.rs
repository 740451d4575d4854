//! Who is calling, once authenticated: the identity, its tenant, and what it may do.

use crate::rbac::{ModelScope, Permission, Permissions};

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An API key, by its public id.
    ApiKey { id: String },
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
}

impl Principal {
    pub(crate) fn new(
        identity: Identity,
        tenant: String,
        role: String,
        permissions: Permissions,
        tenant_models: ModelScope,
        key_models: ModelScope,
    ) -> Self {
        Self {
            identity,
            tenant,
            role,
            permissions,
            tenant_models,
            key_models,
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
            ModelScope::all(),
            ModelScope::all(),
        )
    }

    pub fn can(&self, permission: Permission) -> bool {
        self.permissions.contains(permission)
    }

    /// Whether both the tenant and the key may use `model`.
    pub fn may_use_model(&self, model: &str) -> bool {
        self.tenant_models.allows(model) && self.key_models.allows(model)
    }

    /// The identity for logs and audit records (`key:0123abcd…`, `unauthenticated`).
    pub fn subject(&self) -> String {
        match &self.identity {
            Identity::ApiKey { id } => format!("key:{id}"),
            Identity::Unauthenticated => "unauthenticated".into(),
        }
    }
}
