//! Connections under limits. Each listener runs its own accept loop (not `axum::serve`, which
//! gives hyper no timer and so no timeouts): a connection over the global or per-address cap
//! is closed at once and counted; TLS handshakes are bounded in number and time; HTTP/1 waits
//! for a request's headers — a connection's first, or the next on a kept-alive one — at most
//! [`ConnectionLimits::header_read_timeout`]; a request body must arrive whole within
//! [`ConnectionLimits::body_read_timeout`]; a client that stops reading what the server sends
//! is cut off once a write has waited [`ConnectionLimits::send_timeout`]. So slow or silent
//! clients hold only their own address's share of connections, for a bounded time.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::state::AppState;
use crate::tls::{TlsListener, TlsPeer, HANDSHAKE_TIMEOUT};

/// TLS handshakes one client address may have in progress at once.
const HANDSHAKES_PER_ADDRESS: usize = 8;
/// How long a new TLS connection waits for a place among all handshakes.
const HANDSHAKE_QUEUE_WAIT: Duration = Duration::from_secs(1);
/// HTTP/2 streams one connection may have open at once (hyper's default is 200), so the
/// per-address connection cap bounds requests too.
const MAX_HTTP2_STREAMS: u32 = 32;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once on the listener.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_address: usize,
    /// TLS handshakes in progress at once (each also ends after [`HANDSHAKE_TIMEOUT`]).
    pub max_handshakes: usize,
    /// How long HTTP/1 waits for a request's headers, on a new connection or between
    /// requests on a kept-alive one (so it is the idle timeout too).
    pub header_read_timeout: Duration,
    /// How long a request's body may take to arrive, from its headers.
    pub body_read_timeout: Duration,
    /// How long a write to the client may wait (its receive window full: it stopped reading)
    /// before the connection is closed, or a stream is abandoned and its generations cancelled.
    pub send_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_address: 512,
            max_handshakes: 256,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// The connections open on one listener, by client address.
struct Tracker {
    limits: ConnectionLimits,
    listener: &'static str,
    state: Arc<AppState>,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One admitted connection's place; given back when dropped.
struct Slot {
    tracker: Arc<Tracker>,
    address: IpAddr,
}

/// The client a connection is counted against: its IPv4 address, or its IPv6 /64 (one host
/// holds a whole /64, so counting single IPv6 addresses would let it open billions).
fn client_of(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !u128::from(u64::MAX),
        )),
        v4 => v4,
    }
}

impl Tracker {
    fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let address = client_of(address);
        let refused = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let from_address = open.by_address.get(&address).copied().unwrap_or(0);
            if open.total >= self.limits.max_connections {
                Some("max_connections")
            } else if from_address >= self.limits.max_connections_per_address {
                Some("max_connections_per_address")
            } else {
                open.total += 1;
                open.by_address.insert(address, from_address + 1);
                None
            }
        };
        if let Some(reason) = refused {
            self.refuse(reason);
            tracing::debug!(listener = self.listener, %address, reason, "connection refused");
            return None;
        }
        if let Some(metrics) = &self.state.metrics {
            metrics.connection_opened(self.listener);
        }
        Some(Slot {
            tracker: self.clone(),
            address,
        })
    }

    fn refuse(&self, reason: &'static str) {
        if let Some(metrics) = &self.state.metrics {
            metrics.connection_refused(self.listener, reason);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.tracker.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&self.address);
            }
        }
        drop(open);
        if let Some(metrics) = &self.tracker.state.metrics {
            metrics.connection_closed(self.tracker.listener);
        }
    }
}

/// What every connection of one listener shares.
#[derive(Clone)]
struct Shared {
    router: Router,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
    /// How long connections may finish after `stop`.
    grace: Duration,
    /// Held by each connection's task; the listener waits until every clone is gone.
    open: watch::Receiver<()>,
}

