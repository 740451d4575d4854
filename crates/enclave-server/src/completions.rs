//! `POST /v1/completions`: prompts as text or token ids, `echo`, and prompt log-probabilities
//! (what lm-evaluation-harness's `local-completions` needs for log-likelihood tasks).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use enclave_engine::{Engine, Event, GenerateRequest, Prompt, PromptLogprob};
use enclave_gateway::Principal;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::generation::{
    charge_prompts, check_generations, choices, max_tokens, run_to_end, submit_choices, token_text,
    usage_json, ChoiceStream, Meter, ReplyHeader, SamplingFields, Stop, StreamOptions,
    TokenLogprob, UnsupportedFields,
};
use crate::redaction;
use crate::sse::{merge, send, send_done, sse_response, EventSender};
use crate::state::AppState;

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    Batch(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    model: Option<String>,
    prompt: PromptInput,
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<i64>,
    stop: Option<Stop>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logprobs: Option<i64>,
    echo: Option<bool>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[allow(
        dead_code,
        reason = "accepted for OpenAI compatibility; audit uses it later"
    )]
    user: Option<String>,
    suffix: Option<String>,
    best_of: Option<i64>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    /// vLLM's extension: keep generating past end-of-sequence (benchmarks).
    ignore_eos: Option<bool>,
    #[serde(flatten)]
    unsupported: UnsupportedFields,
}

/// The tenant's prompt policy over text prompts (in place); how the output is treated.
async fn redact_prompts(
    policies: Option<&redaction::RedactionPolicies>,
    caller: &Principal,
    texts: &mut [String],
    meter: &Meter,
    logprobs: Option<usize>,
) -> Result<Option<redaction::OutputPolicy>, ApiError> {
    let mut texts: Vec<&mut String> = texts.iter_mut().collect();
    redaction::apply(
        policies,
        &caller.tenant,
        &mut texts,
        "prompt",
        meter,
        logprobs.is_some(),
    )
    .await
}

/// OpenAI's default when `max_tokens` is absent.
const DEFAULT_MAX_TOKENS: usize = 16;

pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<Meter>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let served = state.model(request.model.as_deref(), &caller)?;
    let engine = served.handle.engine();
    request.unsupported.check()?;
    let n = choices(request.n, state.config.max_n)?;
    if let Some(best_of) = request.best_of.filter(|&b| b != n as i64) {
        return Err(ApiError::invalid(
            Some("best_of".to_string()),
            format!("`best_of` other than `n` is not supported, got {best_of}"),
        ));
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            Some("suffix".to_string()),
            "`suffix` is not supported",
        ));
    }
    let logprobs = match request.logprobs {
        None => None,
        Some(k) if (0..=enclave_engine::MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                Some("logprobs".to_string()),
                format!(
                    "`logprobs` must be between 0 and {}, got {k}",
                    enclave_engine::MAX_TOP_LOGPROBS
                ),
            ))
        }
    };
    let echo = request.echo.unwrap_or(false);
    let policies = state.config.redaction.as_deref();
    let (prompts, output): (Vec<Prompt>, _) = match request.prompt {
        PromptInput::Text(t) => {
            let mut texts = vec![t];
            let output = redact_prompts(policies, &caller, &mut texts, &meter, logprobs).await?;
            (texts.into_iter().map(Prompt::Text).collect(), output)
        }
        PromptInput::Texts(mut texts) => {
            let output = redact_prompts(policies, &caller, &mut texts, &meter, logprobs).await?;
            (texts.into_iter().map(Prompt::Text).collect(), output)
        }
        PromptInput::Ids(ids) => {
            redaction::refuse_unchecked(policies, &caller.tenant)?;
            let output = redact_prompts(policies, &caller, &mut [], &meter, logprobs).await?;
            (vec![Prompt::TokenIds(ids)], output)
        }
        PromptInput::Batch(batch) => {
            redaction::refuse_unchecked(policies, &caller.tenant)?;
            let output = redact_prompts(policies, &caller, &mut [], &meter, logprobs).await?;
            (batch.into_iter().map(Prompt::TokenIds).collect(), output)
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt".to_string()),
            "`prompt` must hold at least one prompt",
        ));
    }
    let sampling = SamplingFields {
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        min_p: request.min_p,
        repetition_penalty: request.repetition_penalty,
        presence_penalty: request.presence_penalty,
        frequency_penalty: request.frequency_penalty,
        seed: request.seed,
    }
    .params(engine)?;
    let max_tokens = max_tokens(request.max_tokens, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS);
    let stop = request.stop.map(Stop::into_vec).unwrap_or_default();

    check_generations(served, prompts.len(), n, "prompt")?;
    let mut choices_in_order = Vec::new();
    for prompt in prompts {
        let echo_text = match (&prompt, echo) {
            (Prompt::Text(t), true) => Some(t.clone()),
            (Prompt::TokenIds(ids), true) => Some(
                engine
                    .tokenizer()
                    .decode(ids, false)
                    .map_err(|e| ApiError::from_engine(e, "prompt"))?,
            ),
            _ => None,
        };
        let mut generate = GenerateRequest::new(prompt);
        // Cached prompt blocks are shared within the caller's tenant only (CVE-2025-46570).
        generate.cache_salt = Some(caller.tenant.clone());
        generate.flow = state.config.flow_of(&caller.tenant);
        generate.sampling = Some(sampling.clone());
        generate.max_tokens = Some(max_tokens);
        generate.stop = stop.clone();
        generate.ignore_eos = request.ignore_eos.unwrap_or(false);
        generate.logprobs = logprobs;
        generate.prompt_logprobs = if echo { logprobs } else { None };
        for stream in submit_choices(served, generate, n, "prompt", &meter, &output).await? {
            choices_in_order.push((stream, echo_text.clone()));
        }
    }
    let streams: Vec<&ChoiceStream> = choices_in_order.iter().map(|(s, _)| s).collect();
    charge_prompts(&meter, &streams, n);
    let reply = CompletionReply {
        header: ReplyHeader::new("cmpl", &state.config.served_model_name),
        logprobs: logprobs.is_some(),
        n,
    };
    if request.stream.unwrap_or(false) {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        let handle = served.handle.clone();
        return Ok(sse_response(
            state.config.connections.send_timeout,
            meter.clone(),
            move |tx| reply.stream(handle, choices_in_order, include_usage, tx),
        ));
    }
    reply.complete(engine, choices_in_order).await
}

