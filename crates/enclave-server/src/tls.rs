//! The TLS listener: TCP connections are accepted at once and their handshakes run
//! concurrently, bounded in number (`crate::conn`) and each in time ([`HANDSHAKE_TIMEOUT`]);
//! finished ones are served with the peer's address and, under mTLS, the subject of its
//! certificate. The rustls configuration sits behind a lock that [`TlsConfigHandle::replace`]
//! swaps, so renewed certificates take effect for new connections without a restart.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::TcpListener;

/// How long a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub address: SocketAddr,
    /// The client's certificate (mTLS), verified against the client CA bundle.
    pub client_certificate: Option<enclave_gateway::ClientCertificate>,
}

/// The configuration new handshakes use; replaceable while serving.
#[derive(Clone)]
pub struct TlsConfigHandle(Arc<RwLock<Arc<ServerConfig>>>);

impl TlsConfigHandle {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self(Arc::new(RwLock::new(config)))
    }

    /// From now on, handshakes use `config` (connections already open keep theirs).
    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A TCP listener whose connections are served over TLS ([`crate::serve_tls`] accepts them,
/// under the listener's connection limits).
pub struct TlsListener {
    tcp: TcpListener,
    config: TlsConfigHandle,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: TlsConfigHandle) -> std::io::Result<Self> {
        Ok(Self { tcp, config })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    pub(crate) fn into_parts(self) -> (TcpListener, TlsConfigHandle) {
        (self.tcp, self.config)
    }
}
