//! Authentication and authorization at the edge: every route but liveness and readiness needs
//! credentials (`Authorization: Bearer <key or token>`, or a client certificate bound to a
//! role), and each route names the permission it needs in its table ([`ROUTES`], or
//! `ADMIN_ROUTES` on the admin listener). The middleware wraps the whole router, so a route
//! added later is authenticated whether or not anyone remembered to, and a method and path
//! missing from its table is refused to everyone (405) until it is listed (the tests walk the
//! tables).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use enclave_gateway::{
    AuditEvent, AuditKind, Authenticator, BlockStarted, GatewayError, Offender, Permission,
    Principal,
};

use crate::audit::AuditTrail;
use crate::error::ApiError;
use crate::state::{new_id, AppState};
use crate::tls::TlsPeer;

/// How callers are authenticated.
#[derive(Clone)]
pub enum Access {
    /// API keys from the gateway's database.
    Keys(Arc<Authenticator>),
    /// No authentication: every caller is [`Principal::unauthenticated`]. The binary allows
    /// this only on loopback addresses, and only when asked explicitly.
    Disabled,
}

/// Routes with the permission each needs (`None`: public).
pub type RouteTable = &'static [(&'static str, &'static str, Option<Permission>)];

/// Every route as registered, with the permission it needs; `None` marks the two public
/// probes.
pub const ROUTES: &[(&str, &str, Option<Permission>)] = &[
    ("POST", "/v1/chat/completions", Some(Permission::Inference)),
    ("POST", "/v1/completions", Some(Permission::Inference)),
    ("POST", "/tokenize", Some(Permission::Inference)),
    ("POST", "/detokenize", Some(Permission::Inference)),
    ("GET", "/v1/models", Some(Permission::ModelsRead)),
    ("GET", "/v1/models/{*id}", Some(Permission::ModelsRead)),
    ("GET", "/health", None),
    ("GET", "/livez", None),
];