/// A listener's tracker and what its connections share; the sender's `closed()` resolves once
/// every connection task has ended.
fn listener_parts(
    router: Router,
    state: Arc<AppState>,
    listener: &'static str,
    stop: &watch::Receiver<bool>,
) -> (Arc<Tracker>, Shared, watch::Sender<()>) {
    let limits = state.config.connections;
    let grace = state.config.shutdown_grace;
    let tracker = Arc::new(Tracker {
        limits,
        listener,
        state,
        open: Mutex::default(),
    });
    let (all_closed, open) = watch::channel(());
    let shared = Shared {
        router,
        limits,
        stop: stop.clone(),
        grace,
        open,
    };
    (tracker, shared, all_closed)
}

/// The next connection, with TCP_NODELAY (without it each small SSE event waits for the
/// client's delayed ACK); `None` once `stop` turns true.
async fn next_connection(
    tcp: &TcpListener,
    stop: &watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((stream, address)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, address));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = stopped(stop.clone()) => return None,
        }
    }
}

/// Serves `router` over plain TCP until `stop` turns true, then waits for the connections
/// to finish (the caller bounds that wait).
pub(crate) async fn serve_tcp(
    tcp: TcpListener,
    router: Router,
    state: Arc<AppState>,
    listener: &'static str,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (tracker, shared, all_closed) = listener_parts(router, state, listener, &stop);
    while let Some((stream, address)) = next_connection(&tcp, &stop).await {
        // Over a cap: the stream is dropped, which closes it.
        let Some(slot) = tracker.admit(address.ip()) else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(stream, address, false, &shared).await;
            drop(slot);
        });
    }
    drop(shared);
    all_closed.closed().await;
    Ok(())
}

/// [`serve_tcp`] over TLS: a connection is admitted before its handshake, and handshakes in
/// progress are bounded, so silent clients cannot pile up handshake tasks.
pub(crate) async fn serve_tls(
    listener: TlsListener,
    router: Router,
    state: Arc<AppState>,
    name: &'static str,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (tcp, config) = listener.into_parts();
    let (tracker, shared, all_closed) = listener_parts(router, state, name, &stop);
    let limits = shared.limits;
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    let handshaking = Arc::new(Tracker {
        limits: ConnectionLimits {
            max_connections: usize::MAX,
            max_connections_per_address: HANDSHAKES_PER_ADDRESS,
            ..limits
        },
        listener: "tls_handshake",
        state: tracker.state.clone(),
        open: Mutex::default(),
    });
    while let Some((stream, address)) = next_connection(&tcp, &stop).await {
        let Some(slot) = tracker.admit(address.ip()) else {
            continue;
        };
        // One client holds at most a few handshakes at once, so silent connections from one
        // address cannot take every handshake place from the others.
        let Some(own) = handshaking.admit(address.ip()) else {
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
        let shared = shared.clone();
        let handshakes = handshakes.clone();
        let tracker = tracker.clone();
        tokio::spawn(async move {
            // A place among all handshakes, waited for briefly (a burst queues, a flood is cut).
            let Ok(Ok(place)) =
                tokio::time::timeout(HANDSHAKE_QUEUE_WAIT, handshakes.acquire_owned()).await
            else {
                tracker.refuse("max_handshakes");
                return;
            };
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%address, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%address, "TLS handshake timed out");
                    return;
                }
            };
            drop((place, own));
            let session = &tls.get_ref().1;
            let http2 = session.alpn_protocol() == Some(b"h2");
            let client_certificate = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| enclave_gateway::client_certificate(cert));
            let peer = TlsPeer {
                address,
                client_certificate,
            };
            serve_connection(tls, peer, http2, &shared).await;
            drop(slot);
        });
    }
    drop(shared);
    all_closed.closed().await;
    Ok(())
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|&stop| stop).await;
}

