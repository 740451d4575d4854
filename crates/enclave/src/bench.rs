//! `enclave bench`: throughput and latency of the serving engine under concurrent load,
//! in process (no HTTP), with random prompt ids so no tokenizer work is measured.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use enclave_engine::{
    Engine, EngineHandle, Event, GenerateRequest, Prompt, SamplingParams, ServingConfig,
};

use crate::{model_source, ModelArgs, ServingArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub serving: ServingArgs,

    /// Concurrency levels to measure, one after another: that many requests are submitted at
    /// once and run to completion.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<usize>,

    /// Prompt tokens per request (random ids; with --shared-prefix, the shared part included).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,

    /// Tokens generated per request (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,

    /// Leading prompt tokens every request shares (a system prompt or RAG template).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: usize,

    /// Print one JSON object per level instead of a table row.
    #[arg(long)]
    pub json: bool,
}

struct Timings {
    ttft: Duration,
    itl: Vec<Duration>,
    tokens: usize,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.shared_prefix > args.prompt_len {
        anyhow::bail!(
            "--shared-prefix ({}) cannot exceed --prompt-len ({})",
            args.shared_prefix,
            args.prompt_len
        );
    }
    // Checked before the (slow) load; computed again after it, so a percentage of available
    // memory counts what the weights left.
    args.serving.config()?;
    let dir = model_source::resolve(&args.model.model, &args.model.revision)?;
    let engine = Engine::load(&dir, &args.model.engine_config())?;
    eprintln!("{}", engine.summary());
    let vocab = engine.model().info().vocab_size;
    let config: ServingConfig = args.serving.config()?;
    let handle = EngineHandle::start(engine, config)?;
    if !args.json {
        println!(
            "| concurrency | output tok/s | TTFT median | TTFT p99 | ITL median | ITL p99 | prefix hits |"
        );
        println!("|---|---|---|---|---|---|---|");
    }
    let shared = random_ids(args.shared_prefix, u64::MAX, vocab);
    let mut seed = 0u64;
    for &concurrency in &args.concurrency {
        let hits_before = handle.stats().scheduler.blocks.prefix_hits;
        let start = Instant::now();
        let readers: Vec<_> = (0..concurrency)
            .map(|_| {
                seed += 1;
                let mut ids = shared.clone();
                ids.extend(random_ids(
                    args.prompt_len - args.shared_prefix,
                    seed,
                    vocab,
                ));
                let request = GenerateRequest {
                    sampling: Some(SamplingParams::greedy()),
                    max_tokens: Some(args.output_len),
                    ignore_eos: true,
                    ..GenerateRequest::new(Prompt::TokenIds(ids))
                };
                let submitted = Instant::now();
                let stream = handle.submit(request);
                std::thread::spawn(move || -> Result<Timings> {
                    let mut stream = stream?;
                    let mut last = submitted;
                    let mut timings = Timings {
                        ttft: Duration::ZERO,
                        itl: Vec::new(),
                        tokens: 0,
                    };
                    loop {
                        match stream.blocking_next() {
                            Some(Event::Token { .. }) => {
                                let now = Instant::now();
                                if timings.tokens == 0 {
                                    timings.ttft = now - submitted;
                                } else {
                                    timings.itl.push(now - last);
                                }
                                last = now;
                                timings.tokens += 1;
                            }
                            Some(Event::Finished { .. }) => return Ok(timings),
                            Some(Event::PromptLogprobs(_)) => {}
                            Some(Event::Failed(message)) => {
                                anyhow::bail!("request failed: {message}")
                            }
                            None => anyhow::bail!("request stream ended early"),
                        }
                    }
                })
            })
            .collect();
        let mut all = Vec::with_capacity(concurrency);
        for reader in readers {
            let timings = reader
                .join()
                .map_err(|_| anyhow::anyhow!("a bench reader thread panicked"))??;
            all.push(timings);
        }
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = all.iter().map(|t| t.tokens).sum();
        let mut ttft: Vec<f64> = all.iter().map(|t| t.ttft.as_secs_f64()).collect();
        let mut itl: Vec<f64> = all
            .iter()
            .flat_map(|t| t.itl.iter().map(Duration::as_secs_f64))
            .collect();
        let hits = handle.stats().scheduler.blocks.prefix_hits - hits_before;
        let throughput = tokens as f64 / wall;
        if args.json {
            let out = serde_json::json!({
                "concurrency": concurrency,
                "output_tokens_per_s": throughput,
                "ttft_median_s": percentile(&mut ttft, 0.5),
                "ttft_p99_s": percentile(&mut ttft, 0.99),
                "itl_median_s": percentile(&mut itl, 0.5),
                "itl_p99_s": percentile(&mut itl, 0.99),
                "prefix_hit_tokens": hits,
                "wall_s": wall,
            });
            println!("{out}");
        } else {
            println!(
                "| {concurrency} | {throughput:.2} | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {hits} |",
                percentile(&mut ttft, 0.5),
                percentile(&mut ttft, 0.99),
                percentile(&mut itl, 0.5),
                percentile(&mut itl, 0.99),
            );
        }
    }
    handle.shutdown();
    Ok(())
}

/// Deterministic pseudo-random ids in `1000..vocab` (clear of most special tokens).
fn random_ids(len: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let span = (vocab as u64).saturating_sub(1000).max(1);
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (1000 + (x >> 33) % span).min(vocab as u64 - 1) as u32
        })
        .collect()
}

/// The `q` quantile (nearest rank) of `values`; 0 for none.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Parses `4GiB`, `512MiB`, `2G`, `1000000` (bytes).
pub fn parse_size(text: &str) -> Result<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a size (e.g. 4GiB, 512MiB)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => anyhow::bail!(
            "unknown size unit {other:?} in {text:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
        ),
    };
    Ok((number * scale) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }
}