struct CompletionReply {
    header: ReplyHeader,
    logprobs: bool,
    /// Choices per prompt (prompt tokens are counted once per prompt).
    n: usize,
}

impl CompletionReply {
    async fn complete(
        &self,
        engine: &Engine,
        choices: Vec<(ChoiceStream, Option<String>)>,
    ) -> Result<Response, ApiError> {
        let (streams, echoes): (Vec<_>, Vec<_>) = choices.into_iter().unzip();
        let results = futures_util::future::join_all(streams.into_iter().map(run_to_end)).await;
        let (mut prompt_tokens, mut completion_tokens, mut cached) = (0, 0, 0);
        let mut out = Vec::new();
        for (index, (result, echo)) in results.into_iter().zip(echoes).enumerate() {
            let done = result?;
            if index % self.n == 0 {
                // A prompt's tokens (and its cached part) count once for its n choices.
                prompt_tokens += done.usage.prompt_tokens;
                cached += done.usage.cached_prompt_tokens;
            }
            completion_tokens += done.usage.completion_tokens;
            let logprobs = self.logprobs.then(|| {
                let mut lp = LogprobsJson::new(0);
                if echo.is_some() {
                    lp.push_prompt(engine, &done.prompt_ids, done.prompt_logprobs.as_deref());
                }
                lp.push_tokens(engine, &done.tokens);
                lp.into_json()
            });
            let text = match echo {
                Some(prompt) => prompt + &done.text,
                None => done.text,
            };
            out.push(json!({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": done.finish_reason.as_str(),
            }));
        }
        let usage = usage_json(prompt_tokens, completion_tokens, cached);
        Ok(
            axum::Json(self.header.body("text_completion", json!(out), Some(usage)))
                .into_response(),
        )
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        self.header.body("text_completion", choices, usage)
    }

