//! Rate limits and usage at the edge: each authenticated request is admitted against its key's
//! and tenant's limits (or refused with 429), counted in the usage ledger, and charged for its
//! prompt and completion tokens as the engine produces them. The admission — which holds the
//! request's concurrency slots — lives as long as the response body, streams included.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use enclave_gateway::{
    unix_time, Admission, Principal, Quota, Quotas, RateLimiter, Refusal, UsageCounts, UsageLedger,
};
use http_body::{Frame, SizeHint};

use crate::audit::AuditTrail;
use crate::error::ApiError;

/// The limiter and ledger every request shares.
#[derive(Debug, Default)]
pub struct Metering {
    limiter: Arc<RateLimiter>,
    ledger: Arc<UsageLedger>,
}

impl Metering {
    /// The usage counted and not yet written to the database (the binary flushes it).
    pub fn ledger(&self) -> &Arc<UsageLedger> {
        &self.ledger
    }

    /// Admits a request of `principal`, counting it, or refuses it with a 429.
    pub(crate) fn admit(
        &self,
        principal: &Principal,
        trail: Option<Arc<AuditTrail>>,
    ) -> Result<Arc<RequestMeter>, ApiError> {
        let subjects = principal.rate_subjects();
        let admission = if subjects.is_empty() {
            None
        } else {
            match self.limiter.admit(subjects) {
                Ok(admission) => Some(admission),
                Err(refusal) => {
                    return Err(too_many(&principal.subject(), &principal.tenant, &refusal))
                }
            }
        };
        let meter = RequestMeter {
            admission: Mutex::new(admission),
            ledger: self.ledger.clone(),
            tenant: principal.tenant.clone(),
            key_id: principal.key_id().to_string(),
            subject: principal.subject(),
            trail,
            refused: AtomicBool::new(false),
            counted: AtomicBool::new(false),
        };
        Ok(Arc::new(meter))
    }
}

/// One admitted request's account.
#[derive(Debug)]
pub(crate) struct RequestMeter {
    /// Taken out early when a stream is abandoned ([`Self::release_limits`]).
    admission: Mutex<Option<Admission>>,
    ledger: Arc<UsageLedger>,
    tenant: String,
    key_id: String,
    /// Who is calling, for logs.
    subject: String,
    /// The request's audit record, which counts its tokens too.
    trail: Option<Arc<AuditTrail>>,
    /// Refused by its claim: not counted as a request in usage.
    refused: AtomicBool,
    /// Counted as a request in usage (once: at its claim, its answer, or its end).
    counted: AtomicBool,
}

impl RequestMeter {
    /// The model the request runs on, for its audit record.
    pub fn set_model(&self, model: &str) {
        if let Some(trail) = &self.trail {
            trail.set_model(model);
        }
    }

    /// What an admin action changed (or what a prompt held), for the audit record.
    pub fn note(&self, detail: serde_json::Value) {
        if let Some(trail) = &self.trail {
            trail.note(detail);
        }
    }

    /// The request's audit trail (for an admin change's record in its own transaction).
    pub fn trail(&self) -> Option<&Arc<AuditTrail>> {
        self.trail.as_ref()
    }

    pub fn log_prompt(&self, text: &str) {
        if let Some(trail) = &self.trail {
            trail.log_prompt(text);
        }
    }

    pub fn log_completion(&self, text: &str) {
        if let Some(trail) = &self.trail {
            trail.log_completion(text);
        }
    }

    pub fn charge_prompt(&self, tokens: usize) {
        self.charge(UsageCounts {
            prompt_tokens: tokens as u64,
            ..UsageCounts::default()
        });
    }

    pub fn charge_completion(&self, tokens: usize) {
        self.charge(UsageCounts {
            completion_tokens: tokens as u64,
            ..UsageCounts::default()
        });
    }

    /// Claims a slot per generation (`sequences` more) and reserves the most tokens they can
    /// use, once the request's size is known; refused with a 429 (or a 400 naming `param` when
    /// no wait would help) before anything is queued.
    pub fn claim(&self, sequences: usize, tokens: usize, param: &str) -> Result<(), ApiError> {
        let mut guard = self.admission();
        let Some(admission) = guard.as_mut() else {
            return Ok(());
        };
        let asked = admission.sequences() + sequences as u64;
        let claimed = admission.claim(sequences as u64, tokens as u64);
        drop(guard);
        if claimed.is_ok() {
            self.count();
        }
        claimed.map_err(|refusal| {
            self.refused.store(true, Ordering::Release);
            if refusal.never_fits {
                ApiError::invalid(
                    Some(param.to_string()),
                    format!(
                        "this request runs {asked} generations at once (prompts × `n`), \
                             more than {} limit of concurrent requests",
                        whose(&refusal)
                    ),
                )
            } else {
                too_many(&self.subject, &self.tenant, &refusal)
            }
        })
    }

