//! The bounded pool for a request's heavy CPU work (redacting or tokenizing megabytes): run on
//! Tokio's blocking threads, at most one job per core at a time, so it never stalls the async
//! workers that every connection shares, and a flood of such requests queues (waiting
//! asynchronously) instead of taking every thread.

use std::sync::LazyLock;

use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Texts shorter than this are cheaper to handle in place than to hand to another thread.
pub(crate) const INLINE_BYTES: usize = 16 << 10;

static PERMITS: LazyLock<Semaphore> = LazyLock::new(|| {
    Semaphore::new(std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get))
});

/// Runs `work` on the pool once a place is free.
pub(crate) async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = PERMITS
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the work pool is closed"))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ApiError::internal("the server hit a bug while handling this request"))
}
