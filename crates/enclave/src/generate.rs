//! `enclave generate`: one prompt in, one completion out.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use enclave_engine::{Engine, GenerateRequest, Prompt, SamplingParams};

use crate::{model_source, ModelArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Prompt text, encoded with the tokenizer's special tokens (BOS where add_bos_token says
    /// so), as the completions API does.
    #[arg(long, group = "input")]
    pub prompt: Option<String>,

    /// Prompt as comma-separated token ids, used as they are (e.g. 1,2,3).
    #[arg(long, group = "input", value_delimiter = ',', value_name = "IDS")]
    pub prompt_ids: Option<Vec<u32>>,

    /// One user message, rendered with the model's chat template (which writes its own BOS)
    /// followed by the assistant's generation prompt.
    #[arg(long, group = "input", value_name = "TEXT")]
    pub chat: Option<String>,

    /// Most tokens to generate (default: until a stop token or the end of the context).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,

    /// Sampling temperature; 0 is greedy. Unset sampling flags take the model's defaults
    /// from generation_config.json.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P, in (0, 1].
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,

    /// Keep only the K most likely tokens (0: no limit).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Drop tokens less likely than P times the most likely one, in [0, 1].
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,

    /// Divide positive logits (multiply negative ones) of tokens already in the prompt or
    /// output by this factor; 1 is off.
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,

    /// Subtract this from the logit of every token already generated, in [-2, 2].
    #[arg(long, value_name = "X")]
    pub presence_penalty: Option<f32>,

    /// Subtract this times the count of each token already generated, in [-2, 2].
    #[arg(long, value_name = "X")]
    pub frequency_penalty: Option<f32>,

    /// Random seed: the same seed and parameters give the same tokens.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Stop when this text is generated (repeatable); the stop text is not printed.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,

    /// Keep generating past the model's end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    /// Print one JSON object: {"prompt_ids", "ids", "text", "logprobs", "finish_reason"};
    /// logprobs[i] is the natural-log probability of ids[i] under the raw logits.
    #[arg(long)]
    pub json: bool,

    /// Print prompt and generation speed to stderr when done.
    #[arg(long)]
    pub stats: bool,
}

impl GenerateArgs {
    fn prompt(&self) -> Result<Prompt> {
        Ok(match (&self.prompt, &self.prompt_ids, &self.chat) {
            (Some(text), None, None) => Prompt::Text(text.clone()),
            (None, Some(ids), None) => Prompt::TokenIds(ids.clone()),
            (None, None, Some(text)) => Prompt::Chat(vec![serde_json::json!({
                "role": "user",
                "content": text,
            })]),
            _ => bail!("give exactly one of --prompt, --prompt-ids or --chat"),
        })
    }

    fn sampling(&self, defaults: SamplingParams) -> SamplingParams {
        let mut p = defaults;
        if let Some(v) = self.temperature {
            p.temperature = v;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(v) = self.top_k {
            p.top_k = v;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        p.seed = self.seed;
        p
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompt = args.prompt()?;
    let dir = model_source::resolve(&args.model.model, &args.model.revision)?;
    let load_start = Instant::now();
    let engine = Engine::load(&dir, &args.model.engine_config())?;
    let load_time = load_start.elapsed();
    tracing::info!("loaded {}", engine.summary());
    let request = GenerateRequest {
        prompt,
        sampling: Some(args.sampling(engine.generation_config().default_sampling())),
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        stop_token_ids: Vec::new(),
        ignore_eos: args.ignore_eos,
        logprobs: None,
        prompt_logprobs: None,
        cache_salt: None,
        flow: enclave_engine::Flow::default(),
    };
    let request = engine.validate(request)?;

    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    let mut first_token = None;
    let generation = engine.generate(&request, |event| {
        first_token.get_or_insert_with(Instant::now);
        if !args.json {
            // A closed stdout (e.g. `| head`) is not worth failing the generation for.
            let _ = stdout.write_all(event.text.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let end = Instant::now();
    if args.json {
        let out = serde_json::json!({
            "prompt_ids": generation.prompt_ids,
            "ids": generation.ids,
            "text": generation.text,
            "logprobs": generation.logprobs,
            "finish_reason": generation.finish_reason.as_str(),
        });
        writeln!(stdout, "{out}").context("writing to stdout")?;
    } else {
        let _ = writeln!(stdout);
    }
    if args.stats {
        let first = first_token.unwrap_or(end);
        let prefill = first.duration_since(start).as_secs_f64();
        let decode = end.duration_since(first).as_secs_f64();
        let n_prompt = generation.prompt_ids.len();
        let n_decode = generation.ids.len().saturating_sub(1);
        eprintln!("{}", engine.summary());
        eprintln!(
            "load {:.2} s | prompt {n_prompt} tokens in {prefill:.3} s ({:.2} tok/s) | \
             decode {n_decode} tokens in {decode:.3} s ({:.2} tok/s)",
            load_time.as_secs_f64(),
            n_prompt as f64 / prefill.max(1e-9),
            n_decode as f64 / decode.max(1e-9),
        );
    }
    Ok(())
}
