//! `enclave serve` as a process: it listens at once, reports ready after loading, answers over
//! HTTP, and exits 0 on SIGTERM after finishing the request in flight.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use std::path::Path;

use crate::{enclave, model_dir, stderr, stdout};

struct Served {
    child: Child,
    base: String,
    stderr: mpsc::Receiver<String>,
    /// What it printed up to "ready".
    startup: Vec<String>,
}

/// Starts `enclave serve` on a free port with its state in `data_dir` and waits for its
/// "ready" line.
fn serve(data_dir: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--model"])
        .arg(model_dir("qwen2"))
        .args([
            "--port",
            "0",
            "--served-model-name",
            "tiny",
            "--kv-cache-memory",
            "64MiB",
        ])
        .args(extra)
        .env_remove("ENCLAVE_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, stderr) = mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut base = None;
    let mut startup = Vec::new();
    loop {
        let line = stderr
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("enclave serve did not become ready: {startup:?}"));
        startup.push(line.clone());
        if let Some(rest) = line.strip_prefix("listening on ") {
            base = rest.split_whitespace().next().map(String::from);
        }
        if line.starts_with("ready:") {
            break;
        }
    }
    Served {
        child,
        base: base.expect("no listening address"),
        stderr,
        startup,
    }
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A new key in `data_dir`'s database, through the CLI (`keys create --json`).
fn create_key(data_dir: &Path, role: &str) -> (String, String) {
    let out = enclave(&[
        "--data-dir",
        data_dir.to_str().unwrap(),
        "keys",
        "create",
        "--role",
        role,
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    )
}

/// A client that sends `key` with every request.
fn client_with(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_http_and_exits_cleanly_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let (_, key) = create_key(data.path(), "developer");
    let mut served = serve(data.path(), &[]);
    let client = client_with(&key);
    let health = client
        .get(format!("{}/health", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let reply: Value = client
        .post(format!("{}/v1/chat/completions", served.base))
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    assert_eq!(reply["model"], "tiny");
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() <= 4);

    // A streamed request in flight when SIGTERM arrives still completes.
    let mut stream = client
        .post(format!("{}/v1/completions", served.base))
        .json(&json!({"prompt": "Once", "max_tokens": 200, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = String::from_utf8(stream.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    terminate(&served.child);
    while let Some(chunk) = stream.chunk().await.unwrap() {
        body += std::str::from_utf8(&chunk).unwrap();
    }
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(body.contains("\"finish_reason\":\"length\""));
    let status = served.child.wait().unwrap();
    let log: Vec<String> = served.stderr.try_iter().collect();
    assert!(status.success(), "exit {status:?}: {log:?}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["serve", "--model"])
        .arg(model_dir("qwen2"))
        .args(["--port", &port])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

/// `enclave bench-serve` drives a running server and reports every level.
#[test]
fn bench_serve_measures_a_running_server() {
    let data = tempfile::tempdir().unwrap();
    let (_, key) = create_key(data.path(), "developer");
    let mut served = serve(data.path(), &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .args(["bench-serve", "--url", &served.base, "--concurrency", "1,4"])
        .env("ENCLAVE_API_KEY", &key)
        .args([
            "--requests",
            "6",
            "--prompt-len",
            "5",
            "--output-len",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let levels: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(levels.len(), 2);
    for (level, connections) in levels.iter().zip([1, 4]) {
        assert_eq!(level["connections"], connections);
        assert_eq!(level["requests"], 6);
        assert!(level["requests_per_s"].as_f64().unwrap() > 0.0);
        // 6 requests × 3 tokens over the wall time.
        let tokens =
            level["output_tokens_per_s"].as_f64().unwrap() * level["wall_s"].as_f64().unwrap();
        assert!((tokens - 18.0).abs() < 1e-6, "{level}");
        assert!(level["ttft_p50_s"].as_f64().unwrap() <= level["latency_p99_s"].as_f64().unwrap());
    }
    terminate(&served.child);
    assert!(served.child.wait().unwrap().success());
}

/// Keys made and revoked with the CLI on the database a running server reads: 401 without a
/// key, 200 with one, 401 again within five seconds of `keys revoke`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_cli_open_and_close_a_running_server() {
    let data = tempfile::tempdir().unwrap();
    keys_open_and_close_a_running_server(data.path(), &[]).await;
}

/// The same with the state in PostgreSQL (`database_url` from a configuration file), when
/// `ENCLAVE_TEST_POSTGRES_URL` names a server (`.ci/run` starts one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_cli_open_and_close_a_running_server_on_postgres() {
    let Ok(admin) = std::env::var("ENCLAVE_TEST_POSTGRES_URL") else {
        eprintln!("PostgreSQL: SKIPPED (set ENCLAVE_TEST_POSTGRES_URL to run against it)");
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let url = crate::fresh_postgres(&admin).await;
    let config = data.path().join("enclave.toml");
    std::fs::write(&config, format!("database_url = \"{url}\"\n")).unwrap();
    keys_open_and_close_a_running_server(data.path(), &["--config", config.to_str().unwrap()])
        .await;
    assert!(
        !data.path().join("enclave.db").exists(),
        "the state went to PostgreSQL, not to a SQLite file"
    );
}

async fn keys_open_and_close_a_running_server(data: &Path, global: &[&str]) {
    let dir = data.to_str().unwrap();
    let cli = |args: &[&str]| enclave(&[&["--data-dir", dir], global, args].concat());
    let created = cli(&["keys", "create", "--role", "developer", "--json"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let created: Value = serde_json::from_str(&stdout(&created)).unwrap();
    let (id, key) = (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    );
    let mut served = serve(data, global);
    let models = format!("{}/v1/models", served.base);
    let anonymous = reqwest::Client::new();
    let refused = anonymous.get(&models).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().contains_key("www-authenticate"));
    assert_eq!(
        anonymous
            .get(format!("{}/livez", served.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let client = client_with(&key);
    assert_eq!(client.get(&models).send().await.unwrap().status(), 200);

    let listed = cli(&["keys", "list", "--json"]);
    let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(listed["keys"][0]["id"], id.as_str());
    assert_eq!(listed["keys"][0]["state"], "active");
    assert!(listed["keys"][0]["last_used_at"].is_i64(), "{listed}");
    assert!(
        !listed.to_string().contains(&key[20..]),
        "the secret is never listed"
    );

    let revoked = cli(&["keys", "revoke", &id, "--json"]);
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let start = std::time::Instant::now();
    loop {
        let status = client.get(&models).send().await.unwrap().status();
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the revoked key still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(&served.child);
    assert!(served.child.wait().unwrap().success());

    // The server committed its audit records before exiting: the calls above, the refusals
    // included (summarised where they named no one), and the CLI's own changes; the chain
    // verifies.
    let exported = cli(&["audit", "export", "--since", "1h", "--format", "jsonl"]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let records: Vec<Value> = stdout(&exported)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let calls = |status: i64| {
        records
            .iter()
            .filter(|r| r["route"] == "/v1/models" && r["status"] == status)
            .count()
    };
    // The revoked key's 401 is a record of its own; the anonymous one (no credentials) is
    // counted into the source's summary, written at exit.
    assert!(calls(200) >= 2 && calls(401) >= 1, "{records:?}");
    let summarised: u64 = records
        .iter()
        .filter(|r| r["route"] == "refused.summary" && r["source"] == "127.0.0.1")
        .filter_map(|r| r["detail"]["routes"]["/v1/models 401"].as_u64())
        .sum();
    assert_eq!(summarised, 1, "{records:?}");
    assert!(records
        .iter()
        .any(|r| r["subject"] == format!("key:{id}") && r["source"] == "127.0.0.1"));
    for action in ["key.create", "key.revoke"] {
        assert!(
            records
                .iter()
                .any(|r| r["kind"] == "admin" && r["detail"]["action"] == action),
            "{action}: {records:?}"
        );
    }
    let verified = cli(&["audit", "verify", "--json"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let verified: Value = serde_json::from_str(&stdout(&verified)).unwrap();
    assert_eq!(verified["ok"], true);
    assert_eq!(
        verified["records"].as_u64().unwrap() as usize,
        records.len()
    );
}

/// `enclave audit` on a real database file: a tampered field, a deleted record and two swapped
/// records each make `verify` exit 1 naming the record; `erase` and `prune` keep it passing.
#[test]
fn audit_verify_names_the_tampered_record() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let cli = |args: &[&str]| enclave(&[&["--data-dir", dir], args].concat());
    for name in ["acme", "globex", "initech", "umbrella"] {
        assert!(cli(&["tenants", "create", name]).status.success());
    }
    for _ in 0..3 {
        // `$USER` names no one: the actor is the account of the user id.
        let created = crate::enclave_as_mallory(
            &[
                &["--data-dir", dir][..],
                &[
                    "keys",
                    "create",
                    "--tenant",
                    "acme",
                    "--role",
                    "developer",
                    "--json",
                ],
            ]
            .concat(),
        );
        assert!(created.status.success(), "{}", stderr(&created));
        let created: Value = serde_json::from_str(&stdout(&created)).unwrap();
        assert_eq!(created["created_by"], format!("cli:{}", whoami()));
    }
    let verified = cli(&["audit", "verify"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    assert!(
        stdout(&verified).contains("7 records"),
        "{}",
        stdout(&verified)
    );

    let tail = cli(&["audit", "tail", "-n", "2", "--json"]);
    let tail: Vec<Value> = stdout(&tail)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tail.len(), 2);
    assert_eq!(
        (tail[0]["seq"].as_i64(), tail[1]["seq"].as_i64()),
        (Some(6), Some(7))
    );
    assert_eq!(tail[1]["detail"]["action"], "key.create");
    assert_eq!(tail[1]["subject"], format!("cli:{}", whoami()));
    let text = cli(&["audit", "tail", "-n", "1"]);
    assert!(stdout(&text).contains("key.create"), "{}", stdout(&text));

    let db = data.path().join("enclave.db");
    let copy = data.path().join("pristine.db");
    // Everything in the main file (not the write-ahead log) before copying it.
    sql(&db, "PRAGMA wal_checkpoint(TRUNCATE)");
    std::fs::copy(&db, &copy).unwrap();
    let cases = [
        ("UPDATE audit_log SET tenant = 'globex' WHERE seq = 3", "record 3"),
        ("DELETE FROM audit_log WHERE seq = 4", "record 5"),
        (
            "UPDATE audit_log SET seq = 100 WHERE seq = 5; UPDATE audit_log SET seq = 5 WHERE seq = 6; \
             UPDATE audit_log SET seq = 6 WHERE seq = 100",
            "record 5",
        ),
    ];
    for (statements, named) in cases {
        std::fs::copy(&copy, &db).unwrap();
        sql(&db, statements);
        let out = cli(&["audit", "verify"]);
        assert_eq!(out.status.code(), Some(1), "{statements}: not detected");
        assert!(
            stderr(&out).contains(named),
            "{statements}: {}",
            stderr(&out)
        );
    }

    std::fs::copy(&copy, &db).unwrap();
    let erased = cli(&[
        "audit",
        "erase",
        "--user",
        &format!("cli:{}", whoami()),
        "--json",
    ]);
    assert!(erased.status.success(), "{}", stderr(&erased));
    let erased: Value = serde_json::from_str(&stdout(&erased)).unwrap();
    assert_eq!(erased["erased"], 7);
    let pruned = cli(&["audit", "prune", "--json"]);
    assert!(pruned.status.success(), "{}", stderr(&pruned));
    let verified = cli(&["audit", "verify", "--json"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let verified: Value = serde_json::from_str(&stdout(&verified)).unwrap();
    assert_eq!(
        (verified["ok"].as_bool(), verified["erased"].as_u64()),
        (Some(true), Some(7))
    );
}

/// Runs `statements` (`; `-separated) on the SQLite file `db`, as someone with access to it.
fn sql(db: &Path, statements: &str) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        for statement in statements.split("; ") {
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
        conn.close().await.unwrap();
    });
}

/// The OS user the CLI records as `cli:<user>`.
/// The account of this process's user id, as `id -un` names it.
fn whoami() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn without_authentication_only_loopback_is_served() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["serve", "--model"])
        .arg(model_dir("qwen2"))
        .args(["--host", "0.0.0.0", "--port", "0", "--no-auth"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("only on loopback"), "{message}");
    // The configuration's switch is refused the same way.
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["serve", "--model"])
        .arg(model_dir("qwen2"))
        .args(["--host", "0.0.0.0", "--port", "0"])
        .env("ENCLAVE_AUTH_ENABLED", "false")
        .output()
        .unwrap();
    assert!(stderr(&out).contains("only on loopback"));
}

/// Plain HTTP on a non-loopback address is said at start; on loopback it is not.
#[test]
fn plain_http_beyond_loopback_is_warned_about() {
    let data = tempfile::tempdir().unwrap();
    let mut exposed = serve(data.path(), &["--host", "0.0.0.0"]);
    let warned = |served: &Served| {
        served
            .startup
            .iter()
            .any(|l| l.contains("warning: the API serves plain HTTP"))
    };
    assert!(warned(&exposed), "{:?}", exposed.startup);
    terminate(&exposed.child);
    assert!(exposed.child.wait().unwrap().success());
    let mut local = serve(data.path(), &[]);
    assert!(!warned(&local), "{:?}", local.startup);
    terminate(&local.child);
    assert!(local.child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_authentication_loopback_callers_are_served_after_a_warning() {
    let data = tempfile::tempdir().unwrap();
    let mut served = serve(data.path(), &["--no-auth"]);
    let reply = reqwest::Client::new()
        .get(format!("{}/v1/models", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert!(
        served
            .startup
            .iter()
            .any(|l| l.contains("authentication is off")),
        "{:?}",
        served.startup
    );
    terminate(&served.child);
    assert!(served.child.wait().unwrap().success());
}

/// `serve --tls-cert/--tls-key`: HTTPS from the start, the certificate read again on SIGHUP
/// (a broken file keeps the old one); a missing key file stops the start, naming it.
#[test]
fn tls_flags_serve_https_and_sighup_reloads_the_certificate() {
    let data = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (pki.path().join("cert.pem"), pki.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let (cert_arg, key_arg) = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());

    let missing = pki.path().join("missing.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["serve", "--model"])
        .arg(model_dir("qwen2"))
        .args(["--port", "0", "--tls-cert", cert_arg, "--tls-key"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing.pem"), "{}", stderr(&out));

    let mut served = serve(data.path(), &["--tls-cert", cert_arg, "--tls-key", key_arg]);
    assert!(
        served.base.starts_with("https://127.0.0.1:"),
        "{}",
        served.base
    );
    let hangup = |child: &Child| {
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let wait_for = |served: &Served, text: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let line = served
                .stderr
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or_else(|_| panic!("no line with {text:?}"));
            if line.contains(text) {
                return line;
            }
        }
    };
    hangup(&served.child);
    wait_for(&served, "TLS certificate reloaded");
    std::fs::write(&key_path, "not a key").unwrap();
    hangup(&served.child);
    let line = wait_for(&served, "not reloaded");
    assert!(line.contains("key.pem"), "{line}");
    terminate(&served.child);
    assert!(served.child.wait().unwrap().success());
}

/// `--admin-port` opens the management listener beside the API; keys made there work on the
/// API listener. Without authentication there is no admin listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_manages_keys_for_the_api_listener() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["serve", "--model"])
        .arg(model_dir("qwen2"))
        .args(["--port", "0", "--admin-port", "0", "--no-auth"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("admin listener needs authentication"),
        "{}",
        stderr(&out)
    );

    let (_, root) = create_key(data.path(), "admin");
    let mut served = serve(data.path(), &["--admin-port", "0"]);
    let admin = served
        .startup
        .iter()
        .find_map(|l| l.strip_prefix("admin API on "))
        .and_then(|rest| rest.strip_suffix("/admin/v1"))
        .unwrap_or_else(|| panic!("{:?}", served.startup))
        .to_string();
    let created: Value = client_with(&root)
        .post(format!("{admin}/admin/v1/keys"))
        .json(&json!({"role": "developer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"));
    let models = client_with(key)
        .get(format!("{}/v1/models", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    terminate(&served.child);
    assert!(served.child.wait().unwrap().success());
}

/// OIDC settings are checked at start: a missing audience or an unreadable key set stops the
/// server with the key named.
#[test]
fn oidc_settings_are_checked_at_start() {
    let data = tempfile::tempdir().unwrap();
    let start = |env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_enclave"));
        command
            .arg("--data-dir")
            .arg(data.path())
            .args(["serve", "--model"])
            .arg(model_dir("qwen2"))
            .args(["--port", "0"]);
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        assert!(!out.status.success());
        stderr(&out)
    };
    let message = start(&[("ENCLAVE_OIDC_ISSUER", "https://idp")]);
    assert!(message.contains("oidc.audience"), "{message}");
    let message = start(&[
        ("ENCLAVE_OIDC_ISSUER", "https://idp"),
        ("ENCLAVE_OIDC_AUDIENCE", "enclave"),
        ("ENCLAVE_OIDC_JWKS_FILE", "/nonexistent/jwks.json"),
    ]);
    assert!(message.contains("oidc.jwks_file"), "{message}");
}

#[test]
fn roles_list_shows_built_in_configured_and_created_roles() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("enclave.toml");
    std::fs::write(&config, "[roles.support]\npermissions = [\"inference\"]\n").unwrap();
    let global = [
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ];
    let cli = |args: &[&str]| enclave(&[&global[..], args].concat());
    let created = cli(&[
        "roles",
        "create",
        "summariser",
        "--permissions",
        "inference,models:read",
        "--description",
        "the summary bot",
        "--json",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let created: Value = serde_json::from_str(&stdout(&created)).unwrap();
    assert_eq!(created["permissions"], json!(["inference", "models:read"]));
    let clash = cli(&["roles", "create", "support", "--permissions", "inference"]);
    assert!(!clash.status.success());
    assert!(stderr(&clash).contains("exists"), "{}", stderr(&clash));

    let out = cli(&["roles", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let origin = |name: &str| {
        listed["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["origin"].as_str().unwrap().to_string())
    };
    for name in [
        "admin",
        "operator",
        "developer",
        "analyst",
        "auditor",
        "viewer",
    ] {
        assert_eq!(origin(name).as_deref(), Some("built-in"), "{listed}");
    }
    assert_eq!(origin("support").as_deref(), Some("configuration"));
    assert_eq!(origin("summariser").as_deref(), Some("database"));

    // A key holds the created role, which then cannot be deleted until the key is revoked.
    let key = cli(&["keys", "create", "--role", "summariser", "--json"]);
    assert!(key.status.success(), "{}", stderr(&key));
    let key: Value = serde_json::from_str(&stdout(&key)).unwrap();
    let held = cli(&["roles", "delete", "summariser"]);
    assert!(!held.status.success());
    assert!(stderr(&held).contains("revoke"), "{}", stderr(&held));
    assert!(cli(&["keys", "revoke", key["id"].as_str().unwrap()])
        .status
        .success());
    assert!(cli(&["roles", "delete", "summariser"]).status.success());
    let gone = cli(&["roles", "delete", "summariser"]);
    assert!(!gone.status.success());
    assert!(
        stderr(&gone).contains("does not exist"),
        "{}",
        stderr(&gone)
    );
    let configured = cli(&["roles", "delete", "support"]);
    assert!(!configured.status.success());

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[roles.support]\npermissions = [\"launch\"]\n").unwrap();
    let out = enclave(&["--config", bad.to_str().unwrap(), "roles", "list"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("launch"), "{}", stderr(&out));
}

/// The acceptance flood: 100,000 requests without credentials and 1,000 keyed ones against a
/// real server, then SIGTERM. The server's peak memory stays under 128 MiB (26 MiB measured;
/// the model is tiny), every keyed request answered 200 has its record, the summaries
/// account for every refusal, nothing is dropped, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_then_sigterm_loses_no_record() {
    use futures_util::StreamExt;
    let data = tempfile::tempdir().unwrap();
    let (id, key) = create_key(data.path(), "viewer");
    let mut served = serve(data.path(), &[]);
    const ANONYMOUS: usize = 100_000;
    const KEYED: usize = 1_000;
    let anonymous = reqwest::Client::new();
    let keyed = client_with(&key);
    let models = format!("{}/v1/models", served.base);
    // One keyed request in every 101, 64 at a time.
    let statuses: Vec<(bool, u16)> = futures_util::stream::iter(0..ANONYMOUS + KEYED)
        .map(|i| {
            let is_keyed = i % 101 == 100;
            let client = if is_keyed { &keyed } else { &anonymous };
            let request = client.get(&models);
            async move {
                (
                    is_keyed,
                    request.send().await.map_or(0, |r| r.status().as_u16()),
                )
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let answered_ok = statuses.iter().filter(|(k, s)| *k && *s == 200).count();
    let refused = statuses.iter().filter(|(k, s)| !*k && *s == 401).count();
    assert_eq!((answered_ok, refused), (KEYED, ANONYMOUS));
    let status = std::fs::read_to_string(format!("/proc/{}/status", served.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    eprintln!("peak memory after the flood: {peak_kib} KiB");
    assert!(peak_kib < 128 * 1024, "peak memory {peak_kib} KiB");
    terminate(&served.child);
    assert!(served.child.wait().unwrap().success());
    drop(served.stderr);

    let dir = data.path().to_str().unwrap();
    let exported = enclave(&["--data-dir", dir, "audit", "export", "--since", "1h"]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let records: Vec<Value> = stdout(&exported)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let subject = format!("key:{id}");
    let keyed_records = records
        .iter()
        .filter(|r| r["subject"] == subject.as_str() && r["status"] == 200)
        .count();
    assert_eq!(keyed_records, KEYED, "every request served has its record");
    let summarised: u64 = records
        .iter()
        .filter(|r| r["route"] == "refused.summary")
        .map(|r| r["detail"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        summarised as usize, ANONYMOUS,
        "the summaries account for every refusal"
    );
    assert!(records.len() < KEYED + 100, "{} records", records.len());
    let verified = enclave(&["--data-dir", dir, "audit", "verify", "--json"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
}
