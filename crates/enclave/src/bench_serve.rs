//! `enclave bench-serve`: load on a running server over HTTP (like `vllm bench serve`):
//! closed-loop clients, each sending streamed completions one after another, measuring
//! requests/s, output tokens/s, end-to-end latency and time to first token as a client sees
//! them (HTTP, JSON and scheduling included).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::bench::percentile;

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Base URL of the server (`http://127.0.0.1:8080`).
    #[arg(long)]
    pub url: String,

    /// Model name to send (default: the first of `GET /v1/models`).
    #[arg(long)]
    pub model: Option<String>,

    /// Concurrent connections, one level after another.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,

    /// Requests per level (default: 4 per connection).
    #[arg(long)]
    pub requests: Option<usize>,

    /// Prompt tokens per request (token ids taken from the server's own tokenization of a
    /// sample text, so they are valid for any vocabulary).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,

    /// Tokens generated per request (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,

    /// Seconds to wait for the server's `/health` to answer 200 before starting.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub wait: u64,

    /// Print one JSON object per level instead of a table row.
    #[arg(long)]
    pub json: bool,

    /// API key to send (`Authorization: Bearer …`); needs the `inference` and `models:read`
    /// permissions.
    #[arg(long, env = "ENCLAVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

struct Sample {
    latency: f64,
    ttft: f64,
    tokens: usize,
}

pub fn run(args: BenchServeArgs) -> Result<()> {
    if args.prompt_len == 0 || args.output_len == 0 {
        anyhow::bail!("--prompt-len and --output-len must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(bench(args))
}

async fn bench(args: BenchServeArgs) -> Result<()> {
    let base = args.url.trim_end_matches('/').to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &args.api_key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("--api-key holds characters a header cannot carry")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .context("cannot build the HTTP client")?;
    wait_until_ready(&client, &base, Duration::from_secs(args.wait)).await?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let models: Value = client
                .get(format!("{base}/v1/models"))
                .send()
                .await
                .with_context(|| format!("cannot reach {base}"))?
                .json()
                .await?;
            models["data"][0]["id"]
                .as_str()
                .context("GET /v1/models listed no model")?
                .to_string()
        }
    };
    let pool = token_pool(&client, &base, &model).await?;
    if !args.json {
        println!("| connections | requests | req/s | output tok/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    for &connections in &args.concurrency {
        let connections = connections.max(1);
        let total = args.requests.unwrap_or(4 * connections).max(1);
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let workers: Vec<_> = (0..connections)
            .map(|_| {
                let (client, base, model, pool, next) = (
                    client.clone(),
                    base.clone(),
                    model.clone(),
                    pool.clone(),
                    next.clone(),
                );
                let (prompt_len, output_len) = (args.prompt_len, args.output_len);
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            return Ok::<_, anyhow::Error>(samples);
                        }
                        let prompt: Vec<u32> = (0..prompt_len)
                            .map(|k| pool[(i * 7919 + k * 31) % pool.len()])
                            .collect();
                        samples.push(one(&client, &base, &model, prompt, output_len).await?);
                    }
                })
            })
            .collect();
        let mut samples = Vec::with_capacity(total);
        for worker in workers {
            samples.extend(worker.await.context("a client task panicked")??);
        }
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let mut latency: Vec<f64> = samples.iter().map(|s| s.latency).collect();
        let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
        let rps = samples.len() as f64 / wall;
        let tps = tokens as f64 / wall;
        let ms = |v: f64| v * 1e3;
        if args.json {
            println!(
                "{}",
                json!({
                    "connections": connections, "requests": samples.len(),
                    "requests_per_s": rps, "output_tokens_per_s": tps,
                    "latency_p50_s": percentile(&mut latency, 0.5),
                    "latency_p99_s": percentile(&mut latency, 0.99),
                    "ttft_p50_s": percentile(&mut ttft, 0.5),
                    "ttft_p99_s": percentile(&mut ttft, 0.99),
                    "wall_s": wall,
                })
            );
        } else {
            println!(
                "| {connections} | {} | {rps:.1} | {tps:.1} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                samples.len(),
                ms(percentile(&mut latency, 0.5)),
                ms(percentile(&mut latency, 0.99)),
                ms(percentile(&mut ttft, 0.5)),
                ms(percentile(&mut ttft, 0.99)),
            );
        }
    }
    Ok(())
}

/// Polls `/health` until the model is loaded (it answers 503 while loading).
async fn wait_until_ready(client: &reqwest::Client, base: &str, wait: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let last = match client.get(format!("{base}/health")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("/health answered {}", r.status()),
            Err(e) => format!("cannot reach {base}: {e}"),
        };
        if start.elapsed() >= wait {
            anyhow::bail!(
                "the server was not ready within {} s ({last})",
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Valid token ids for prompts: the server's tokenization of a sample text.
async fn token_pool(client: &reqwest::Client, base: &str, model: &str) -> Result<Vec<u32>> {
    let text = "The history of astronomy spans thousands of years, from the first people who \
                tracked the moon and planets to modern telescopes that map distant galaxies, \
                measure the expansion of the universe and find planets around other stars.";
    let reply: Value = client
        .post(format!("{base}/tokenize"))
        .json(&json!({"model": model, "prompt": text, "add_special_tokens": false}))
        .send()
        .await?
        .json()
        .await?;
    let pool: Vec<u32> = serde_json::from_value(reply["tokens"].clone())
        .with_context(|| format!("POST /tokenize answered {reply}"))?;
    if pool.is_empty() {
        anyhow::bail!("POST /tokenize returned no tokens");
    }
    Ok(pool)
}

/// One streamed completion: latency to the end and to the first token.
async fn one(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    prompt: Vec<u32>,
    output_len: usize,
) -> Result<Sample> {
    let sent = Instant::now();
    let mut response = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({
            "model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
        }))
        .send()
        .await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!("the server answered {status}: {body}");
    }
    let mut ttft = None;
    let mut body = String::new();
    while let Some(chunk) = response.chunk().await? {
        if ttft.is_none() {
            ttft = Some(sent.elapsed());
        }
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    let latency = sent.elapsed();
    let tokens = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|c| c["usage"]["completion_tokens"].as_u64())
        .unwrap_or(0) as usize;
    Ok(Sample {
        latency: latency.as_secs_f64(),
        ttft: ttft.unwrap_or(latency).as_secs_f64(),
        tokens,
    })
}
