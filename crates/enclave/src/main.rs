//! `enclave`: the command-line entry point. Reads flags and the environment, wires the crates.

mod access;
mod audit;
mod bench;
mod bench_serve;
mod chat;
mod config;
mod generate;
mod model_source;
mod redact;
mod serve;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use enclave_engine::{DTypeChoice, EngineConfig, ServingConfig, WeightFormat};
use enclave_models::Quantization;

#[derive(Parser)]
#[command(
    name = "enclave",
    version,
    about = "Enclave: private, self-hosted serving of DeepSeek models",
    long_about = "Enclave runs DeepSeek models (DeepSeek-R1-Distill on Qwen2 and Llama, and more) \
                  from Hugging Face model folders on your own machines."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    #[command(flatten)]
    global: config::GlobalArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API (chat and text completions, streaming, models,
    /// tokenize, health) with continuous batching.
    Serve(serve::ServeArgs),
    /// Generate a completion for one prompt and print it (streamed, or as JSON with --json).
    Generate(generate::GenerateArgs),
    /// Chat with a model in the terminal, using its chat template; answers stream as they come.
    Chat(chat::ChatArgs),
    /// Measure the serving engine: output tokens/s, time to first token and inter-token latency
    /// at several concurrency levels (random prompt ids, in process).
    Bench(bench::BenchArgs),
    /// Load a running server over HTTP: requests/s, output tokens/s, latency and time to first
    /// token at several numbers of concurrent connections.
    BenchServe(bench_serve::BenchServeArgs),
    /// Create, list and revoke API keys (in the database `serve` reads).
    #[command(subcommand)]
    Keys(access::KeysCommand),
    /// Create and list tenants: the unit of isolation (models, keys, usage).
    #[command(subcommand)]
    Tenants(access::TenantsCommand),
    /// Requests and tokens per tenant, key and day (as the servers recorded them).
    Usage(access::UsageArgs),
    /// List, create and delete roles (built-in ones and those of the configuration file are
    /// listed; roles created here live in the database).
    #[command(subcommand)]
    Roles(access::RolesCommand),
    /// The audit log: verify its hash chain, tail or export it, prune it, erase a subject.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Replace sensitive values on stdin (ID and phone numbers, cards, addresses, secrets, …)
    /// with typed placeholders such as `[ID_CARD]`; `--json` lists the findings.
    Redact(redact::RedactArgs),
}

/// How the serving engine batches requests and sizes its KV cache.
#[derive(Args, Debug, Clone)]
pub struct ServingArgs {
    /// Memory for the paged KV cache: a size (`4GiB`, `512MiB`) or a share of the memory
    /// available when the engine starts (`40%`). It is split into blocks and bounds how many
    /// tokens all requests together can hold.
    #[arg(long, value_name = "SIZE", default_value = "2GiB")]
    pub kv_cache_memory: String,

    /// Tokens per KV-cache block (the unit of allocation and of prefix sharing).
    #[arg(long, value_name = "TOKENS", default_value_t = 16)]
    pub block_size: usize,

    /// Most requests in one forward pass.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Most tokens in one forward pass; longer prompts are prefilled in chunks of this size.
    /// It bounds how long running streams wait while prompts prefill (on a CPU each token of a
    /// step costs about as much as a decode step's token).
    #[arg(long, value_name = "TOKENS", default_value_t = enclave_engine::DEFAULT_MAX_NUM_BATCHED_TOKENS)]
    pub max_num_batched_tokens: usize,

    /// Turn off reuse of cached prompt prefixes across requests.
    #[arg(long)]
    pub no_prefix_caching: bool,

    /// Requests accepted beyond --max-num-seqs; past that, new requests are refused (HTTP 503
    /// with Retry-After) instead of waiting without bound.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_waiting_requests: usize,

    /// Generations one tenant may have running and waiting at once (default: half of
    /// --max-num-seqs plus --max-waiting-requests), so one tenant's flood leaves room for the
    /// others; past it that tenant's requests get HTTP 429.
    #[arg(long, value_name = "N")]
    pub max_requests_per_tenant: Option<usize>,
}

impl ServingArgs {
    pub fn config(&self) -> anyhow::Result<ServingConfig> {
        if self.block_size == 0 {
            anyhow::bail!("--block-size must be at least 1");
        }
        Ok(ServingConfig {
            block_size: self.block_size,
            kv_cache_bytes: kv_cache_bytes(&self.kv_cache_memory)
                .map_err(|e| anyhow::anyhow!("--kv-cache-memory: {e}"))?,
            max_num_seqs: self.max_num_seqs.max(1),
            max_num_batched_tokens: self.max_num_batched_tokens.max(1),
            prefix_caching: !self.no_prefix_caching,
            max_waiting_requests: self.max_waiting_requests,
            max_outstanding_per_flow: self.max_requests_per_tenant,
        })
    }
}