    fn choice(
        &self,
        index: usize,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])
    }

    async fn stream(
        self,
        handle: enclave_engine::EngineHandle,
        choices: Vec<(ChoiceStream, Option<String>)>,
        include_usage: bool,
        tx: EventSender,
    ) {
        let engine = handle.engine();
        let usage_field = include_usage.then_some(Value::Null);
        let (streams, echoes): (Vec<_>, Vec<_>) = choices.into_iter().unzip();
        let prompt_lens: Vec<usize> = streams.iter().map(|s| s.prompt_ids.len()).collect();
        let prompt_ids: Vec<Vec<u32>> = streams.iter().map(|s| s.prompt_ids.clone()).collect();
        let n = streams.len();
        // Echoed prompts go first; with logprobs they wait for the prompt's log-probabilities.
        for (index, echo) in echoes.iter().enumerate() {
            if let (Some(prompt), false) = (echo, self.logprobs) {
                let chunk = self.chunk(self.choice(index, prompt, None, None), usage_field.clone());
                if !send(&tx, &chunk).await {
                    return;
                }
            }
        }
        let mut streamed = vec![0usize; n];
        let mut offsets: Vec<usize> = echoes
            .iter()
            .map(|e| e.as_ref().map_or(0, |p| p.chars().count()))
            .collect();
        let (mut completion_tokens, mut cached) = (0, 0);
        let mut merged = merge(streams);
        let mut open = n;
        let mut ended = vec![false; n];
        while open > 0 {
            let next = tokio::select! {
                _ = tx.closed() => return,
                next = merged.next() => next,
            };
            let Some((index, event)) = next else {
                // Streams closed unfinished: the engine stopped. Those choices end in error,
                // not as if complete.
                tracing::error!(open, "the engine stopped before every choice finished");
                for index in (0..n).filter(|&i| !ended[i]) {
                    let choice = self.choice(index, "", None, Some("error"));
                    if !send(&tx, &self.chunk(choice, usage_field.clone())).await {
                        return;
                    }
                }
                break;
            };
            let chunk = match event {
                Event::PromptLogprobs(prompt_logprobs) => {
                    let Some(prompt) = echoes[index].as_ref().filter(|_| self.logprobs) else {
                        continue;
                    };
                    let mut lp = LogprobsJson::new(0);
                    lp.push_prompt(engine, &prompt_ids[index], Some(&prompt_logprobs));
                    Some(self.choice(index, prompt, Some(lp.into_json()), None))
                }
                Event::Token {
                    id,
                    text,
                    logprob,
                    top_logprobs,
                } => {
                    streamed[index] += text.len();
                    let logprobs = self.logprobs.then(|| {
                        let mut lp = LogprobsJson::new(offsets[index]);
                        lp.push_tokens(
                            engine,
                            &[TokenLogprob {
                                id,
                                logprob,
                                top: top_logprobs,
                            }],
                        );
                        lp.into_json()
                    });
                    offsets[index] += text.chars().count();
                    (!text.is_empty() || logprobs.is_some())
                        .then(|| self.choice(index, &text, logprobs, None))
                }
                Event::Finished {
                    reason,
                    usage,
                    text,
                } => {
                    open -= 1;
                    ended[index] = true;
                    completion_tokens += usage.completion_tokens;
                    if index % self.n == 0 {
                        // A prompt's cached part counts once for its n choices (as unstreamed).
                        cached += usage.cached_prompt_tokens;
                    }
                    let tail = text.get(streamed[index]..).unwrap_or("");
                    Some(self.choice(index, tail, None, Some(reason.as_str())))
                }
                Event::Failed(message) => {
                    tracing::error!(%message, "generation failed while streaming");
                    open -= 1;
                    ended[index] = true;
                    Some(self.choice(index, "", None, Some("error")))
                }
            };
            if let Some(choice) = chunk {
                if !send(&tx, &self.chunk(choice, usage_field.clone())).await {
                    return;
                }
            }
        }
        if include_usage {
            let prompt_tokens: usize = prompt_lens.iter().step_by(self.n.max(1)).sum();
            let usage = usage_json(prompt_tokens, completion_tokens, cached);
            if !send(&tx, &self.chunk(json!([]), Some(usage))).await {
                return;
            }
        }
        send_done(&tx).await;
    }
}

/// The legacy completions `logprobs` object: parallel lists of tokens, their log-probabilities,
/// the top alternatives as `{token: logprob}`, and each token's character offset in the text.
struct LogprobsJson {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    offset: usize,
}

impl LogprobsJson {
    fn new(offset: usize) -> Self {
        Self {
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
            offset,
        }
    }

    fn push(&mut self, engine: &Engine, id: u32, logprob: Option<f32>, top: Option<&[(u32, f32)]>) {
        let token = token_text(engine, id);
        self.text_offset.push(json!(self.offset));
        self.offset += token.chars().count();
        self.tokens.push(json!(token));
        self.token_logprobs.push(json!(logprob));
        self.top_logprobs.push(match top {
            Some(top) => {
                let map: Map<String, Value> = top
                    .iter()
                    .map(|&(id, lp)| (token_text(engine, id), json!(lp)))
                    .collect();
                Value::Object(map)
            }
            None => Value::Null,
        });
    }

    fn push_prompt(
        &mut self,
        engine: &Engine,
        ids: &[u32],
        logprobs: Option<&[Option<PromptLogprob>]>,
    ) {
        for (k, &id) in ids.iter().enumerate() {
            let lp = logprobs.and_then(|l| l.get(k)).and_then(Option::as_ref);
            self.push(
                engine,
                id,
                lp.map(|l| l.logprob),
                lp.map(|l| l.top.as_slice()),
            );
        }
    }

    fn push_tokens(&mut self, engine: &Engine, tokens: &[TokenLogprob]) {
        for t in tokens {
            self.push(engine, t.id, Some(t.logprob), Some(&t.top));
        }
    }

    fn into_json(self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}
