//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes).

use std::sync::Arc;

use axum::extract::State;
use axum::Extension;
use axum::Json;
use enclave_gateway::Principal;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::blocking;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub(crate) struct TokenizeRequest {
    model: Option<String>,
    /// Text to tokenize; or `messages`, rendered with the chat template first.
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    /// Add BOS and the like as the tokenizer config says (text prompts; default true).
    add_special_tokens: Option<bool>,
}

pub(crate) async fn tokenize(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    ApiJson(request): ApiJson<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let served = state.model(request.model.as_deref(), &caller)?;
    let engine = served.handle.engine();
    let (text, add_special) = match (request.prompt, request.messages) {
        (Some(prompt), None) => (prompt, request.add_special_tokens.unwrap_or(true)),
        (None, Some(messages)) => (
            engine
                .render_chat(&crate::chat::normalize_messages(messages)?)
                .map_err(|e| ApiError::from_engine(e, "messages"))?,
            // The template writes its own special tokens.
            request.add_special_tokens.unwrap_or(false),
        ),
        _ => {
            return Err(ApiError::invalid(
                Some("prompt".to_string()),
                "give exactly one of `prompt` and `messages`",
            ))
        }
    };
    engine
        .check_text_len(&text)
        .map_err(|e| ApiError::from_engine(e, "prompt"))?;
    let max_model_len = engine.max_model_len();
    // Long texts are tokenized on the bounded pool, never on an async worker.
    let tokens = if text.len() <= blocking::INLINE_BYTES {
        engine.tokenizer().encode(&text, add_special)
    } else {
        let handle = served.handle.clone();
        blocking::run(move || handle.engine().tokenizer().encode(&text, add_special)).await?
    }
    .map_err(|e| ApiError::from_engine(e, "prompt"))?;
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": max_model_len,
        "tokens": tokens,
    })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub(crate) async fn detokenize(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Principal>,
    ApiJson(request): ApiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let served = state.model(request.model.as_deref(), &caller)?;
    let engine = served.handle.engine();
    let vocab = engine.model().info().vocab_size;
    if let Some(bad) = request.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            Some("tokens".to_string()),
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    let prompt = engine
        .tokenizer()
        .decode(&request.tokens, false)
        .map_err(|e| ApiError::from_engine(e, "tokens"))?;
    Ok(Json(json!({"prompt": prompt})))
}