/// Flags shared by every command that loads a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model to load: a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
    /// or a Hub repository id such as `deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B`, downloaded
    /// into the Hugging Face cache (HF_HOME) on first use.
    #[arg(long, value_name = "PATH|REPO")]
    pub model: String,

    /// Revision (branch, tag or commit) when --model is a Hub repository id.
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Dtype of the weights in memory. `auto`: a bf16 checkpoint stays bf16 (half the memory,
    /// faster decoding; on CPU activations are computed in f32 whatever this says), and so does
    /// a quantized GGUF file (dequantised at load); anything else is loaded as f32.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,

    /// Longest sequence (prompt + completion) to allow; defaults to the model's
    /// max_position_embeddings and may only lower it.
    #[arg(long, value_name = "TOKENS")]
    pub max_model_len: Option<usize>,

    /// Worker threads for the math kernels (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Hold the projection matrices quantized: `q8_0` (8.5 bits per weight) or `q4_k` (4.5;
    /// rows not a multiple of 256 take q5_0, held as 8.5 on AVX2 CPUs without AVX-512 VNNI)
    /// quantize any model at load; `gguf` keeps a GGUF file's own blocks. Products then quantize
    /// activations per block, as llama.cpp does.
    /// Default: dense, in --dtype (a GGUF file is dequantised).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub quantize: Option<QuantizeArg>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
    Gguf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DTypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

impl ModelArgs {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            dtype: match self.dtype {
                DTypeArg::Auto => DTypeChoice::Auto,
                DTypeArg::F32 => DTypeChoice::F32,
                DTypeArg::Bf16 => DTypeChoice::BF16,
                DTypeArg::F16 => DTypeChoice::F16,
            },
            max_model_len: self.max_model_len,
            quantize: match self.quantize {
                None => WeightFormat::Dense,
                Some(QuantizeArg::Q8_0) => WeightFormat::Quantize(Quantization::Q8_0),
                Some(QuantizeArg::Q4K) => WeightFormat::Quantize(Quantization::Q4K),
                Some(QuantizeArg::Gguf) => WeightFormat::Gguf,
            },
            ..EngineConfig::default()
        }
    }
}

/// `--kv-cache-memory`: a size, or a percentage of `MemAvailable` in /proc/meminfo.
fn kv_cache_bytes(text: &str) -> anyhow::Result<usize> {
    let Some(percent) = parse_percent(text)? else {
        return bench::parse_size(text);
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| {
        anyhow::anyhow!("a percentage needs /proc/meminfo ({e}); give a size instead")
    })?;
    let available_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/meminfo has no MemAvailable; give a size instead"))?;
    Ok((available_kib * 1024.0 * percent / 100.0) as usize)
}

/// `Some(p)` for text of the form `p%` with p in (0, 100]; `None` when there is no `%`.
fn parse_percent(text: &str) -> anyhow::Result<Option<f64>> {
    let Some(percent) = text.trim().strip_suffix('%') else {
        return Ok(None);
    };
    percent
        .trim()
        .parse()
        .ok()
        .filter(|p: &f64| *p > 0.0 && *p <= 100.0)
        .map(Some)
        .ok_or_else(|| anyhow::anyhow!("{text:?} is not a percentage in (0, 100]"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let settings = match config::Settings::load(&cli.global) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("error: {}", format!("{err:#}").replace('\n', " "));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => {
            set_threads(args.model.threads);
            serve::run(args, &settings)
        }
        Command::Keys(command) => access::keys(&settings, command),
        Command::Tenants(command) => access::tenants(&settings, command),
        Command::Usage(args) => access::usage(&settings, args),
        Command::Roles(command) => access::roles(&settings, command),
        Command::Audit(command) => match audit::audit(&settings, command) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Redact(args) => redact::run(&settings, args),
        Command::Generate(args) => {
            set_threads(args.model.threads);
            generate::run(args)
        }
        Command::Chat(args) => {
            set_threads(args.model.threads);
            chat::run(args)
        }
        Command::BenchServe(args) => bench_serve::run(args),
        Command::Bench(args) => {
            set_threads(args.model.threads);
            bench::run(args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the cause chain joined with ": ".
            eprintln!("error: {}", format!("{err:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ENCLAVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Candle's kernels size their thread pools from RAYON_NUM_THREADS; set it before first use.
fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads.filter(|&n| n > 0) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_memory_takes_a_size_or_a_share_of_available_memory() {
        assert_eq!(parse_percent("40%").unwrap(), Some(40.0));
        assert_eq!(parse_percent(" 12.5 %").unwrap(), Some(12.5));
        assert_eq!(parse_percent("4GiB").unwrap(), None);
        for bad in ["0%", "101%", "-5%", "half%"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
        assert_eq!(kv_cache_bytes("512MiB").unwrap(), 512 << 20);
        if std::path::Path::new("/proc/meminfo").exists() {
            let share = kv_cache_bytes("10%").unwrap();
            assert!(share > 0 && share < kv_cache_bytes("100%").unwrap());
        }
    }
}
