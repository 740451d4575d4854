//! How a keyed client fares while the server is attacked, for BENCHMARKS.md:
//! `cargo run --release -p enclave-server --example under_attack`.
//!
//! A real server on loopback (the tiny Qwen2 fixture, keys in SQLite, every tenant's prompts
//! masked) is measured for 10 s quiet, then for 20 s while 1,000 slowloris connections (from
//! 127.0.0.2 and 127.0.0.3, headers trickled a byte every 5 s, reopened when closed) and four
//! clients posting 1 MiB prompts to redact (from 127.0.0.4) run. A keyed client on 127.0.0.5
//! lists the models and asks for a 4-token completion every 250 ms; the example prints the
//! latencies (median, p99, max) of each phase and how many of its requests failed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use enclave_engine::{DTypeChoice, Engine, EngineConfig, EngineHandle, ServingConfig};
use enclave_gateway::{unix_time, Authenticator, Limits, NewKey, Roles, Store};
use enclave_redact::Redactor;
use enclave_server::redaction::{CompletionAction, PromptAction, RedactionPolicies, TenantPolicy};
use enclave_server::{Access, AppState, ServerConfig};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Latencies (ms) of the keyed client's requests for `duration`, and its failures.
async fn measure(base: &str, key: &str, duration: Duration) -> Result<(Vec<f64>, u64), Error> {
    let client = reqwest::Client::builder()
        .local_address("127.0.0.5".parse::<IpAddr>()?)
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut latencies = Vec::new();
    let mut failed = 0;
    let end = Instant::now() + duration;
    while Instant::now() < end {
        for request in [
            client.get(format!("{base}/v1/models")).bearer_auth(key),
            client
                .post(format!("{base}/v1/completions"))
                .bearer_auth(key)
                .json(&json!({"prompt": "Once upon a time", "max_tokens": 4})),
        ] {
            let start = Instant::now();
            match request.send().await {
                Ok(response) if response.status().is_success() => {
                    response.bytes().await?;
                    latencies.push(start.elapsed().as_secs_f64() * 1e3);
                }
                _ => failed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    latencies.sort_by(f64::total_cmp);
    Ok((latencies, failed))
}

fn report(phase: &str, (latencies, failed): &(Vec<f64>, u64)) {
    if latencies.is_empty() {
        println!("{phase}: no request succeeded ({failed} failed)");
        return;
    }
    println!(
        "{phase}: {} requests, median {:.1} ms, p99 {:.1} ms, max {:.1} ms, {failed} failed",
        latencies.len(),
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies[latencies.len() - 1],
    );
}

/// One slowloris connection from `from`, reopened whenever the server closes it.
async fn slowloris(from: IpAddr, to: SocketAddr, stop: Arc<AtomicBool>, opened: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(socket) = TcpSocket::new_v4() else {
            return;
        };
        if socket.bind(SocketAddr::new(from, 0)).is_err() {
            return;
        }
        let Ok(mut stream) = socket.connect(to).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        if stream
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .await
            .is_err()
        {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if stream.write_all(b"X").await.is_err() {
                break;
            }
        }
    }
}

/// Posts 1 MiB prompts (a value every ~150 bytes) to be redacted, one after another.
async fn redaction_flood(base: String, key: String, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let Ok(client) = reqwest::Client::builder()
        .local_address(
            "127.0.0.4"
                .parse::<IpAddr>()
                .unwrap_or(IpAddr::from([127, 0, 0, 4])),
        )
        .build()
    else {
        return;
    };
    let mut text = String::with_capacity(1 << 20);
    let mut i = 0u64;
    while text.len() < 1 << 20 {
        text.push_str("the customer asked about the contract renewal and the invoice, ");
        text.push_str(&format!(
            "mail user{i}@example.com or call 138{:08} ",
            i % 100_000_000
        ));
        i += 1;
    }
    let body = json!({"messages": [{"role": "user", "content": text}], "max_tokens": 1});
    while !stop.load(Ordering::Relaxed) {
        let _ = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await;
        sent.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/qwen2");
    let data = tempfile::tempdir()?;
    let store = Store::connect(&Store::sqlite_url(data.path())).await?;
    let key = store
        .create_key(
            NewKey {
                tenant: "default".into(),
                role: "developer".into(),
                models: vec!["*".into()],
                name: "bench".into(),
                expires_at: None,
                limits: Limits::default(),
                created_by: "bench".into(),
            },
            &Roles::default(),
            unix_time(),
        )
        .await?
        .key;
    let masked = TenantPolicy {
        prompt: PromptAction::Mask,
        completion: CompletionAction::Off,
        store_text: false,
    };
    let config = ServerConfig {
        served_model_name: "tiny".into(),
        redaction: Some(Arc::new(RedactionPolicies {
            redactor: Arc::new(Redactor::default()),
            default: masked,
            tenants: HashMap::new(),
            scoped: HashMap::new(),
        })),
        ..ServerConfig::default()
    };
    let access = Access::Keys(Arc::new(Authenticator::new(store, Roles::default())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let base = format!("http://{address}");
    let state = AppState::new(config, access);
    tokio::spawn(enclave_server::serve(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    let engine = Engine::load(
        &fixtures,
        &EngineConfig {
            dtype: DTypeChoice::F32,
            ..EngineConfig::default()
        },
    )?;
    let serving = ServingConfig {
        kv_cache_bytes: 64 << 20,
        ..ServingConfig::default()
    };
    let handle = EngineHandle::start(engine, serving)?;
    state
        .warm_up_and_serve(handle)
        .await
        .map_err(|e| e.message.clone())?;

    report(
        "quiet (10 s)",
        &measure(&base, &key, Duration::from_secs(10)).await?,
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (opened, sent) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    for i in 0..1_000 {
        let from = IpAddr::from([127, 0, 0, 2 + (i % 2) as u8]);
        tokio::spawn(slowloris(from, address, stop.clone(), opened.clone()));
    }
    for _ in 0..4 {
        tokio::spawn(redaction_flood(
            base.clone(),
            key.clone(),
            stop.clone(),
            sent.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attacked = measure(&base, &key, Duration::from_secs(20)).await?;
    stop.store(true, Ordering::Relaxed);
    report("under attack (20 s)", &attacked);
    println!(
        "attack: {} slowloris connections opened (reopened after each header timeout), {} \
         1 MiB prompts redacted",
        opened.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed)
    );
    Ok(())
}
