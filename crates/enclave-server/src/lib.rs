//! Enclave's OpenAI-compatible HTTP API: chat and text completions (streamed as server-sent
//! events), models, tokenize/detokenize, health. The only crate that knows HTTP and OpenAI
//! JSON; it turns requests into engine requests and engine events into OpenAI responses.
//!
//! Invariants:
//! - Every error a client sees is an OpenAI error object made by [`ApiError`]; a client's
//!   mistake is a 4xx, never a 500, and a panic in a handler becomes a 500, never a dropped
//!   connection.
//! - Every route but `/livez` and `/health` needs credentials and the permission
//!   [`ROUTES`] gives it; a model outside the caller's scope is answered as if it did not exist.
//! - A stream whose client disconnects drops its engine requests, which frees their KV blocks.

pub mod admin;
mod audit;
mod auth;
mod blocking;
mod chat;
mod completions;
mod conn;
mod error;
mod extract;
mod generation;
mod metering;
mod metrics;
mod models;
pub mod reasoning;
pub mod redaction;
mod sse;
mod state;
mod tls;
mod tokenize;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

pub use admin::ADMIN_ROUTES;
pub use auth::{Access, RouteTable, ROUTES};
pub use conn::ConnectionLimits;
pub use error::ApiError;
pub use state::{AppState, ServerConfig, TenantShare};
pub use tls::{TlsConfigHandle, TlsListener, TlsPeer, HANDSHAKE_TIMEOUT};

/// Every route of the API.
pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/completions", post(completions::create))
        .route("/v1/models", get(models::list))
        // Served names may hold slashes (`deepseek-ai/DeepSeek-R1`).
        .route("/v1/models/{*id}", get(models::get))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(health))
        .route("/livez", get(livez))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), ROUTES, "api"),
            auth::authorize,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the server hit a bug while handling this request").into_response()
        }))
        .with_state(state)
}

/// The management API's routes ([`ADMIN_ROUTES`]), for the admin listener alone: none of them
/// exists on the API listener, and no inference route exists here.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/admin/v1/tenants",
            get(admin::list_tenants).post(admin::create_tenant),
        )
        .route(
            "/admin/v1/keys",
            get(admin::list_keys).post(admin::create_key),
        )
        .route(
            "/admin/v1/keys/{id}",
            axum::routing::delete(admin::revoke_key),
        )
        .route("/admin/v1/usage", get(admin::usage))
        .route("/metrics", get(metrics::scrape))
        .route("/admin/v1/audit", get(admin::audit_records))
        .route("/admin/v1/audit/verify", get(admin::audit_verify))
        .route("/admin/v1/audit/erase", post(admin::audit_erase))
        .route(
            "/admin/v1/roles",
            get(admin::list_roles).post(admin::create_role),
        )
        .route(
            "/admin/v1/roles/{name}",
            axum::routing::delete(admin::delete_role),
        )
        .route("/livez", get(livez))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), ADMIN_ROUTES, "admin"),
            auth::authorize,
        ))
        .layer(DefaultBodyLimit::max(1 << 20))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the server hit a bug while handling this request").into_response()
        }))
        .with_state(state)
}

/// 200 while the process can serve (loading included), 503 once its engine has stopped: a
/// dead engine never comes back, so an orchestrator's liveness check should restart the
/// process.
async fn livez(State(state): State<Arc<AppState>>) -> Response {
    if state.engine_stopped() {
        engine_stopped().into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

fn engine_stopped() -> ApiError {
    ApiError::unavailable(
        "engine_stopped",
        "the inference engine has stopped; restart the server",
    )
}

/// 200 once the model is loaded and warmed up, 503 before, and 503 again if its engine stopped
/// (an orchestrator's readiness check then takes this replica out of service).
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if !state.is_ready() {
        ApiError::unavailable("model_loading", "the model is still loading").into_response()
    } else if state.engine_stopped() {
        engine_stopped().into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

/// Serves plain HTTP until `shutdown` resolves, then stops accepting connections and lets
/// requests in flight finish for up to the configured grace period. Connections are held to
/// the configured [`ConnectionLimits`].
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(state.clone());
    serve_plain(listener, router, state, "api", shutdown).await
}

/// Serves the management API ([`admin_router`]) on its own listener until `shutdown`.
pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = admin_router(state.clone());
    serve_plain(listener, router, state, "admin", shutdown).await
}

/// One plain-HTTP listener named `name` serving `router` until `shutdown`.
async fn serve_plain(
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    name: &'static str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = state.config.shutdown_grace;
    let server = conn::serve_tcp(listener, router, state, name, stop_rx.clone());
    run_until_stopped(server, shutdown, stop_tx, stop_rx, grace).await
}

/// [`serve_admin`] over TLS.
pub async fn serve_admin_tls(
    listener: TlsListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = state.config.shutdown_grace;
    let server = conn::serve_tls(
        listener,
        admin_router(state.clone()),
        state,
        "admin",
        stop_rx.clone(),
    );
    run_until_stopped(server, shutdown, stop_tx, stop_rx, grace).await
}

/// [`serve`] over TLS: the peer's certificate subject (mTLS) reaches the authentication.
pub async fn serve_tls(
    listener: TlsListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = state.config.shutdown_grace;
    let server = conn::serve_tls(
        listener,
        router(state.clone()),
        state,
        "api",
        stop_rx.clone(),
    );
    run_until_stopped(server, shutdown, stop_tx, stop_rx, grace).await
}

async fn stopped(mut stop_rx: tokio::sync::watch::Receiver<bool>) {
    let _ = stop_rx.wait_for(|&stop| stop).await;
}

/// Runs `server` until it ends, or until `grace` after `shutdown` resolved.
async fn run_until_stopped(
    server: impl std::future::IntoFuture<Output = std::io::Result<()>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    stop_tx: tokio::sync::watch::Sender<bool>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        result = server.into_future() => result,
        _ = async move {
            stopped(stop_rx).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "grace period over; closing connections still open");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
}
