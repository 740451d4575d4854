//! Server-sent events: `data: {chunk}` lines separated by blank lines, ending with
//! `data: [DONE]`. A producer task feeds a bounded channel; when the client disconnects the
//! body is dropped, the task's next send (or its wait on `closed`) fails, and dropping its
//! request streams cancels the generations. A client that stays connected but stops reading
//! fills the channel: once a send has waited the connection's send timeout the task gives up
//! the same way, and the request's limits are released at once (an HTTP/2 stream the client
//! never opens its window for may keep the body, but not the slots).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use enclave_engine::Event;

use crate::generation::{ChoiceStream, Meter};
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;

/// Where a stream's producer sends its events.
pub(crate) struct EventSender {
    tx: mpsc::Sender<Result<SseEvent, Infallible>>,
    send_timeout: Duration,
    meter: Meter,
    /// Set when a send waited out the timeout: the request's limits are released once the
    /// producer (and with it the choice streams, which charge what they left unread) is done.
    abandoned: Arc<AtomicBool>,
}

/// An SSE response whose events `produce` sends; a send waits at most `send_timeout` for the
/// client to read.
pub(crate) fn sse_response<F, Fut>(send_timeout: Duration, meter: Meter, produce: F) -> Response
where
    F: FnOnce(EventSender) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let abandoned = Arc::new(AtomicBool::new(false));
    let producing = produce(EventSender {
        tx,
        send_timeout,
        meter: meter.clone(),
        abandoned: abandoned.clone(),
    });
    tokio::spawn(async move {
        producing.await;
        if abandoned.load(Ordering::Acquire) {
            if let Some(meter) = meter {
                meter.release_limits();
            }
        }
    });
    let events = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Sse::new(events).into_response()
}

impl EventSender {
    /// Resolves once the client is gone (the body dropped).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// Sends the closing `data: [DONE]`; `false` when the client is gone or stopped reading.
pub(crate) async fn send_done(tx: &EventSender) -> bool {
    deliver(tx, SseEvent::default().data("[DONE]")).await
}

/// Sends one JSON chunk; `false` when the client is gone or has stopped reading.
pub(crate) async fn send(tx: &EventSender, chunk: &Value) -> bool {
    deliver(tx, SseEvent::default().data(chunk.to_string())).await
}

async fn deliver(tx: &EventSender, event: SseEvent) -> bool {
    match tokio::time::timeout(tx.send_timeout, tx.tx.send(Ok(event))).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            tracing::info!(
                seconds = tx.send_timeout.as_secs(),
                "the client stopped reading its stream; generation cancelled"
            );
            if let Some(meter) = &tx.meter {
                meter.note(serde_json::json!({"stream": "abandoned: the client stopped reading"}));
            }
            tx.abandoned.store(true, Ordering::Release);
            false
        }
    }
}

type Tagged = Pin<Box<dyn Stream<Item = (usize, Event)> + Send>>;

/// The events of several choices as they come, each tagged with its choice index.
pub(crate) fn merge(streams: Vec<ChoiceStream>) -> SelectAll<Tagged> {
    stream::select_all(streams.into_iter().enumerate().map(|(index, s)| {
        let events = stream::unfold(s, |mut s| async move { s.next().await.map(|e| (e, s)) });
        Box::pin(events.map(move |e| (index, e))) as Tagged
    }))
}
