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

mod auth;
mod chat;
mod completions;
mod error;
mod extract;
mod generation;
mod models;
pub mod reasoning;
mod sse;
mod state;
mod tokenize;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

pub use auth::{Access, ROUTES};
pub use error::ApiError;
pub use state::{AppState, ServerConfig};

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
        .route("/livez", get(|| async { StatusCode::OK }))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the server hit a bug while handling this request").into_response()
        }))
        .with_state(state)
}

/// 200 once the model is loaded and warmed up, 503 before.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        StatusCode::OK.into_response()
    } else {
        ApiError::unavailable("model_loading", "the model is still loading").into_response()
    }
}

/// Serves until `shutdown` resolves, then stops accepting connections and lets requests in
/// flight finish for up to the configured grace period.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.shutdown_grace;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Without TCP_NODELAY, Nagle's algorithm holds each small SSE event until the client's
    // delayed ACK (~40 ms per response).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, router(state)).with_graceful_shutdown({
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|&stop| stop).await;
        }
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut grace_rx = stop_rx;
    tokio::select! {
        result = server => result,
        _ = async move {
            let _ = grace_rx.wait_for(|&stop| stop).await;
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