/// Serves HTTP on one connection until it closes, shutting it down gracefully (requests in
/// flight finish) once the listener stops.
async fn serve_connection<I, P>(io: I, peer: P, http2: bool, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Clone + Send + Sync + 'static,
{
    let _open = shared.open.clone();
    let router = shared.router.clone();
    let body_timeout = shared.limits.body_read_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut request = request.map(|body| Body::new(Deadline::new(body, body_timeout)));
        request.extensions_mut().insert(ConnectInfo(peer.clone()));
        router.clone().oneshot(request)
    });
    let io = TokioIo::new(SendStall::new(io, shared.limits.send_timeout));
    // The two protocols' connections share no trait with `graceful_shutdown`: one loop each.
    macro_rules! drive {
        ($connection:expr) => {{
            let mut connection = std::pin::pin!($connection);
            let mut stopping = std::pin::pin!(stopped(shared.stop.clone()));
            let mut shutting_down = false;
            // After the grace period a connection still open is dropped (its requests
            // cancelled, their audit records queued as their trails drop).
            let mut grace = std::pin::pin!(tokio::time::sleep(Duration::from_secs(86_400 * 365)));
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended");
                        }
                        break;
                    }
                    () = stopping.as_mut(), if !shutting_down => {
                        shutting_down = true;
                        connection.as_mut().graceful_shutdown();
                        grace
                            .as_mut()
                            .reset(tokio::time::Instant::now() + shared.grace);
                    }
                    () = grace.as_mut(), if shutting_down => break,
                }
            }
        }};
    }
    if http2 {
        drive!(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // Pings find peers that vanished without closing.
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20))
                .max_concurrent_streams(MAX_HTTP2_STREAMS)
                .serve_connection(io, service)
        );
    } else {
        drive!(hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(shared.limits.header_read_timeout)
            .serve_connection(io, service));
    }
}

/// A request body that fails once its deadline passes: a client trickling its body holds its
/// connection only that long from the moment the server reads it.
struct Deadline {
    body: Incoming,
    within: Duration,
    /// Started when the body is first read (after authentication and any wait for the audit
    /// queue), so only the client's own pace counts against it.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn new(body: Incoming, within: Duration) -> Self {
        Self {
            body,
            within,
            deadline: None,
        }
    }
}

/// The error a body past its deadline ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub(crate) struct BodyTimedOut;

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let within = self.within;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection whose writes fail once one has waited `within` for the client to take data: a
/// client that stops reading (its receive window full) otherwise holds the connection, its
/// response body and the request's limits and engine places for as long as it likes.
struct SendStall<I> {
    io: I,
    within: Duration,
    /// Armed when a write first waits; disarmed by any write that goes through.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<I> SendStall<I> {
    fn new(io: I, within: Duration) -> Self {
        Self {
            io,
            within,
            deadline: None,
        }
    }

    /// After the inner write answered `poll`: disarm on progress, or arm and check the
    /// deadline while it waits.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.deadline = None;
            return poll;
        }
        let within = self.within;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SendStall<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SendStall<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_never_takes_fails_after_the_send_timeout() {
        // A 64-byte pipe whose reader never reads: the second write waits for good.
        let (near, _far) = tokio::io::duplex(64);
        let mut guarded = SendStall::new(near, Duration::from_secs(30));
        guarded.write_all(&[0; 64]).await.unwrap();
        let started = tokio::time::Instant::now();
        let error = guarded.write_all(&[0; 64]).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        use tokio::io::AsyncReadExt;
        let (near, mut far) = tokio::io::duplex(64);
        let mut guarded = SendStall::new(near, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut buf = [0; 64];
            let mut total = 0;
            // Takes 64 bytes every 20 s: each write waits less than the timeout.
            while total < 64 * 5 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                total += far.read(&mut buf).await.unwrap();
            }
            total
        });
        for _ in 0..5 {
            guarded.write_all(&[0; 64]).await.unwrap();
        }
        guarded.flush().await.unwrap();
        assert_eq!(reader.await.unwrap(), 64 * 5);
    }
}
