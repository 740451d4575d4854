//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use enclave_engine::{Engine, Event, GenerateRequest, Prompt, MAX_TOP_LOGPROBS};
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
use crate::reasoning::ReasoningSplitter;
use crate::redaction;
use crate::sse::{merge, send, send_done, sse_response, EventSender};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    model: Option<String>,
    messages: Vec<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<i64>,
    stop: Option<Stop>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[allow(
        dead_code,
        reason = "accepted for OpenAI compatibility; audit uses it later"
    )]
    user: Option<String>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    /// vLLM's extension: keep generating past end-of-sequence (benchmarks).
    ignore_eos: Option<bool>,
    #[serde(flatten)]
    unsupported: UnsupportedFields,
}

/// Roles the chat templates understand; `developer` (OpenAI's newer name) becomes `system`.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<Meter>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let served = state.model(request.model.as_deref(), &caller)?;
    let engine = served.handle.engine();
    // First: a request with tools may carry tool messages that would fail as messages.
    request.unsupported.check()?;
    let mut messages = normalize_messages(request.messages)?;
    let n = choices(request.n, state.config.max_n)?;
    let top_logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                Some("top_logprobs".to_string()),
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
            return Err(ApiError::invalid(
                Some("top_logprobs".to_string()),
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, _) => None,
    };
    let max_tokens = match request.max_completion_tokens {
        Some(v) => max_tokens(Some(v), "max_completion_tokens")?,
        None => max_tokens(request.max_tokens, "max_tokens")?,
    };
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
    let output = {
        // Every text a template may render: contents, names, tool-call arguments, reasoning.
        let mut texts: Vec<&mut String> = Vec::new();
        for message in messages.iter_mut() {
            if let Value::Object(fields) = message {
                for (key, value) in fields.iter_mut() {
                    if key != "role" {
                        redaction::strings_in(value, &mut texts);
                    }
                }
            }
        }
        redaction::apply(
            state.config.redaction.as_deref(),
            &caller.tenant,
            &mut texts,
            "messages",
            &meter,
            top_logprobs.is_some(),
        )
        .await?
    };
    let mut generate = GenerateRequest::new(Prompt::Chat(messages));
    // Cached prompt blocks are shared within the caller's tenant only (CVE-2025-46570).
    generate.cache_salt = Some(caller.tenant.clone());
    generate.flow = state.config.flow_of(&caller.tenant);
    generate.sampling = Some(sampling);
    generate.max_tokens = max_tokens;
    generate.ignore_eos = request.ignore_eos.unwrap_or(false);
    generate.stop = request.stop.map(Stop::into_vec).unwrap_or_default();
    generate.logprobs = top_logprobs;
    check_generations(served, 1, n, "messages")?;
    let streams = submit_choices(served, generate, n, "messages", &meter, &output).await?;
    charge_prompts(&meter, &streams.iter().collect::<Vec<_>>(), n);

    let reply = ChatReply {
        header: ReplyHeader::new("chatcmpl", &state.config.served_model_name),
        reasoning: state.config.reasoning_split,
        template_opens_think: served.template_opens_think,
        logprobs: top_logprobs.is_some(),
    };
    if request.stream.unwrap_or(false) {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        let engine = served.handle.clone();
        return Ok(sse_response(
            state.config.connections.send_timeout,
            meter.clone(),
            move |tx| reply.stream(engine, streams, include_usage, tx),
        ));
    }
    reply.complete(engine, streams).await
}

/// Checks roles and flattens content parts into text, so templates see plain strings.
pub(crate) fn normalize_messages(messages: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages".to_string()),
            "`messages` must hold at least one message",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let Value::Object(mut message) = message else {
                return Err(ApiError::invalid(
                    Some(format!("messages[{i}]")),
                    format!("`messages[{i}]` must be an object with `role` and `content`"),
                ));
            };
            let role = match message.get("role").and_then(Value::as_str) {
                Some(role) if ROLES.contains(&role) => role.to_string(),
                Some(role) => {
                    return Err(ApiError::invalid(
                        Some(format!("messages[{i}].role")),
                        format!(
                            "`messages[{i}].role` must be one of {}, got {role:?}",
                            ROLES.join(", ")
                        ),
                    ))
                }
                None => {
                    return Err(ApiError::invalid(
                        Some(format!("messages[{i}].role")),
                        format!("`messages[{i}].role` is missing"),
                    ))
                }
            };
            let content = match message.remove("content") {
                Some(Value::String(s)) => Value::String(s),
                None | Some(Value::Null) if role == "assistant" => Value::Null,
                Some(Value::Array(parts)) => Value::String(text_parts(i, &parts)?),
                _ => {
                    return Err(ApiError::invalid(
                        Some(format!("messages[{i}].content")),
                        format!(
                            "`messages[{i}].content` must be a string or an array of text parts"
                        ),
                    ))
                }
            };
            let role = if role == "developer" {
                "system".to_string()
            } else {
                role
            };
            message.insert("role".into(), Value::String(role));
            message.insert("content".into(), content);
            Ok(Value::Object(message))
        })
        .collect()
}

