//! Each tenant's sensitive-data policy, applied at the edge: prompts may be left alone but
//! logged redacted (`log_only`), redacted before the model sees them (`mask`), or refused
//! (`block`, a 400 naming the categories, never the values); completions may be logged
//! redacted (`log_only`), redacted as they stream (`mask`), or cut before the first value
//! (`block`, `finish_reason: "content_filter"`); and the audit record may keep the redacted
//! text (`store_text`).

use std::collections::HashMap;
use std::sync::Arc;

use enclave_redact::{Redacted, Redactor, StreamRedactor};
use serde_json::{json, Value};

use crate::blocking;
use crate::error::ApiError;
use crate::generation::Meter;

/// What happens to a prompt with sensitive values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptAction {
    #[default]
    Off,
    /// Served as sent; the audit record holds the redacted text.
    LogOnly,
    /// Redacted before the model sees it.
    Mask,
    /// Refused with a 400 naming the categories.
    Block,
}

/// What happens to generated text with sensitive values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompletionAction {
    #[default]
    Off,
    /// Sent as generated; the audit record holds the redacted text.
    LogOnly,
    /// Redacted before the client sees it, streams included.
    Mask,
    /// The choice ends before the first value, with `finish_reason: "content_filter"`.
    Block,
}

impl PromptAction {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "off" => Self::Off,
            "log_only" => Self::LogOnly,
            "mask" => Self::Mask,
            "block" => Self::Block,
            _ => return None,
        })
    }
}

impl CompletionAction {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "off" => Self::Off,
            "log_only" => Self::LogOnly,
            "mask" => Self::Mask,
            "block" => Self::Block,
            _ => return None,
        })
    }
}

/// One tenant's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantPolicy {
    pub prompt: PromptAction,
    pub completion: CompletionAction,
    /// Keep the prompt and completion, redacted, in the audit record.
    pub store_text: bool,
}

/// The detector and every tenant's policy.
#[derive(Debug, Clone)]
pub struct RedactionPolicies {
    pub redactor: Arc<Redactor>,
    /// For tenants without their own.
    pub default: TenantPolicy,
    pub tenants: HashMap<String, TenantPolicy>,
    /// Detectors of tenants that look for other categories than `redactor` does.
    pub scoped: HashMap<String, Arc<Redactor>>,
}

impl RedactionPolicies {
    pub fn policy(&self, tenant: &str) -> TenantPolicy {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }

    /// The detector of `tenant`'s categories.
    pub fn redactor(&self, tenant: &str) -> &Arc<Redactor> {
        self.scoped.get(tenant).unwrap_or(&self.redactor)
    }
}

/// How one request's output is treated.
#[derive(Debug, Clone)]
pub(crate) struct OutputPolicy {
    redactor: Arc<Redactor>,
    mask: bool,
    /// End the choice before the first value.
    pub block: bool,
    store: bool,
}

impl OutputPolicy {
    /// A stream redactor when completions are masked or blocked.
    pub fn stream(&self) -> Option<StreamRedactor> {
        (self.mask || self.block).then(|| self.redactor.stream())
    }

    /// The finished text as the client gets it, logged (redacted) when the policy says so.
    pub fn finish(&self, text: String, meter: &Meter) -> String {
        if !self.mask && !self.store && !self.block {
            return text;
        }
        let redacted = self.redactor.redact_ending(&text);
        if self.store {
            if let Some(meter) = meter {
                meter.log_completion(&redacted.text);
            }
        }
        match redacted.findings.first() {
            _ if self.mask => redacted.text,
            // A blocked choice ends before its first value.
            Some(first) if self.block => text[..first.start].to_string(),
            _ => text,
        }
    }
}

/// Most bytes of prompt text one request may have checked: redaction scales with the text, and
/// no context window holds more.
pub const MAX_CHECKED_BYTES: usize = 4 << 20;
/// Most sensitive values one request's prompt may hold: beyond this it is a data dump, not a
/// prompt, and masking it would only make the audit record enormous.
pub const MAX_FINDINGS: usize = 10_000;

