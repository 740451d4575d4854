//! `enclave`: the command-line entry point. Reads flags and the environment, wires the crates.

mod chat;
mod generate;
mod model_source;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use enclave_engine::{DTypeChoice, EngineConfig};

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
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt and print it (streamed, or as JSON with --json).
    Generate(generate::GenerateArgs),
    /// Chat with a model in the terminal, using its chat template; answers stream as they come.
    Chat(chat::ChatArgs),
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
    /// faster decoding; on CPU activations are computed in f32 whatever this says), anything
    /// else is loaded as f32.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,

    /// Longest sequence (prompt + completion) to allow; defaults to the model's
    /// max_position_embeddings and may only lower it.
    #[arg(long, value_name = "TOKENS")]
    pub max_model_len: Option<usize>,

    /// Worker threads for the math kernels (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
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
            ..EngineConfig::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Generate(args) => {
            set_threads(args.model.threads);
            generate::run(args)
        }
        Command::Chat(args) => {
            set_threads(args.model.threads);
            chat::run(args)
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
