//! What every handler shares: the configuration and, once loaded, the model.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use enclave_engine::{EngineHandle, Flow, GenerateRequest, Prompt};

use enclave_gateway::{AuditLog, Principal};

use crate::auth::Access;
use crate::error::ApiError;
use crate::metering::Metering;
use crate::metrics::Metrics;

/// How the server presents the model and bounds its requests.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model name clients send and see (`--served-model-name`).
    pub served_model_name: String,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Return a reasoning model's `<think>` text as `reasoning_content`.
    pub reasoning_split: bool,
    /// After SIGTERM/SIGINT, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
    /// Most choices (`n`) per request.
    pub max_n: usize,
    /// When repeated authentication failures block an address or key.
    pub abuse: enclave_gateway::AbuseLimits,
    /// Each tenant's sensitive-data policy; `None`: text passes untouched and unlogged.
    pub redaction: Option<Arc<crate::redaction::RedactionPolicies>>,
    /// What each listener allows its clients (caps, timeouts).
    pub connections: crate::conn::ConnectionLimits,
    /// The audit queue's size, what a full one does to requests, how refusals are summarised.
    pub audit_queue: enclave_gateway::AuditQueueConfig,
    /// Each tenant's weight and priority in the engine's admission (`[scheduling.tenants]`);
    /// a tenant not listed has weight 1 and priority 0.
    pub tenant_shares: std::collections::HashMap<String, TenantShare>,
}

/// A tenant's standing when tenants compete for the engine's running slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantShare {
    /// Slots relative to other tenants of the same priority (≥ 1).
    pub weight: u32,
    /// Higher is admitted first whenever it waits.
    pub priority: i32,
}

impl Default for TenantShare {
    fn default() -> Self {
        Self {
            weight: 1,
            priority: 0,
        }
    }
}

impl ServerConfig {
    /// The engine flow a tenant's requests run in.
    pub(crate) fn flow_of(&self, tenant: &str) -> Flow {
        let share = self.tenant_shares.get(tenant).copied().unwrap_or_default();
        Flow {
            name: Arc::from(tenant),
            weight: share.weight.max(1),
            priority: share.priority,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            served_model_name: "enclave".into(),
            max_body_bytes: 8 << 20,
            reasoning_split: true,
            shutdown_grace: Duration::from_secs(30),
            max_n: 16,
            abuse: enclave_gateway::AbuseLimits::default(),
            redaction: None,
            connections: crate::conn::ConnectionLimits::default(),
            audit_queue: enclave_gateway::AuditQueueConfig::default(),
            tenant_shares: std::collections::HashMap::new(),
        }
    }
}

/// The loaded model as the handlers see it.
pub(crate) struct Served {
    pub handle: EngineHandle,
    /// The name clients use (`--served-model-name`).
    pub name: String,
    /// The chat template opens `<think>` in its generation prompt (DeepSeek-R1): the output
    /// starts inside the reasoning.
    pub template_opens_think: bool,
}

/// Shared state: configuration, and the model once it is loaded and warmed up.
pub struct AppState {
    pub(crate) config: ServerConfig,
    pub(crate) access: Access,
    pub(crate) metering: Metering,
    /// `None` only if the registry could not be built (a bug, logged; a unit test builds it).
    pub(crate) metrics: Option<Metrics>,
    /// The audit log's writer, when authentication (and so the database) is on.
    pub(crate) audit: Option<AuditLog>,
    /// Failed authentications per address and key, and the blocks they caused.
    pub(crate) abuse: enclave_gateway::AbuseGuard,
    /// Where the admin API's last clean audit verification ended: the next starts there.
    pub(crate) audit_checkpoint: std::sync::Mutex<Option<enclave_gateway::AuditCheckpoint>>,
    served: OnceLock<Served>,
    /// Unix time the server started (the model's `created`).
    pub(crate) created: u64,
}

