//! `enclave serve` as a process: it listens at once, reports ready after loading, answers over
//! HTTP, and exits 0 on SIGTERM after finishing the request in flight.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::model_dir;

struct Served {
    child: Child,
    base: String,
    stderr: mpsc::Receiver<String>,
}

/// Starts `enclave serve` on a free port and waits for its "ready" line.
fn serve(extra: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_enclave"))
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
    loop {
        let line = stderr
            .recv_timeout(Duration::from_secs(120))
            .expect("enclave serve printed nothing");
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
    }
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_http_and_exits_cleanly_on_sigterm() {
    let mut served = serve(&[]);
    let client = reqwest::Client::new();
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
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
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
    let mut served = serve(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .args(["bench-serve", "--url", &served.base, "--concurrency", "1,4"])
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
