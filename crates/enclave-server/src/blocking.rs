//! The bounded pool for a request's heavy CPU work (redacting or tokenizing megabytes): run on
//! Tokio's blocking threads, at most one job per core at a time, so it never stalls the async
//! workers that every connection shares, and a flood of such requests queues (waiting
//! asynchronously) instead of taking every thread.

use std::sync::{Arc, LazyLock};

use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Texts shorter than this are cheaper to handle in place than to hand to another thread.
pub(crate) const INLINE_BYTES: usize = 16 << 10;

static PERMITS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| {
    Arc::new(Semaphore::new(
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
    ))
});

/// Runs `work` on the pool once a place is free. The place goes with the work, not with the
/// request: a client that disconnects mid-way frees it only when the work is done.
pub(crate) async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let permit = PERMITS
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("the work pool is closed"))?;
    tokio::task::spawn_blocking(move || {
        let result = work();
        drop(permit);
        result
    })
    .await
    .map_err(|_| ApiError::internal("the server hit a bug while handling this request"))
}