/// Applies the caller's prompt policy to `texts` (the messages' contents, or the prompts),
/// in place; returns how the output is to be treated. `param` names the field in errors.
/// Large texts are redacted on the bounded work pool, off the async workers.
pub(crate) async fn apply(
    policies: Option<&RedactionPolicies>,
    tenant: &str,
    texts: &mut [&mut String],
    param: &str,
    meter: &Meter,
    wants_logprobs: bool,
) -> Result<Option<OutputPolicy>, ApiError> {
    let Some(policies) = policies else {
        return Ok(None);
    };
    let policy = policies.policy(tenant);
    if policy == TenantPolicy::default() {
        return Ok(None);
    }
    let redactor = policies.redactor(tenant);
    let checks_prompt = policy.prompt != PromptAction::Off || policy.store_text;
    if checks_prompt {
        let bytes: usize = texts.iter().map(|t| t.len()).sum();
        if bytes > MAX_CHECKED_BYTES {
            return Err(ApiError::invalid(
                Some(param.to_string()),
                format!(
                    "`{param}` holds {bytes} bytes of text; this tenant's redaction policy checks \
                     at most {MAX_CHECKED_BYTES} per request"
                ),
            ));
        }
        let redactions: Vec<Redacted> = if bytes <= blocking::INLINE_BYTES {
            texts.iter().map(|text| redactor.redact(text)).collect()
        } else {
            let owned: Vec<String> = texts.iter().map(|text| text.to_string()).collect();
            let redactor = redactor.clone();
            blocking::run(move || owned.iter().map(|text| redactor.redact(text)).collect()).await?
        };
        let found: usize = redactions.iter().map(|r| r.findings.len()).sum();
        if found > MAX_FINDINGS {
            return Err(ApiError::invalid(
                Some(param.to_string()),
                format!(
                    "`{param}` holds {found} sensitive values; this tenant's redaction policy \
                     handles at most {MAX_FINDINGS} per request"
                ),
            ));
        }
        let mut categories: Vec<String> = Vec::new();
        let mut logged = Vec::new();
        for (text, redacted) in texts.iter_mut().zip(redactions) {
            for f in &redacted.findings {
                let name = f.category.name().to_string();
                if !categories.contains(&name) {
                    categories.push(name);
                }
            }
            logged.push(redacted.text.clone());
            if policy.prompt == PromptAction::Mask {
                **text = redacted.text;
            }
        }
        if !categories.is_empty() {
            let action = match policy.prompt {
                PromptAction::Off => "none",
                PromptAction::LogOnly => "log_only",
                PromptAction::Mask => "mask",
                PromptAction::Block => "block",
            };
            if let Some(meter) = meter {
                meter.note(json!({"sensitive": {"prompt": categories, "action": action}}));
            }
            if policy.prompt == PromptAction::Block {
                return Err(ApiError {
                    code: Some("sensitive_data"),
                    ..ApiError::invalid(
                        Some(param.to_string()),
                        format!(
                            "`{param}` contains sensitive data ({}), which this tenant's policy does not allow",
                            categories.join(", ")
                        ),
                    )
                });
            }
        }
        if policy.prompt == PromptAction::LogOnly || policy.store_text {
            if let Some(meter) = meter {
                meter.log_prompt(&logged.join("\n"));
            }
        }
    }
    let hides = matches!(
        policy.completion,
        CompletionAction::Mask | CompletionAction::Block
    );
    if hides && wants_logprobs {
        return Err(ApiError::invalid(
            Some("logprobs".into()),
            "log-probabilities would show the text this tenant's policy redacts; leave `logprobs` off",
        ));
    }
    let output = OutputPolicy {
        redactor: redactor.clone(),
        mask: policy.completion == CompletionAction::Mask,
        block: policy.completion == CompletionAction::Block,
        store: policy.store_text || policy.completion == CompletionAction::LogOnly,
    };
    Ok((output.mask || output.block || output.store).then_some(output))
}

/// Every string inside `value`, for checking in place.
pub(crate) fn strings_in<'a>(value: &'a mut Value, out: &mut Vec<&'a mut String>) {
    match value {
        Value::String(text) => out.push(text),
        Value::Array(items) => items.iter_mut().for_each(|v| strings_in(v, out)),
        Value::Object(fields) => fields.values_mut().for_each(|v| strings_in(v, out)),
        _ => {}
    }
}

/// A token-id prompt cannot be checked: refused under a policy that would check it.
pub(crate) fn refuse_unchecked(
    policies: Option<&RedactionPolicies>,
    tenant: &str,
) -> Result<(), ApiError> {
    let policy = policies.map(|p| p.policy(tenant));
    let checks = policy.is_some_and(|p| p.prompt != PromptAction::Off || p.store_text);
    if checks {
        return Err(ApiError::invalid(
            Some("prompt".into()),
            "token-id prompts cannot be checked (or logged redacted) as this tenant's policy requires; send text",
        ));
    }
    Ok(())
}

/// The audit record's text: the redacted prompt and completion.
pub(crate) fn logged_text(prompt: Option<&str>, completion: &[String]) -> Option<String> {
    if prompt.is_none() && completion.is_empty() {
        return None;
    }
    let mut text = json!({});
    if let Some(prompt) = prompt {
        text["prompt"] = Value::String(prompt.to_string());
    }
    if !completion.is_empty() {
        text["completion"] = json!(completion);
    }
    Some(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_choice_loses_a_value_cut_short_at_its_end() {
        let policy = |mask, block| OutputPolicy {
            redactor: Arc::new(Redactor::default()),
            mask,
            block,
            store: false,
        };
        // Cut one digit short by `max_tokens` or a stop sequence.
        let text = "您的手机号是1381234567".to_string();
        assert_eq!(
            policy(true, false).finish(text.clone(), &None),
            "您的手机号是[MOBILE]"
        );
        assert_eq!(
            policy(false, true).finish(text.clone(), &None),
            "您的手机号是"
        );
        // Streamed: the held-back end is released masked too.
        let mut stream = policy(true, false).stream().unwrap();
        let mut out = stream.push(&text);
        out.push_str(&stream.finish());
        assert_eq!(out, "您的手机号是[MOBILE]");
    }
}
