//! Connection-level attacks on loopback, each bounded in time and count: slow and silent
//! clients (slowloris) hold only their own address's share of connections and are closed after
//! the header-read timeout; a body trickled past its deadline is a 408; an idle kept-alive
//! connection is closed; clients from other addresses are served throughout.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use enclave_server::{ConnectionLimits, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::{server_config, TestServer};

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        max_connections: 64,
        max_connections_per_address: 8,
        max_handshakes: 4,
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    }
}

async fn server() -> (TestServer, SocketAddr) {
    let server = TestServer::listen(ServerConfig {
        connections: limits(),
        ..server_config()
    })
    .await;
    let address = server.base.trim_start_matches("http://").parse().unwrap();
    (server, address)
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.x).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the server closes the connection (or `within` passes: `None`); returns what
/// it sent.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

async fn livez_from(from: &str, base: &str) -> u16 {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    client
        .get(format!("{base}/livez"))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_hold_only_their_own_addresses_share_and_are_timed_out() {
    let (server, address) = server().await;
    // Eight slowloris connections from one address: each has sent part of its headers.
    let mut slow = Vec::new();
    for _ in 0..limits().max_connections_per_address {
        let mut stream = connect_from("127.0.0.2", address).await;
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: enclave\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    // A ninth from the same address is closed at once, unanswered.
    let mut ninth = connect_from("127.0.0.2", address).await;
    let _ = ninth
        .write_all(b"GET /livez HTTP/1.1\r\nHost: enclave\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut ninth, Duration::from_secs(5)).await;
    assert_eq!(
        answer.as_deref(),
        Some(""),
        "over the per-address cap: closed unanswered"
    );
    // Another address is served meanwhile.
    assert_eq!(livez_from("127.0.0.3", &server.base).await, 200);
    // The slow ones are closed by the header-read timeout (1 s here), well within 5 s.
    for stream in &mut slow {
        assert!(
            read_until_closed(stream, Duration::from_secs(5))
                .await
                .is_some(),
            "a slowloris connection outlived the header-read timeout"
        );
    }
    // Their places are free again.
    assert_eq!(livez_from("127.0.0.2", &server.base).await, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_wide_cap_holds_and_frees_places_as_connections_close() {
    let (server, address) = server().await;
    // Eight addresses with eight silent connections each fill the listener's 64 places.
    let mut silent = Vec::new();
    for host in 10..18 {
        for _ in 0..8 {
            silent.push(connect_from(&format!("127.0.0.{host}"), address).await);
        }
    }
    // Let the server accept them all, then a 65th, from a fresh address, is refused.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = connect_from("127.0.0.30", address).await;
    let _ = over
        .write_all(b"GET /livez HTTP/1.1\r\nHost: enclave\r\n\r\n")
        .await;
    assert_eq!(
        read_until_closed(&mut over, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("")
    );
    drop(silent);
    // Closed by their clients, the places come back (within the accept loop's pace).
    let deadline = Instant::now() + Duration::from_secs(5);
    while livez_from("127.0.0.30", &server.base).await != 200 {
        assert!(Instant::now() < deadline, "places were not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_past_its_deadline_is_a_408() {
    let (server, address) = server().await;
    let mut stream = connect_from("127.0.0.4", address).await;
    stream
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: enclave\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let (mut read, mut write) = stream.into_split();
    // A byte every 200 ms: each arrives well within any per-read timeout, the whole never.
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if write.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut answer)).await;
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive in time"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(15));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed() {
    let (server, address) = server().await;
    let mut stream = connect_from("127.0.0.5", address).await;
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: enclave\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then idle: closed after the header-read timeout (1 s here).
    let rest = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(rest.as_deref(), Some(""), "an idle connection stayed open");
    server.shutdown().await.unwrap();
}