/// The text of `[{"type": "text", "text": …}, …]`, joined by newlines (as vLLM does).
fn text_parts(i: usize, parts: &[Value]) -> Result<String, ApiError> {
    let texts: Result<Vec<&str>, ApiError> = parts
        .iter()
        .enumerate()
        .map(|(j, part)| {
            match (
                part.get("type").and_then(Value::as_str),
                part.get("text").and_then(Value::as_str),
            ) {
                (Some("text"), Some(text)) => Ok(text),
                (kind, _) => Err(ApiError::invalid(
                    Some(format!("messages[{i}].content[{j}]")),
                    format!(
                        "`messages[{i}].content[{j}]`: only text parts are supported, got type {}",
                        kind.unwrap_or("(none)")
                    ),
                )),
            }
        })
        .collect();
    Ok(texts?.join("\n"))
}

/// What a response needs besides the generated tokens.
struct ChatReply {
    header: ReplyHeader,
    reasoning: bool,
    template_opens_think: bool,
    logprobs: bool,
}

impl ChatReply {
    fn splitter(&self) -> Option<ReasoningSplitter> {
        self.reasoning
            .then(|| ReasoningSplitter::new(self.template_opens_think))
    }

    async fn complete(
        &self,
        engine: &Engine,
        streams: Vec<ChoiceStream>,
    ) -> Result<Response, ApiError> {
        let prompt_tokens = streams.first().map_or(0, |s| s.prompt_ids.len());
        let results = futures_util::future::join_all(streams.into_iter().map(run_to_end)).await;
        let mut choices = Vec::new();
        let (mut completion_tokens, mut cached) = (0, 0);
        for (index, result) in results.into_iter().enumerate() {
            let done = result?;
            completion_tokens += done.usage.completion_tokens;
            cached = cached.max(done.usage.cached_prompt_tokens);
            let mut message = Map::new();
            message.insert("role".into(), json!("assistant"));
            match self.splitter() {
                Some(mut splitter) => {
                    let mut part = splitter.push(&done.text);
                    let rest = splitter.finish();
                    part.reasoning += &rest.reasoning;
                    part.content += &rest.content;
                    message.insert("content".into(), json!(part.content));
                    if splitter.is_reasoning() {
                        message.insert("reasoning_content".into(), json!(part.reasoning));
                    }
                }
                None => {
                    message.insert("content".into(), json!(done.text));
                }
            }
            let logprobs = self.logprobs.then(|| {
                json!({"content": done.tokens.iter().map(|t| logprob_entry(engine, t)).collect::<Vec<_>>()})
            });
            choices.push(json!({
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": done.finish_reason.as_str(),
            }));
        }
        let usage = usage_json(prompt_tokens, completion_tokens, cached);
        Ok(axum::Json(
            self.header
                .body("chat.completion", json!(choices), Some(usage)),
        )
        .into_response())
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        self.header.body("chat.completion.chunk", choices, usage)
    }

