//! Server-sent events: `data: {chunk}` lines separated by blank lines, ending with
//! `data: [DONE]`. A producer task feeds a bounded channel; when the client disconnects the
//! body is dropped, the task's next send (or its wait on `closed`) fails, and dropping its
//! request streams cancels the generations.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use enclave_engine::Event;

use crate::generation::ChoiceStream;
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;

pub(crate) type EventSender = mpsc::Sender<Result<SseEvent, Infallible>>;

/// An SSE response whose events `produce` sends.
pub(crate) fn sse_response<F, Fut>(produce: F) -> Response
where
    F: FnOnce(EventSender) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(produce(tx));
    let events = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Sse::new(events).into_response()
}

/// Sends one JSON chunk; `false` when the client is gone.
pub(crate) async fn send(tx: &EventSender, chunk: &Value) -> bool {
    tx.send(Ok(SseEvent::default().data(chunk.to_string())))
        .await
        .is_ok()
}

type Tagged = Pin<Box<dyn Stream<Item = (usize, Event)> + Send>>;

/// The events of several choices as they come, each tagged with its choice index.
pub(crate) fn merge(streams: Vec<ChoiceStream>) -> SelectAll<Tagged> {
    stream::select_all(streams.into_iter().enumerate().map(|(index, s)| {
        let events = stream::unfold(s, |mut s| async move { s.next().await.map(|e| (e, s)) });
        Box::pin(events.map(move |e| (index, e))) as Tagged
    }))
}