impl AppState {
    /// The state of a server; with authentication on, starts the audit log's writer on the
    /// current Tokio runtime.
    pub fn new(config: ServerConfig, access: Access) -> Arc<Self> {
        let audit = match &access {
            Access::Keys(authenticator) if tokio::runtime::Handle::try_current().is_ok() => Some(
                AuditLog::start_with(authenticator.store().clone(), config.audit_queue),
            ),
            Access::Keys(_) => {
                tracing::error!("no async runtime: requests will not be audited");
                None
            }
            Access::Disabled => None,
        };
        Arc::new(Self {
            audit,
            abuse: enclave_gateway::AbuseGuard::new(config.abuse),
            audit_checkpoint: std::sync::Mutex::new(None),
            config,
            access,
            metering: Metering::default(),
            metrics: Metrics::new()
                .inspect_err(|e| tracing::error!(error = %e, "cannot build the metrics registry"))
                .ok(),
            served: OnceLock::new(),
            created: unix_time(),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The audit log's writer (to flush it at shutdown).
    pub fn audit_log(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// Usage counted since the last flush, for the binary to write to the database.
    pub fn usage_ledger(&self) -> &Arc<enclave_gateway::UsageLedger> {
        self.metering.ledger()
    }

    /// Runs one short request through the engine (so the first client does not pay for cold
    /// caches), then starts serving it. Fails if the engine cannot generate at all.
    pub async fn warm_up_and_serve(&self, handle: EngineHandle) -> Result<(), ApiError> {
        let mut warm_up = GenerateRequest::new(Prompt::TokenIds(vec![0]));
        warm_up.max_tokens = Some(1);
        warm_up.ignore_eos = true;
        let mut stream = handle
            .submit(warm_up)
            .map_err(|e| ApiError::from_engine(e, "prompt"))?;
        while let Some(event) = stream.next().await {
            if let enclave_engine::Event::Failed(message) = event {
                return Err(ApiError::internal(format!("warm-up failed: {message}")));
            }
        }
        let template_opens_think = handle
            .engine()
            .render_chat(&[serde_json::json!({"role": "user", "content": "hi"})])
            .is_ok_and(|p| p.trim_end().ends_with("<think>"));
        let _ = self.served.set(Served {
            handle,
            name: self.config.served_model_name.clone(),
            template_opens_think,
        });
        Ok(())
    }

    /// Whether `caller` may see the served model (in `/v1/models`).
    pub(crate) fn visible_to(&self, caller: &Principal) -> bool {
        caller.may_use_model(&self.config.served_model_name)
    }

    pub fn is_ready(&self) -> bool {
        self.served.get().is_some()
    }

    /// Whether the model's engine stopped after it was ready (shutdown, or an internal error).
    pub fn engine_stopped(&self) -> bool {
        self.served.get().is_some_and(|s| !s.handle.is_running())
    }

    /// The engine handle, once ready (for shutdown and introspection).
    pub fn engine(&self) -> Option<&EngineHandle> {
        self.served.get().map(|s| &s.handle)
    }

    /// The model a request names (or the served one when it names none), if `caller` may use
    /// it; one it may not is reported as missing, so its existence is not revealed.
    pub(crate) fn model(
        &self,
        requested: Option<&str>,
        caller: &Principal,
    ) -> Result<&Served, ApiError> {
        let name = &self.config.served_model_name;
        if let Some(requested) = requested.filter(|r| *r != name) {
            return Err(ApiError::model_not_found(requested));
        }
        if !caller.may_use_model(name) {
            return Err(ApiError::model_not_found(requested.unwrap_or(name)));
        }
        self.served.get().ok_or_else(|| {
            ApiError::unavailable("model_loading", "the model is still loading; retry shortly")
        })
    }
}

pub(crate) fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh id such as `chatcmpl-5f0c…` (random, 24 hex digits).
pub(crate) fn new_id(prefix: &str) -> String {
    let bits: u128 = rand::random();
    format!("{prefix}-{:024x}", bits >> 32)
}