/// The middleware: resolves the caller, checks the route's permission, and leaves the
/// [`Principal`] in the request's extensions for the handler (model scopes are checked there,
/// where the model is known). Every answer, refusals included, is counted in the metrics.
pub(crate) async fn authorize(
    State((state, routes, listener)): State<(Arc<AppState>, RouteTable, &'static str)>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    // A route is its method and path: `GET /admin/v1/roles` and `POST /admin/v1/roles` may
    // need different permissions.
    let method = request.method().as_str().to_string();
    let needs = route.as_deref().map(|path| {
        routes
            .iter()
            .find(|(m, p, _)| *p == path && *m == method)
            .map(|r| r.2)
    });
    let request_id = new_id("req");
    let source = source_address(&request);
    // Public probes (polled every few seconds) are counted, not audited.
    let public = matches!(needs, Some(Some(None)));
    let trail = match (&state.audit, public) {
        (Some(log), false) => Some(Arc::new(AuditTrail::new(
            log.clone(),
            if listener == "admin" {
                AuditKind::Admin
            } else {
                AuditKind::Api
            },
            request_id.clone(),
            source.clone(),
            method.clone(),
            route.clone().unwrap_or_else(|| "unmatched".into()),
        ))),
        _ => None,
    };
    let mut response = if public {
        next.run(request).await
    } else {
        let context = Context {
            needs,
            route: route.as_deref(),
            method: &method,
            source: &source,
            trail: trail.clone(),
        };
        authorize_and_run(&state, context, request, next).await
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status();
    if let Some(metrics) = &state.metrics {
        if status == StatusCode::UNAUTHORIZED {
            metrics.auth_failed();
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            metrics.rate_limited();
        }
        // Methods and unmatched paths a client makes up share one label each, so no client can
        // grow the label set.
        let method_label = match method.as_str() {
            "GET" | "POST" | "DELETE" | "PUT" | "PATCH" | "HEAD" | "OPTIONS" => method.as_str(),
            _ => "other",
        };
        metrics.observe(
            listener,
            method_label,
            route.as_deref().unwrap_or("unmatched"),
            status,
            started.elapsed(),
        );
    }
    match trail {
        Some(trail) => {
            trail.set_status(status.as_u16());
            if listener == "admin" {
                // An admin action is answered only once its record is committed.
                trail.commit().await;
                response
            } else {
                // Recorded when the body has been sent (streams: at their end).
                let (parts, body) = response.into_parts();
                Response::from_parts(parts, crate::metering::hold_until_sent(body, trail))
            }
        }
        None => response,
    }
}

/// The client's address, as its connection reports it.
fn source_address(request: &Request) -> String {
    if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<TlsPeer>>() {
        return peer.address.ip().to_string();
    }
    if let Some(ConnectInfo(address)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        return address.ip().to_string();
    }
    String::new()
}

/// What the middleware knows of a request before authenticating it.
struct Context<'a> {
    /// The route's permission: `None` if no route matched, `Some(None)` if the route has no
    /// such method in its table.
    needs: Option<Option<Option<Permission>>>,
    route: Option<&'a str>,
    method: &'a str,
    source: &'a str,
    trail: Option<Arc<AuditTrail>>,
}

async fn authorize_and_run(
    state: &AppState,
    context: Context<'_>,
    mut request: Request,
    next: Next,
) -> Response {
    let Context {
        needs,
        route,
        method,
        source,
        trail,
    } = context;
    let principal = match &state.access {
        Access::Disabled => Principal::unauthenticated(),
        Access::Keys(authenticator) => {
            // A bearer key names the caller; without one, a verified client certificate may.
            let presented = if request.headers().contains_key(header::AUTHORIZATION) {
                Presented::Key(bearer(&request))
            } else {
                match request
                    .extensions()
                    .get::<ConnectInfo<TlsPeer>>()
                    .and_then(|peer| peer.0.client_certificate.clone())
                {
                    Some(certificate) => Presented::Certificate(certificate),
                    None => Presented::Key(bearer(&request)),
                }
            };
            // Who to hold responsible for failures: the address, and the key id presented. A
            // request without credentials is no login attempt and counts for nothing.
            let attempted = request.headers().contains_key(header::AUTHORIZATION)
                || matches!(presented, Presented::Certificate(_));
            let address = [Offender::Source(source.to_string())];
            let key = match &presented {
                Presented::Key(Ok(key)) => {
                    enclave_gateway::key_id(key).map(|id| Offender::Key(id.to_string()))
                }
                _ => None,
            };
            // A failure with credentials that name someone (a key id, a certificate) is a
            // login attempt, recorded on its own (the abuse guard bounds how many per source);
            // everything else refused before authentication goes into its source's summary.
            let names_someone = key.is_some() || matches!(presented, Presented::Certificate(_));
            // A blocked address is refused before any credential is checked.
            if let Some(remaining) = state.abuse.blocked(&address, Instant::now()) {
                return ApiError::blocked(remaining).into_response();
            }
            match authenticate(authenticator, presented).await {
                Ok(principal) => principal,
                Err(error) => {
                    if attempted && error.status == StatusCode::UNAUTHORIZED {
                        // A blocked key id refuses wrong secrets only: its owner, with the
                        // right one, is never locked out by someone who knows the id.
                        let key = key.as_slice();
                        if let Some(remaining) = state.abuse.blocked(key, Instant::now()) {
                            return ApiError::blocked(remaining).into_response();
                        }
                        let offenders: Vec<Offender> = address.iter().chain(key).cloned().collect();
                        for block in state.abuse.failed(&offenders, Instant::now()) {
                            blocked(state, &block, source, trail.as_deref());
                        }
                    }
                    if names_someone {
                        if let Some(trail) = &trail {
                            if let Err(e) = trail.reserve().await {
                                tracing::warn!(error = %e, "audit queue: a failed login is summarised");
                            }
                        }
                    }
                    return error.into_response();
                }
            }
        }
    };
    if let Some(trail) = &trail {
        trail.identify(&principal);
        // The record's place is reserved before anything is served, so no served request
        // goes unrecorded; under `reject` a full queue refuses the request instead.
        if let Err(error) = trail.reserve().await {
            tracing::warn!(error = %error, "audit queue: request refused");
            return ApiError::unavailable(
                "audit_unavailable",
                "the audit log cannot take this request's record right now; retry shortly",
            )
            .into_response();
        }
    }
    match needs {
        // A path with no such method in its table: a method the router does not take (405),
        // or one registered but never listed — refused either way until it is listed.
        Some(None) => {
            tracing::info!(route = ?route, %method, "method not in the route table; refused");
            return ApiError::method_not_allowed().into_response();
        }
        Some(Some(Some(permission))) if !principal.can(permission) => {
            tracing::info!(subject = %principal.subject(), tenant = %principal.tenant, route = ?route, %permission, "permission denied");
            return ApiError::forbidden(permission.name()).into_response();
        }
        // Allowed; or no route matched at all (the 404 fallback, after authentication so that
        // unknown callers learn nothing of which routes exist).
        _ => {}
    }
    let meter = match &state.access {
        Access::Disabled => None,
        Access::Keys(_) => match state.metering.admit(&principal, trail) {
            Ok(meter) => Some(meter),
            Err(refused) => return refused.into_response(),
        },
    };
    request.extensions_mut().insert(principal);
    request.extensions_mut().insert(meter.clone());
    let response = next.run(request).await;
    match meter {
        Some(meter) => crate::metering::finish(meter, response),
        None => response,
    }
}

/// A block just started: logged, and a security record in the audit log.
fn blocked(state: &AppState, block: &BlockStarted, source: &str, trail: Option<&AuditTrail>) {
    let (kind, subject) = match &block.offender {
        Offender::Source(_) => ("source", "anonymous".to_string()),
        Offender::Key(id) => ("key", format!("key:{id}")),
    };
    tracing::warn!(offender = %block.offender.describe(), failures = block.failures, seconds = block.duration.as_secs(), "blocked after repeated authentication failures");
    if let Some(log) = &state.audit {
        // Waits for room in the queue off the request's path: a block is never lost to a
        // full queue.
        let log = log.clone();
        let event = AuditEvent {
            at_ms: enclave_gateway::unix_millis(),
            kind: AuditKind::Security,
            request_id: trail.map(AuditTrail::request_id).unwrap_or_default(),
            subject,
            source: source.to_string(),
            detail: serde_json::json!({
                "event": "blocked",
                "offender": kind,
                "failures": block.failures,
                "block_seconds": block.duration.as_secs(),
            })
            .to_string(),
            ..AuditEvent::default()
        };
        tokio::spawn(async move { log.record_waiting(event).await });
    }
}

/// The credentials a request came with.
enum Presented {
    Key(Result<String, ApiError>),
    Certificate(enclave_gateway::ClientCertificate),
}

async fn authenticate(
    authenticator: &Authenticator,
    presented: Presented,
) -> Result<Principal, ApiError> {
    let (result, refusal) = match presented {
        Presented::Key(key) => (
            authenticator.authenticate_bearer(&key?).await,
            "the API key or token is not valid",
        ),
        Presented::Certificate(certificate) => (
            authenticator.authenticate_certificate(&certificate).await,
            "the client certificate is not bound to a role; send an API key",
        ),
    };
    result.map_err(|error| match error {
        GatewayError::Unauthenticated(reason) => {
            tracing::info!(reason, "authentication failed");
            ApiError::unauthenticated(refusal)
        }
        other => {
            tracing::error!(error = %other, "cannot authenticate: the database failed");
            ApiError::unavailable(
                "authentication_unavailable",
                "credentials cannot be checked right now; retry shortly",
            )
        }
    })
}

/// The token of `Authorization: Bearer <token>`, or a 401 saying what was expected.
fn bearer(request: &Request) -> Result<String, ApiError> {
    let expected = "send the API key as `Authorization: Bearer <key>`";
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        tracing::info!("authentication failed: no single Authorization header");
        return Err(ApiError::unauthenticated(format!("no API key: {expected}")));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    token.ok_or_else(|| {
        tracing::info!("authentication failed: malformed Authorization header");
        ApiError::unauthenticated(format!("malformed Authorization header: {expected}"))
    })
}
