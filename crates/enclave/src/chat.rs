//! `enclave chat`: an interactive conversation in the terminal.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use clap::Args;
use enclave_engine::{Engine, GenerateRequest, Prompt, SamplingParams};

use crate::{model_source, ModelArgs};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// A system message to start the conversation with.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,

    /// Most tokens per answer.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_tokens: usize,

    /// Sampling temperature (default: the model's generation_config.json; 0 is greedy).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,

    /// Random seed for reproducible answers.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let dir = model_source::resolve(&args.model.model, &args.model.revision)?;
    let engine = Engine::load(&dir, &args.model.engine_config())?;
    tracing::info!("loaded {}", engine.summary());
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    eprintln!(
        "Chatting with {}. Type /reset to start over, /exit or Ctrl-D to quit.",
        dir.display()
    );
    loop {
        write!(stdout, "> ")
            .and_then(|_| stdout.flush())
            .context("writing to stdout")?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.truncate(usize::from(args.system.is_some()));
                continue;
            }
            _ => {}
        }
        messages.push(serde_json::json!({"role": "user", "content": line}));
        match answer(&engine, &args, &messages, &mut stdout) {
            Ok(text) => messages.push(serde_json::json!({"role": "assistant", "content": text})),
            Err(err) => {
                // A bad turn (e.g. the conversation outgrew the context) keeps the session.
                messages.pop();
                eprintln!("error: {err:#}");
            }
        }
    }
    Ok(())
}

fn answer(
    engine: &Engine,
    args: &ChatArgs,
    messages: &[serde_json::Value],
    stdout: &mut std::io::Stdout,
) -> Result<String> {
    let mut sampling: SamplingParams = engine.generation_config().default_sampling();
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    sampling.seed = args.seed;
    let prompt_len = engine
        .tokenizer()
        .encode(&engine.render_chat(messages)?, false)?
        .len();
    let room = engine.max_model_len().saturating_sub(prompt_len);
    let request = GenerateRequest {
        sampling: Some(sampling),
        max_tokens: Some(args.max_tokens.min(room.max(1))),
        ..GenerateRequest::new(Prompt::Chat(messages.to_vec()))
    };
    let request = engine.validate(request)?;
    let generation = engine.generate(&request, |event| {
        let _ = stdout.write_all(event.text.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    Ok(generation.text)
}
