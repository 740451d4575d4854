//! Prometheus metrics, served as `GET /metrics` on the admin listener (`metrics:read`): HTTP
//! requests by listener, route and status, their durations, authentication failures and
//! rate-limit refusals, and the engine's counters (requests, tokens, KV blocks, prefix cache,
//! preemptions) read when scraped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use enclave_engine::ServingStats;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::error::ApiError;
use crate::state::AppState;

/// The deployment's own tenant, whose keys may read server-wide metrics.
const SERVER_TENANT: &str = "default";

/// Request durations (seconds): from milliseconds (tokenize, models) to minutes (long
/// generations, non-streamed).
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The engine's monotonic counters, as Prometheus counters set from its statistics.
struct EngineCounters {
    submitted: IntCounter,
    cancelled: IntCounter,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    tokens_computed: IntCounter,
    steps: IntCounter,
    preemptions: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    evictions: IntCounter,
}

/// Every metric of one server.
pub(crate) struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    auth_failures: IntCounter,
    rate_limited: IntCounter,
    ready: IntGauge,
    running: IntGauge,
    waiting: IntGauge,
    kv_blocks: IntGaugeVec,
    connections_open: IntGaugeVec,
    connections_refused: IntCounterVec,
    audit_queue_depth: IntGauge,
    audit_queue_capacity: IntGauge,
    /// By outcome: dropped (the writer had stopped), rejected (`reject` policy),
    /// summarised (refused before authentication).
    audit_records: IntCounterVec,
    /// Serialises scrapes: the engine counters advance by the difference to the last one.
    engine: Mutex<EngineCounters>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let http_requests = IntCounterVec::new(
            Opts::new(
                "enclave_http_requests_total",
                "HTTP requests answered, by listener, method, route and status",
            ),
            &["listener", "method", "route", "status"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "enclave_http_request_duration_seconds",
                "Time until the response starts (for streams: until the first byte), by listener, method and route",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["listener", "method", "route"],
        )?;
        registry.register(Box::new(http_duration.clone()))?;
        let kv_blocks = IntGaugeVec::new(
            Opts::new(
                "enclave_kv_cache_blocks",
                "KV-cache blocks by state: used (held by requests), cached (free but holding a reusable prefix), free",
            ),
            &["state"],
        )?;
        registry.register(Box::new(kv_blocks.clone()))?;
        let connections_open = IntGaugeVec::new(
            Opts::new(
                "enclave_connections_open",
                "Client connections open, by listener",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "enclave_connections_refused_total",
                "Client connections closed at once, by listener and the limit they met \
                 (max_connections, max_connections_per_address, max_handshakes)",
            ),
            &["listener", "reason"],
        )?;
        registry.register(Box::new(connections_refused.clone()))?;
        let audit_records = IntCounterVec::new(
            Opts::new(
                "enclave_audit_records_total",
                "Audit records not written one by one, by outcome: dropped (the writer had \
                 stopped), rejected (a request refused under \
                 on_backpressure = reject), summarised (a refusal before authentication)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(audit_records.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new("enclave_build_info", "The running version (always 1)"),
            &["version"],
        )?;
        registry.register(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let engine = EngineCounters {
            submitted: counter(
                "enclave_requests_submitted_total",
                "Generation requests accepted by the engine (one per choice)",
            )?,
            cancelled: counter(
                "enclave_requests_cancelled_total",
                "Generation requests dropped by their client before finishing",
            )?,
            prompt_tokens: counter(
                "enclave_prompt_tokens_total",
                "Prompt tokens of accepted requests",
            )?,
            generated_tokens: counter("enclave_generation_tokens_total", "Tokens generated")?,
            tokens_computed: counter(
                "enclave_tokens_computed_total",
                "Tokens run through the model (prefill and decode; cached prefixes are not)",
            )?,
            steps: counter("enclave_engine_steps_total", "Batched forward passes")?,
            preemptions: counter(
                "enclave_preemptions_total",
                "Requests preempted (blocks freed, recomputed later) when the KV cache ran out",
            )?,
            prefix_queries: counter(
                "enclave_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            )?,
            prefix_hits: counter(
                "enclave_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache",
            )?,
            evictions: counter(
                "enclave_prefix_cache_evictions_total",
                "Cached blocks evicted for new requests",
            )?,
        };
        Ok(Self {
            http_requests,
            http_duration,
            auth_failures: counter(
                "enclave_auth_failures_total",
                "Requests refused for missing or invalid credentials (401)",
            )?,
            rate_limited: counter(
                "enclave_rate_limited_total",
                "Requests refused by a rate limit (429)",
            )?,
            ready: gauge("enclave_model_ready", "1 once the model is loaded and warm")?,
            running: gauge(
                "enclave_requests_running",
                "Requests being computed (holding KV blocks)",
            )?,
            waiting: gauge("enclave_requests_waiting", "Requests queued for admission")?,
            kv_blocks,
            connections_open,
            connections_refused,
            audit_queue_depth: gauge(
                "enclave_audit_queue_depth",
                "Audit records queued (or places reserved) for the writer",
            )?,
            audit_queue_capacity: gauge(
                "enclave_audit_queue_capacity",
                "Audit records the queue holds at most",
            )?,
            audit_records,
            engine: Mutex::new(engine),
            registry,
        })
    }

    /// Counts one answered request (`route` is the registered pattern, never the raw path, so
    /// the label set stays small).
    pub fn observe(
        &self,
        listener: &str,
        method: &str,
        route: &str,
        status: StatusCode,
        took: Duration,
    ) {
        self.http_requests
            .with_label_values(&[listener, method, route, status.as_str()])
            .inc();
        self.http_duration
            .with_label_values(&[listener, method, route])
            .observe(took.as_secs_f64());
    }

    pub fn connection_opened(&self, listener: &str) {
        self.connections_open.with_label_values(&[listener]).inc();
    }

    pub fn connection_closed(&self, listener: &str) {
        self.connections_open.with_label_values(&[listener]).dec();
    }

    pub fn connection_refused(&self, listener: &str, reason: &str) {
        self.connections_refused
            .with_label_values(&[listener, reason])
            .inc();
    }

    pub fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// The exposition text, with the engine's and the audit queue's numbers read now.
    fn render(
        &self,
        ready: bool,
        stats: Option<ServingStats>,
        audit: Option<enclave_gateway::AuditQueueStats>,
    ) -> Result<String, String> {
        self.ready.set(i64::from(ready));
        if let Some(audit) = audit {
            self.audit_queue_depth.set(gauge_value(audit.depth));
            self.audit_queue_capacity.set(gauge_value(audit.capacity));
            for (outcome, total) in [
                ("dropped", audit.dropped),
                ("rejected", audit.rejected),
                ("summarised", audit.summarised),
            ] {
                advance_to(&self.audit_records.with_label_values(&[outcome]), total);
            }
        }
        if let Some(stats) = stats {
            let scheduler = &stats.scheduler;
            let blocks = &scheduler.blocks;
            self.running.set(gauge_value(scheduler.running as u64));
            self.waiting.set(gauge_value(scheduler.waiting as u64));
            for (state, n) in [
                ("used", blocks.used),
                ("cached", blocks.cached_free),
                ("free", blocks.free),
            ] {
                self.kv_blocks
                    .with_label_values(&[state])
                    .set(gauge_value(n as u64));
            }
            let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
            for (counter, value) in [
                (&engine.submitted, stats.submitted),
                (&engine.cancelled, stats.cancelled),
                (&engine.prompt_tokens, stats.prompt_tokens),
                (&engine.generated_tokens, stats.generated_tokens),
                (&engine.tokens_computed, scheduler.tokens_computed),
                (&engine.steps, stats.steps),
                (&engine.preemptions, scheduler.preemptions),
                (&engine.prefix_queries, blocks.prefix_queries),
                (&engine.prefix_hits, blocks.prefix_hits),
                (&engine.evictions, blocks.evictions),
            ] {
                advance_to(counter, value);
            }
        }
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .map_err(|e| e.to_string())?;
        String::from_utf8(text).map_err(|e| e.to_string())
    }
}

/// Moves a counter up to an engine total (which never decreases).
fn advance_to(counter: &IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `GET /metrics`: the Prometheus text format. The series are the whole server's (every
/// tenant's traffic together), so only a `metrics:read` key of the `default` tenant — the
/// deployment's own — may read them; another tenant's key reads its usage at
/// `/admin/v1/usage`.
pub(crate) async fn scrape(
    State(state): State<Arc<AppState>>,
    caller: Option<axum::Extension<enclave_gateway::Principal>>,
) -> Response {
    if caller.is_some_and(|axum::Extension(caller)| caller.tenant != SERVER_TENANT) {
        return ApiError::denied(format!(
            "`/metrics` shows the whole server's traffic and needs a `metrics:read` key of the \
             `{SERVER_TENANT}` tenant; a tenant's own numbers are at /admin/v1/usage"
        ))
        .into_response();
    }
    let Some(metrics) = &state.metrics else {
        return ApiError::internal("the metrics registry could not be built").into_response();
    };
    let stats = state.engine().map(|engine| engine.stats());
    let audit = state.audit_log().map(enclave_gateway::AuditLog::stats);
    match metrics.render(state.is_ready(), stats, audit) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the metrics");
            ApiError::internal("the metrics cannot be encoded").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_builds_and_renders() {
        let metrics = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
        metrics.observe(
            "api",
            "POST",
            "/v1/completions",
            StatusCode::OK,
            Duration::from_millis(30),
        );
        metrics.auth_failed();
        let text = metrics
            .render(false, Some(ServingStats::default()), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains(
            "enclave_http_requests_total{listener=\"api\",method=\"POST\",route=\"/v1/completions\",status=\"200\"} 1"
        ));
        assert!(text.contains("enclave_auth_failures_total 1"));
        assert!(text.contains("enclave_model_ready 0"));
        let stats = |generated_tokens| ServingStats {
            generated_tokens,
            ..ServingStats::default()
        };
        metrics
            .render(true, Some(stats(7)), None)
            .unwrap_or_default();
        let text = metrics
            .render(true, Some(stats(12)), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            text.contains("enclave_generation_tokens_total 12"),
            "{text}"
        );
    }
}
