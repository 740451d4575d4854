//! The audit log's write cost, for BENCHMARKS.md:
//! `cargo run --release -p enclave-gateway --example audit_load [postgres://…]`.
//! 1. Capacity: 100,000 records queued as fast as the bounded queue (65,536 places) takes
//!    them — each place reserved first, as the server does — then flushed: records/s and µs
//!    per record.
//! 2. At 1,000 requests/s offered for 10 s: how far the committed log trails the queue
//!    (a flush's wait, sampled every 100 ms: median and p99) and the queue at the end.

use std::time::{Duration, Instant};

use enclave_gateway::{AuditEvent, AuditKind, AuditLog, Store};

fn event(i: u64) -> AuditEvent {
    AuditEvent {
        at_ms: 1_800_000_000_000 + i as i64,
        kind: AuditKind::Api,
        request_id: format!("req-{i:024x}"),
        tenant: "acme".into(),
        subject: "key:0123456789abcdef".into(),
        source: "10.0.0.8".into(),
        method: "POST".into(),
        route: "/v1/chat/completions".into(),
        model: "deepseek-r1-distill-qwen-1.5b".into(),
        status: 200,
        prompt_tokens: 128,
        completion_tokens: 128,
        latency_ms: 2300,
        detail: String::new(),
        text: None,
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| Store::sqlite_url(dir.path()));
    let backend = if url.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "SQLite (WAL)"
    };
    let store = Store::connect(&url).await?;
    let log = AuditLog::start(store.clone());

    let n = 100_000u64;
    let start = Instant::now();
    for i in 0..n {
        log.reserve().await?.record(event(i));
    }
    log.flush().await?;
    let took = start.elapsed().as_secs_f64();
    println!(
        "{backend}: capacity {:.0} records/s ({:.1} µs per record, batched)",
        n as f64 / took,
        took / n as f64 * 1e6
    );

    let mut lags = Vec::new();
    let begin = Instant::now();
    let mut sent = 0u64;
    let mut next_sample = Duration::from_millis(100);
    while begin.elapsed() < Duration::from_secs(10) {
        let due = (begin.elapsed().as_secs_f64() * 1000.0) as u64;
        while sent < due {
            log.reserve().await?.record(event(n + sent));
            sent += 1;
        }
        if begin.elapsed() >= next_sample {
            let t = Instant::now();
            log.flush().await?;
            lags.push(t.elapsed().as_secs_f64() * 1e3);
            next_sample += Duration::from_millis(100);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    log.flush().await?;
    let samples = lags.len();
    println!(
        "{backend}: {sent} records at 1,000/s offered; committed within {:.2} ms median, {:.2} ms p99 of a flush ({samples} samples)",
        percentile(lags.clone(), 0.5),
        percentile(lags, 0.99),
    );
    let report = store.verify_audit().await?;
    println!(
        "verify: {} records, problem {:?}; queue {:?}",
        report.records,
        report.problem,
        log.stats()
    );
    Ok(())
}
