//! The audit record of one request, filled in as it goes: who (once authenticated), which
//! model, how many tokens, what an admin action changed, and the status. Once the caller is
//! authenticated the record's place in the audit queue is reserved ([`AuditTrail::reserve`]),
//! before the request is served; it is queued into that place when the response has been sent
//! to the end (streams included) — or, on the admin listener, committed before the response
//! leaves. A request refused before authentication holds no place: it is counted into its
//! source's summary instead.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use enclave_gateway::{AuditEvent, AuditKind, AuditLog, AuditSlot, Principal};
use serde_json::Value;

#[derive(Default)]
struct Identified {
    tenant: String,
    subject: String,
    model: String,
    detail: Option<Value>,
    /// Redacted prompt and completions, when the tenant's policy keeps them.
    prompt_text: Option<String>,
    completion_texts: Vec<String>,
}

/// How long an admin action waits for its record's commit before answering anyway (the record
/// stays queued and is written when the database answers).
const COMMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One request's audit record in the making; queued when the last reference goes.
pub(crate) struct AuditTrail {
    log: AuditLog,
    started: Instant,
    at_ms: i64,
    kind: AuditKind,
    request_id: String,
    source: String,
    method: String,
    route: String,
    identified: Mutex<Identified>,
    status: AtomicU16,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    recorded: AtomicBool,
    /// The record's reserved place, once the caller is authenticated.
    slot: Mutex<Option<AuditSlot>>,
}

impl AuditTrail {
    pub fn new(
        log: AuditLog,
        kind: AuditKind,
        request_id: String,
        source: String,
        method: String,
        route: String,
    ) -> Self {
        Self {
            log,
            started: Instant::now(),
            at_ms: enclave_gateway::unix_millis(),
            kind,
            request_id,
            source,
            method,
            route,
            identified: Mutex::new(Identified {
                subject: "anonymous".into(),
                ..Identified::default()
            }),
            status: AtomicU16::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            recorded: AtomicBool::new(false),
            slot: Mutex::new(None),
        }
    }

    /// Reserves the record's place in the audit queue (waiting for room, or refused, as the
    /// backpressure policy says). Call once the caller is known, before serving.
    pub async fn reserve(&self) -> enclave_gateway::Result<()> {
        let slot = self.log.reserve().await?;
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot);
        Ok(())
    }

    fn take_slot(&self) -> Option<AuditSlot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Identified) -> R) -> R {
        f(&mut self.identified.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn request_id(&self) -> String {
        self.request_id.clone()
    }

    /// The caller, once authenticated.
    pub fn identify(&self, principal: &Principal) {
        self.with(|i| {
            i.tenant = principal.tenant.clone();
            i.subject = principal.subject();
        });
    }

    pub fn set_model(&self, model: &str) {
        self.with(|i| i.model = model.to_string());
    }

    /// What an admin action changed (ids and names, never secrets or personal data).
    pub fn note(&self, detail: Value) {
        self.with(|i| i.detail = Some(detail));
    }

    /// The redacted prompt, for the record (only when the tenant's policy keeps text).
    pub fn log_prompt(&self, text: &str) {
        self.with(|i| i.prompt_text = Some(text.to_string()));
    }

    /// A redacted completion (one per choice), for the record.
    pub fn log_completion(&self, text: &str) {
        self.with(|i| i.completion_texts.push(text.to_string()));
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    pub fn add_tokens(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion, Ordering::Relaxed);
    }

    /// The finished record, once: later calls (and the drop) get `None`.
    pub fn take_event(&self) -> Option<AuditEvent> {
        if self.recorded.swap(true, Ordering::AcqRel) {
            return None;
        }
        let identified = self.with(std::mem::take);
        Some(AuditEvent {
            at_ms: self.at_ms,
            kind: self.kind,
            request_id: self.request_id.clone(),
            tenant: identified.tenant,
            subject: identified.subject,
            source: self.source.clone(),
            method: self.method.clone(),
            route: self.route.clone(),
            model: identified.model,
            status: self.status.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            latency_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            detail: identified.detail.map(|d| d.to_string()).unwrap_or_default(),
            text: crate::redaction::logged_text(
                identified.prompt_text.as_deref(),
                &identified.completion_texts,
            ),
        })
    }

    /// The record of an admin change that succeeds with `status` and changed `detail`, to be
    /// written in the change's own transaction (the store's `*_audited` methods); call
    /// [`Self::written`] once that committed.
    pub fn change_record(&self, status: u16, detail: &Value) -> AuditEvent {
        let (tenant, subject, model) =
            self.with(|i| (i.tenant.clone(), i.subject.clone(), i.model.clone()));
        AuditEvent {
            at_ms: self.at_ms,
            kind: self.kind,
            request_id: self.request_id.clone(),
            tenant,
            subject,
            source: self.source.clone(),
            method: self.method.clone(),
            route: self.route.clone(),
            model,
            status,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            detail: detail.to_string(),
            text: None,
        }
    }

    /// The record was committed with its change: this trail writes nothing more.
    pub fn written(&self) {
        self.recorded.store(true, Ordering::Release);
        drop(self.take_slot());
    }

    /// Commits the record now (admin actions: the change is not answered unaudited).
    pub async fn commit(&self) {
        let Some(slot) = self.take_slot() else {
            // Refused before authentication: summarised, not committed one by one.
            self.queue();
            return;
        };
        if let Some(event) = self.take_event() {
            slot.record(event);
            let committed = tokio::time::timeout(COMMIT_WAIT, self.log.flush_queued());
            match committed.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, request_id = %self.request_id, "cannot commit an admin action's audit record");
                }
                Err(_) => {
                    tracing::error!(request_id = %self.request_id, "an admin action's audit record is not committed yet (the database is slow or away); it stays queued");
                }
            }
        }
    }

    /// Queues the record into its reserved place; without one (refused before
    /// authentication), counts it into its source's summary.
    fn queue(&self) {
        let slot = self.take_slot();
        let Some(event) = self.take_event() else {
            return;
        };
        match slot {
            Some(slot) => slot.record(event),
            None => self
                .log
                .summarise(&event.source, &event.route, event.status, event.at_ms),
        }
    }
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("request_id", &self.request_id)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        self.queue();
    }
}
