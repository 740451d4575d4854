//! The real server on an ephemeral port with tiny fixture models, driven over HTTP by a real
//! client (reqwest): every endpoint, streaming framing, usage, errors, cancellation, shutdown.

// Test helpers may panic: a failed request is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod api;
mod audit;
mod auth;
mod connections;
mod dify;
mod errors;
mod lifecycle;
mod limits;
mod reasoning;
mod redaction;
mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use enclave_engine::{DTypeChoice, Engine, EngineConfig, EngineHandle, ServingConfig};
use enclave_server::{AppState, ServerConfig};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The real DeepSeek tokenizer files, beside the repository (`../shared/fixtures`).
pub fn shared_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

pub fn load(dir: &Path) -> Engine {
    Engine::load(
        dir,
        &EngineConfig {
            dtype: DTypeChoice::F32,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

pub fn serving_config() -> ServingConfig {
    ServingConfig {
        block_size: 16,
        kv_cache_bytes: 64 << 20,
        max_num_seqs: 32,
        max_num_batched_tokens: 512,
        prefix_caching: true,
        max_waiting_requests: 256,
        max_outstanding_per_flow: None,
    }
}

pub const MODEL: &str = "tiny-qwen2";

/// The gateway's database for one test: a SQLite file in `dir`, or — with
/// `ENCLAVE_TEST_DATABASE=postgres` (`.ci/run` runs this suite a second time so) — a fresh
/// database on the PostgreSQL server at `ENCLAVE_TEST_POSTGRES_URL`.
pub async fn test_store(dir: &Path) -> enclave_gateway::Store {
    use enclave_gateway::Store;
    let url = match std::env::var("ENCLAVE_TEST_DATABASE").as_deref() {
        Ok("postgres") => {
            let admin = std::env::var("ENCLAVE_TEST_POSTGRES_URL").unwrap_or_else(|_| {
                panic!("ENCLAVE_TEST_DATABASE=postgres needs ENCLAVE_TEST_POSTGRES_URL")
            });
            fresh_postgres(&admin).await
        }
        Ok("sqlite") | Err(_) => Store::sqlite_url(dir),
        Ok(other) => panic!("ENCLAVE_TEST_DATABASE={other}: expected sqlite or postgres"),
    };
    Store::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot open the test database: {e}"))
}

/// A key of a built-in `role` in `tenant` (which must exist), for every model, unlimited.
pub async fn new_key(
    store: &enclave_gateway::Store,
    tenant: &str,
    role: &str,
) -> enclave_gateway::CreatedKey {
    store
        .create_key(
            enclave_gateway::NewKey {
                tenant: tenant.into(),
                role: role.into(),
                models: vec!["*".into()],
                name: String::new(),
                expires_at: None,
                limits: enclave_gateway::Limits::default(),
                created_by: "test".into(),
            },
            &enclave_gateway::Roles::default(),
            enclave_gateway::unix_time(),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot create a {role} key in {tenant}: {e}"))
}

/// A new, empty database on the server at `admin` (whose path names an existing database).
async fn fresh_postgres(admin: &str) -> String {
    use sqlx::Connection;
    let name = format!("enclave_test_{:016x}", rand::random::<u64>());
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE: {e}"));
    let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
    format!("{base}/{name}")
}

pub fn server_config() -> ServerConfig {
    ServerConfig {
        served_model_name: MODEL.into(),
        // The tests fail logins on purpose, many times from one address; the rule that blocks
        // that has its own test (`audit::failed_logins_block_the_address_for_a_while`).
        abuse: enclave_gateway::AbuseLimits {
            max_failures: 0,
            ..enclave_gateway::AbuseLimits::default()
        },
        ..ServerConfig::default()
    }
}

/// A server running in this test's runtime.
pub struct TestServer {
    pub base: String,
    pub state: Arc<AppState>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts listening (the model not yet loaded: `/health` is 503).
    pub async fn listen(config: ServerConfig) -> Self {
        Self::listen_with(config, enclave_server::Access::Disabled).await
    }

    /// Starts listening, authenticating callers as `access` says.
    pub async fn listen_with(config: ServerConfig, access: enclave_server::Access) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::new(config, access);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(enclave_server::serve(listener, state.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            base,
            state,
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A ready server for the model in `dir`.
    pub async fn start(dir: &Path, config: ServerConfig, serving: ServingConfig) -> Self {
        Self::start_with(dir, config, serving, enclave_server::Access::Disabled).await
    }

    /// A ready server for the model in `dir`, authenticating callers as `access` says.
    pub async fn start_with(
        dir: &Path,
        config: ServerConfig,
        serving: ServingConfig,
        access: enclave_server::Access,
    ) -> Self {
        let server = Self::listen_with(config, access).await;
        let handle = EngineHandle::start(load(dir), serving).unwrap();
        server.state.warm_up_and_serve(handle).await.unwrap();
        server
    }

    /// The tiny Qwen2 fixture. Its chat template is DeepSeek-R1's (the generation prompt opens
    /// `<think>`), so its random output would all be `reasoning_content`; these tests serve it
    /// with the split off (`--no-reasoning-split`) and check the text in `content`. The split
    /// itself is tested in `reasoning.rs` with a scripted model.
    pub async fn qwen2() -> Self {
        let config = ServerConfig {
            reasoning_split: false,
            ..server_config()
        };
        Self::start(&fixtures().join("models/qwen2"), config, serving_config()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Posts a streaming request and returns the raw body.
    pub async fn post_raw(&self, path: &str, body: Value) -> (u16, String) {
        let response = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Asks the server to stop and waits for it (graceful shutdown).
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        };
        if let Some(engine) = self.state.engine() {
            engine.shutdown();
        }
        result
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn wait(mut self) -> std::io::Result<()> {
        let result = match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        };
        if let Some(engine) = self.state.engine() {
            engine.shutdown();
        }
        result
    }
}

/// The JSON chunks of an SSE body, checking the framing on the way: every event is one
/// `data: ` line followed by a blank line, and the last is `data: [DONE]`.
pub fn sse_chunks(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("\n\n"),
        "events end with a blank line: {body:?}"
    );
    let events: Vec<&str> = body.trim_end_matches("\n\n").split("\n\n").collect();
    assert_eq!(
        events.last(),
        Some(&"data: [DONE]"),
        "the stream ends with [DONE]"
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event not framed as `data: `: {e:?}"));
            assert!(!data.contains('\n'), "one line per event: {e:?}");
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

/// Waits until the engine is idle and returns its counters.
pub async fn settled(state: &AppState) -> enclave_engine::ServingStats {
    let engine = state.engine().unwrap();
    for _ in 0..1000 {
        let stats = engine.stats();
        if stats.scheduler.running == 0 && stats.scheduler.waiting == 0 {
            return stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the engine did not become idle: {:?}", engine.stats());
}

/// A connection that asks for a 64-choice stream of 480 tokens each with their five likeliest
/// alternatives (megabytes of events, more than any socket buffer holds) and never reads: its
/// receive buffer is 4 KiB. `key` authenticates it when given.
pub async fn never_reading_stream(server: &TestServer, key: Option<&str>) -> tokio::net::TcpStream {
    let body = serde_json::json!({"model": MODEL, "prompt": "Once", "max_tokens": 480,
        "ignore_eos": true, "n": 64, "stream": true, "logprobs": 5})
    .to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut connection = socket
        .connect(server.base.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    let authorization = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: enclave\r\n{authorization}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut connection, request.as_bytes())
        .await
        .unwrap();
    connection
}