    /// Sends the chunks of every choice as they are produced; returns when all finished or the
    /// client went away (dropping the streams cancels the requests).
    async fn stream(
        self,
        handle: enclave_engine::EngineHandle,
        streams: Vec<ChoiceStream>,
        include_usage: bool,
        tx: EventSender,
    ) {
        let engine = handle.engine();
        let usage_field = include_usage.then_some(Value::Null);
        let prompt_tokens = streams.first().map_or(0, |s| s.prompt_ids.len());
        let n = streams.len();
        let mut splitters: Vec<Option<ReasoningSplitter>> =
            (0..n).map(|_| self.splitter()).collect();
        let mut streamed = vec![0usize; n];
        let (mut completion_tokens, mut cached) = (0, 0);
        for index in 0..n {
            let delta = json!({"role": "assistant", "content": ""});
            let choice = json!([{"index": index, "delta": delta, "logprobs": Value::Null, "finish_reason": Value::Null}]);
            if !send(&tx, &self.chunk(choice, usage_field.clone())).await {
                return;
            }
        }
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
                    let choice = json!([{"index": index, "delta": {}, "logprobs": Value::Null, "finish_reason": "error"}]);
                    if !send(&tx, &self.chunk(choice, usage_field.clone())).await {
                        return;
                    }
                }
                break;
            };
            let mut deltas: Vec<(Map<String, Value>, Option<Value>)> = Vec::new();
            let mut finish = None;
            match event {
                Event::Token {
                    id,
                    text,
                    logprob,
                    top_logprobs,
                } => {
                    streamed[index] += text.len();
                    let logprobs = self.logprobs.then(|| {
                        let t = TokenLogprob {
                            id,
                            logprob,
                            top: top_logprobs,
                        };
                        json!({"content": [logprob_entry(engine, &t)]})
                    });
                    let parts = split_delta(&mut splitters[index], &text, false);
                    if parts.is_empty() && logprobs.is_some() {
                        let mut d = Map::new();
                        d.insert("content".into(), json!(""));
                        deltas.push((d, logprobs));
                    } else {
                        let last = parts.len().saturating_sub(1);
                        for (k, d) in parts.into_iter().enumerate() {
                            deltas.push((d, if k == last { logprobs.clone() } else { None }));
                        }
                    }
                }
                Event::Finished {
                    reason,
                    usage,
                    text,
                } => {
                    // Text released only at the end (held for a stop string or a character).
                    let tail = text.get(streamed[index]..).unwrap_or("");
                    for d in split_delta(&mut splitters[index], tail, true) {
                        deltas.push((d, None));
                    }
                    completion_tokens += usage.completion_tokens;
                    cached = cached.max(usage.cached_prompt_tokens);
                    finish = Some(reason.as_str());
                }
                Event::Failed(message) => {
                    // Never an error object mid-stream: the choice ends with a finish reason.
                    tracing::error!(%message, "generation failed while streaming");
                    finish = Some("error");
                }
                Event::PromptLogprobs(_) => {}
            }
            for (delta, logprobs) in deltas {
                let choice = json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": Value::Null}]);
                if !send(&tx, &self.chunk(choice, usage_field.clone())).await {
                    return;
                }
            }
            if let Some(reason) = finish {
                open -= 1;
                ended[index] = true;
                let choice = json!([{"index": index, "delta": {}, "logprobs": Value::Null, "finish_reason": reason}]);
                if !send(&tx, &self.chunk(choice, usage_field.clone())).await {
                    return;
                }
            }
        }
        if include_usage {
            let usage = usage_json(prompt_tokens, completion_tokens, cached);
            if !send(&tx, &self.chunk(json!([]), Some(usage))).await {
                return;
            }
        }
        send_done(&tx).await;
    }
}

/// The deltas a piece of text makes: `reasoning_content` and/or `content`.
fn split_delta(
    splitter: &mut Option<ReasoningSplitter>,
    text: &str,
    last: bool,
) -> Vec<Map<String, Value>> {
    let (reasoning, content) = match splitter {
        Some(s) => {
            let mut part = s.push(text);
            if last {
                let rest = s.finish();
                part.reasoning += &rest.reasoning;
                part.content += &rest.content;
            }
            (part.reasoning, part.content)
        }
        None => (String::new(), text.to_string()),
    };
    let mut out = Vec::new();
    if !reasoning.is_empty() {
        let mut d = Map::new();
        d.insert("reasoning_content".into(), Value::String(reasoning));
        out.push(d);
    }
    if !content.is_empty() {
        let mut d = Map::new();
        d.insert("content".into(), Value::String(content));
        out.push(d);
    }
    out
}

/// One `logprobs.content` entry: the token's text, and its exact bytes (a byte-level token
/// can be part of a character).
fn logprob_entry(engine: &Engine, t: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(engine, id);
        let bytes = engine
            .tokenizer()
            .token_bytes(id)
            .unwrap_or_else(|| token.as_bytes().to_vec());
        json!({"token": token, "logprob": logprob, "bytes": bytes})
    };
    let mut chosen = entry(t.id, t.logprob);
    let top: Vec<Value> = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
    chosen["top_logprobs"] = json!(top);
    chosen
}