    /// Counts the request in usage, once, unless its limits refused it.
    fn count(&self) {
        if !self.refused.load(Ordering::Acquire) && !self.counted.swap(true, Ordering::AcqRel) {
            self.record(UsageCounts {
                requests: 1,
                ..UsageCounts::default()
            });
        }
    }

    /// Gives back the request's concurrency slots now, before its response body is dropped
    /// (a client that stopped reading may keep that alive).
    pub fn release_limits(&self) {
        drop(self.admission().take());
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Option<Admission>> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn charge(&self, counts: UsageCounts) {
        if let Some(admission) = self.admission().as_mut() {
            admission.charge_tokens(counts.prompt_tokens + counts.completion_tokens);
        }
        if let Some(trail) = &self.trail {
            trail.add_tokens(counts.prompt_tokens, counts.completion_tokens);
        }
        self.record(counts);
    }

    fn record(&self, counts: UsageCounts) {
        self.ledger
            .record(&self.tenant, &self.key_id, unix_time(), counts);
    }

    /// The quotas as they stood at admission.
    fn quotas(&self) -> Option<Quotas> {
        self.admission().as_ref().map(|a| a.quotas)
    }
}

impl Drop for RequestMeter {
    /// A request whose handler was dropped before answering (its client left) still counts.
    fn drop(&mut self) {
        self.count();
    }
}

/// `x-ratelimit-*` headers on every response of a limited caller, and the admission kept until
/// the body has been sent.
pub(crate) fn finish(meter: Arc<RequestMeter>, response: Response) -> Response {
    // Counted once answered (or claimed, or ended), unless its limits refused it.
    meter.count();
    let quotas = meter.quotas();
    let (mut parts, body) = response.into_parts();
    if let Some(quotas) = quotas {
        quota_headers(&mut parts.headers, &quotas);
    }
    Response::from_parts(parts, hold_until_sent(body, meter))
}

/// `body`, keeping `held` alive until the body has been sent (or dropped by a client gone).
pub(crate) fn hold_until_sent<T: Send + Sync + Unpin + 'static>(body: Body, held: T) -> Body {
    Body::new(HoldingBody {
        inner: body,
        _held: held,
    })
}

fn whose(refusal: &Refusal) -> &'static str {
    match &refusal.subject {
        enclave_gateway::Subject::Key(_) => "this key's",
        enclave_gateway::Subject::Tenant(_) => "the tenant's",
    }
}

fn too_many(subject: &str, tenant: &str, refusal: &Refusal) -> ApiError {
    let whose = whose(refusal);
    tracing::info!(%subject, %tenant, limit = refusal.limit, "rate limited");
    let retry = refusal.retry_after.as_secs_f64().ceil().max(1.0) as u32;
    let mut error = ApiError::rate_limited(format!(
        "{whose} limit of {} is reached; retry in {retry} s",
        refusal.limit
    ));
    error.retry_after = Some(retry);
    let mut headers = HeaderMap::new();
    quota_headers(&mut headers, &refusal.quotas);
    error.headers = Some(Box::new(headers));
    error
}

fn quota_headers(headers: &mut HeaderMap, quotas: &Quotas) {
    for (kind, quota) in [("requests", quotas.requests), ("tokens", quotas.tokens)] {
        let Some(Quota {
            limit,
            remaining,
            reset,
        }) = quota
        else {
            continue;
        };
        for (name, value) in [
            (format!("x-ratelimit-limit-{kind}"), limit.to_string()),
            (
                format!("x-ratelimit-remaining-{kind}"),
                remaining.to_string(),
            ),
            (format!("x-ratelimit-reset-{kind}"), duration_text(reset)),
        ] {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
    }
}

/// OpenAI's spelling of a reset time: `1m12s`, `6.5s`, `0s`.
fn duration_text(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    let minutes = (seconds / 60.0).floor();
    let rest = seconds - minutes * 60.0;
    let rest = (rest * 10.0).ceil() / 10.0;
    if minutes >= 1.0 {
        format!("{minutes}m{rest}s")
    } else {
        format!("{rest}s")
    }
}

struct HoldingBody<T> {
    inner: Body,
    _held: T,
}

impl<T: Send + Sync + Unpin + 'static> http_body::Body for HoldingBody<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_times_read_like_openai() {
        assert_eq!(duration_text(Duration::from_millis(6_420)), "6.5s");
        assert_eq!(duration_text(Duration::from_secs(72)), "1m12s");
        assert_eq!(duration_text(Duration::ZERO), "0s");
    }
}
