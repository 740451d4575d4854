//! What chat and completions share: request fields for sampling and stopping, turning them
//! into an engine request, running choices to the end, and logprob and usage JSON.

use enclave_engine::{
    Engine, Event, FinishReason, GenerateRequest, Prompt, PromptLogprob, RequestStream,
    SamplingParams, Usage,
};
use serde::Deserialize;
use serde_json::{json, Value};

use std::sync::Arc;

use crate::blocking;
use crate::error::ApiError;
use crate::metering::RequestMeter;
use crate::redaction::OutputPolicy;
use crate::state::{new_id, unix_time, Served};
use enclave_redact::StreamRedactor;

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields common to both endpoints (OpenAI's, and vLLM's `top_k`, `min_p`,
/// `repetition_penalty`). Absent fields take the model's `generation_config.json` defaults.
#[derive(Debug, Clone, Default)]
pub(crate) struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
}

impl SamplingFields {
    pub fn params(&self, engine: &Engine) -> Result<SamplingParams, ApiError> {
        let mut p = engine.generation_config().default_sampling();
        if let Some(t) = self.temperature {
            // OpenAI's bound (the engine itself takes any temperature >= 0).
            if t > 2.0 {
                return Err(ApiError::invalid(
                    Some("temperature".to_string()),
                    format!("`temperature` must be between 0 and 2, got {t}"),
                ));
            }
            p.temperature = t;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(k) = self.top_k {
            // -1 and 0 both mean no cut (vLLM and transformers conventions).
            p.top_k = match k {
                -1 | 0 => 0,
                k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
                k => {
                    return Err(ApiError::invalid(
                        Some("top_k".to_string()),
                        format!("`top_k` must be -1 (off) or at least 1, got {k}"),
                    ))
                }
            };
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
        p.seed = self.seed.map(|s| s as u64);
        Ok(p)
    }
}

/// OpenAI fields this server does not implement: their neutral values (absent, null, empty,
/// `{"type": "text"}`, a `tool_choice` of "none" or "auto") pass, anything else is a 400 naming
/// the field. Ignoring them would answer a request for JSON output or tool calls with plain
/// text, and the client would fail later, far from the cause.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct UnsupportedFields {
    logit_bias: Option<Value>,
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
}

impl UnsupportedFields {
    pub fn check(&self) -> Result<(), ApiError> {
        let empty = |v: &Value| match v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        let no_choice = |v: &Value| v.is_null() || v == "none" || v == "auto";
        let text_format = |v: &Value| v.is_null() || v.get("type").is_some_and(|t| t == "text");
        type Neutral = fn(&Value) -> bool;
        let fields: [(&str, &Option<Value>, Neutral, &str); 6] = [
            ("logit_bias", &self.logit_bias, empty, "an empty object"),
            (
                "response_format",
                &self.response_format,
                text_format,
                r#"{"type": "text"}"#,
            ),
            ("tools", &self.tools, empty, "an empty list"),
            (
                "tool_choice",
                &self.tool_choice,
                no_choice,
                r#""none" or "auto""#,
            ),
            ("functions", &self.functions, empty, "an empty list"),
            (
                "function_call",
                &self.function_call,
                no_choice,
                r#""none" or "auto""#,
            ),
        ];
        for (name, value, neutral, accepted) in fields {
            if value.as_ref().is_some_and(|v| !neutral(v)) {
                return Err(ApiError::invalid(
                    Some(name.to_string()),
                    format!(
                        "`{name}` is not supported by this server (it accepts only {accepted})"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `n`: 1 when absent, otherwise within 1..=max.
pub(crate) fn choices(n: Option<i64>, max: usize) -> Result<usize, ApiError> {
    match n {
        None => Ok(1),
        Some(n) if n >= 1 && n as u64 <= max as u64 => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(
            Some("n".to_string()),
            format!("`n` must be between 1 and {max}, got {n}"),
        )),
    }
}

/// `max_tokens`: at least 1 when given.
pub(crate) fn max_tokens(value: Option<i64>, param: &str) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        Some(n) => Err(ApiError::invalid(
            Some(param.to_string()),
            format!("`{param}` must be at least 1, got {n}"),
        )),
    }
}

/// The caller's account, when it is metered (authentication on).
pub(crate) type Meter = Option<Arc<RequestMeter>>;

/// One choice's events, each generated token charged to the caller's account as it arrives,
/// and its text redacted as it streams (or cut before the first sensitive value) when the
/// tenant's policy says so.
pub(crate) struct ChoiceStream {
    inner: RequestStream,
    meter: Meter,
    output: Option<OutputPolicy>,
    redactor: Option<StreamRedactor>,
    /// An event held while text released before it goes out as a token of its own.
    pending: Option<Event>,
    /// Tokens generated so far, and the text released so far (for a blocked choice's end).
    generated: usize,
    released: String,
    /// Ended by the content policy: nothing more comes.
    ended: bool,
}

impl Drop for ChoiceStream {
    /// Charges the tokens the engine generated that the caller never took (a stream abandoned
    /// by a client that stopped reading, or one that left): they were computed all the same.
    fn drop(&mut self) {
        let Some(meter) = &self.meter else {
            return;
        };
        let mut unread = 0;
        while let Some(event) = self.inner.try_next() {
            match event {
                Event::Token { .. } => unread += 1,
                Event::Finished { usage, .. } => {
                    unread = usage.completion_tokens.saturating_sub(self.generated);
                    break;
                }
                _ => {}
            }
        }
        if unread > 0 {
            meter.charge_completion(unread);
        }
    }
}

impl ChoiceStream {
    pub async fn next(&mut self) -> Option<Event> {
        if let Some(event) = self.pending.take() {
            return Some(event);
        }
        if self.ended {
            return None;
        }
        match self.inner.next().await {
            Some(Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            }) => {
                if let Some(meter) = &self.meter {
                    meter.charge_completion(1);
                }
                self.generated += 1;
                let text = match self.release(&text, false) {
                    Ok(text) => text,
                    Err(cut) => return Some(cut),
                };
                Some(Event::Token {
                    id,
                    text,
                    logprob,
                    top_logprobs,
                })
            }
            Some(Event::Finished {
                reason,
                usage,
                text,
            }) => {
                let rest = match self.release("", true) {
                    Ok(rest) => rest,
                    Err(cut) => return Some(cut),
                };
                let text = match &self.output {
                    Some(output) => output.finish(text, &self.meter),
                    None => text,
                };
                let finished = Event::Finished {
                    reason,
                    usage,
                    text,
                };
                if rest.is_empty() {
                    Some(finished)
                } else {
                    // The text held back for a value that might have continued.
                    self.pending = Some(finished);
                    Some(Event::Token {
                        id: 0,
                        text: rest,
                        logprob: 0.0,
                        top_logprobs: Vec::new(),
                    })
                }
            }
            other => other,
        }
    }

    /// `text` as the policy lets it out (`at_end`: with everything held back); `Err` with the
    /// event to send when a blocked choice reached a value: its text up to the value, then
    /// the end.
    fn release(&mut self, text: &str, at_end: bool) -> Result<String, Event> {
        let Some(redactor) = self.redactor.as_mut() else {
            return Ok(text.to_string());
        };
        let found_before = redactor.findings().len();
        let out = if at_end {
            redactor.finish()
        } else {
            redactor.push(text)
        };
        let block = self.output.as_ref().is_some_and(|o| o.block);
        let Some(first) = redactor.findings().get(found_before).filter(|_| block) else {
            self.released.push_str(&out);
            return Ok(out);
        };
        let kept = out
            .find(&first.category.placeholder())
            .map_or(out.as_str(), |at| &out[..at])
            .to_string();
        tracing::info!(category = %first.category, "a completion reached a sensitive value; ended by the tenant's policy");
        self.released.push_str(&kept);
        if let Some(meter) = &self.meter {
            meter.note(serde_json::json!({"sensitive": {"completion": [first.category.name()], "action": "block"}}));
        }
        if let Some(output) = &self.output {
            // Logged (when the policy keeps text) as the client got it.
            output.finish(self.released.clone(), &self.meter);
        }
        self.inner.cancel();
        self.ended = true;
        let finished = Event::Finished {
            reason: FinishReason::ContentFilter,
            usage: enclave_engine::Usage {
                prompt_tokens: self.inner.prompt_ids.len(),
                completion_tokens: self.generated,
                cached_prompt_tokens: 0,
            },
            text: self.released.clone(),
        };
        if kept.is_empty() {
            return Err(finished);
        }
        self.pending = Some(finished);
        Err(Event::Token {
            id: 0,
            text: kept,
            logprob: 0.0,
            top_logprobs: Vec::new(),
        })
    }
}

impl std::ops::Deref for ChoiceStream {
    type Target = RequestStream;

    fn deref(&self) -> &RequestStream {
        &self.inner
    }
}

/// Refuses a request of `prompts × n` generations that the engine could never hold at once
/// for one tenant (a 400: waiting for a `Retry-After` would never help).
pub(crate) fn check_generations(
    served: &Served,
    prompts: usize,
    n: usize,
    prompt_param: &str,
) -> Result<(), ApiError> {
    let most = served.handle.max_outstanding_per_flow();
    let asked = prompts.saturating_mul(n);
    if asked <= most {
        return Ok(());
    }
    let param = if n > most { "n" } else { prompt_param };
    let why = if prompts == 1 {
        format!("`n` = {n}")
    } else {
        format!("{prompts} prompts × `n` = {n}")
    };
    Err(ApiError::invalid(
        Some(param.to_string()),
        format!(
            "this server runs at most {most} generations of one tenant at once and this request \
             asks for {asked} ({why})"
        ),
    ))
}

/// Charges the prompts of choices submitted `n` per prompt: once per prompt (its choices
/// share it, computed once through the prefix cache). Called once every prompt is accepted, so
/// a request refused part-way is not charged.
pub(crate) fn charge_prompts(meter: &Meter, choices: &[&ChoiceStream], n: usize) {
    if let Some(meter) = meter {
        for first in choices.iter().step_by(n.max(1)) {
            meter.charge_prompt(first.prompt_ids.len());
        }
    }
}

/// Submits `n` copies of `request` (choice `i` seeded `seed + i`, so seeded choices differ
/// yet reproduce); the caller charges the prompt ([`charge_prompts`]). An error for any cancels
/// those already submitted.
pub(crate) async fn submit_choices(
    served: &Served,
    request: GenerateRequest,
    n: usize,
    prompt_param: &str,
    meter: &Meter,
    output: &Option<OutputPolicy>,
) -> Result<Vec<ChoiceStream>, ApiError> {
    if let Some(meter) = meter {
        meter.set_model(&served.name);
    }
    // Rendered and tokenized once for all `n` choices; a long prompt on the bounded pool.
    let valid = if prompt_bytes(&request.prompt) <= blocking::INLINE_BYTES {
        served.handle.engine().validate(request)
    } else {
        let handle = served.handle.clone();
        blocking::run(move || handle.engine().validate(request)).await?
    }
    .map_err(|e| ApiError::from_engine(e, prompt_param))?;
    if let Some(meter) = meter {
        // Every choice holds a concurrency slot; the prompt once and each choice's most
        // tokens are reserved against the token budget (refunded as far as unused).
        let most_tokens = valid
            .prompt_ids
            .len()
            .saturating_add(n.saturating_mul(valid.max_new_tokens));
        meter.claim(n, most_tokens, if n > 1 { "n" } else { prompt_param })?;
    }
    let streams = (0..n)
        .map(|i| {
            let mut request = valid.clone();
            request.sampling.seed = request.sampling.seed.map(|s| s.wrapping_add(i as u64));
            served
                .handle
                .submit_valid(request)
                .map(|inner| ChoiceStream {
                    inner,
                    meter: meter.clone(),
                    redactor: output.as_ref().and_then(OutputPolicy::stream),
                    output: output.clone(),
                    pending: None,
                    generated: 0,
                    released: String::new(),
                    ended: false,
                })
                .map_err(|e| ApiError::from_engine(e, prompt_param))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(streams)
}

/// About how many bytes of text a prompt holds (what tokenizing it costs).
fn prompt_bytes(prompt: &Prompt) -> usize {
    fn text_in(value: &Value) -> usize {
        match value {
            Value::String(text) => text.len(),
            Value::Array(items) => items.iter().map(text_in).sum(),
            Value::Object(fields) => fields.values().map(text_in).sum(),
            _ => 0,
        }
    }
    match prompt {
        Prompt::Text(text) => text.len(),
        Prompt::Chat(messages) => messages.iter().map(text_in).sum(),
        Prompt::TokenIds(_) => 0,
    }
}

/// One generated token with its log-probabilities.
#[derive(Debug, Clone)]
pub(crate) struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A choice run to its end.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    pub prompt_ids: Vec<u32>,
    pub text: String,
    pub tokens: Vec<TokenLogprob>,
    pub prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// Collects a choice's events until it finishes.
pub(crate) async fn run_to_end(mut stream: ChoiceStream) -> Result<Finished, ApiError> {
    let mut tokens = Vec::new();
    let mut prompt_logprobs = None;
    while let Some(event) = stream.next().await {
        match event {
            Event::PromptLogprobs(p) => prompt_logprobs = Some(p),
            Event::Token {
                id,
                logprob,
                top_logprobs,
                ..
            } => tokens.push(TokenLogprob {
                id,
                logprob,
                top: top_logprobs,
            }),
            Event::Finished {
                reason,
                usage,
                text,
            } => {
                return Ok(Finished {
                    prompt_ids: stream.prompt_ids.clone(),
                    text,
                    tokens,
                    prompt_logprobs,
                    finish_reason: reason,
                    usage,
                })
            }
            Event::Failed(message) => {
                tracing::error!(%message, "generation failed");
                return Err(ApiError::internal(format!("generation failed: {message}")));
            }
        }
    }
    Err(ApiError::internal(
        "the engine stopped before the request finished",
    ))
}

/// A token's text as logprob entries show it.
pub(crate) fn token_text(engine: &Engine, id: u32) -> String {
    engine.tokenizer().decode(&[id], false).unwrap_or_default()
}

/// What every response and stream chunk of one request carries: its id, creation time and
/// model name.
pub(crate) struct ReplyHeader {
    id: String,
    created: u64,
    model: String,
}

impl ReplyHeader {
    /// A fresh id with OpenAI's prefix for the endpoint (`chatcmpl`, `cmpl`).
    pub fn new(prefix: &str, model: &str) -> Self {
        Self {
            id: new_id(prefix),
            created: unix_time(),
            model: model.to_string(),
        }
    }

    /// `{"id", "object", "created", "model", "system_fingerprint", "choices"[, "usage"]}`.
    pub fn body(&self, object: &str, choices: Value, usage: Option<Value>) -> Value {
        let mut body = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": choices,
        });
        if let (Some(usage), Some(map)) = (usage, body.as_object_mut()) {
            map.insert("usage".into(), usage);
        }
        body
    }
}

/// OpenAI's `usage` object for choices sharing one prompt (counted once) or several.
pub(crate) fn usage_json(prompt_tokens: usize, completion_tokens: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}
