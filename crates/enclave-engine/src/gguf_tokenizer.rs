//! A GGUF file's tokenizer rebuilt as the Hugging Face tokenizer it was converted from.
//!
//! `tokenizer.ggml.model = "gpt2"` (byte-level BPE): tokens in id order, merges, token types
//! (control and user-defined tokens become added tokens), and the pre-tokenizer named by
//! `tokenizer.ggml.pre`, whose regular expressions are those of the original
//! `tokenizer.json` (llama.cpp keeps the same table in `llama-vocab.cpp`).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as GgufValue;
use serde_json::{json, Value};

use crate::error::{EngineError, Result};

/// llama.cpp's token types.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

fn err(message: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(format!("GGUF tokenizer: {}", message.into()))
}

fn strings<'a>(metadata: &'a HashMap<String, GgufValue>, key: &str) -> Result<Vec<&'a str>> {
    match metadata.get(key) {
        Some(GgufValue::Array(items)) => items
            .iter()
            .map(|v| {
                v.to_string()
                    .map(String::as_str)
                    .map_err(|_| err(format!("{key} must hold strings")))
            })
            .collect(),
        Some(_) => Err(err(format!("{key} must be an array"))),
        None => Err(err(format!("{key} is missing"))),
    }
}

fn integer(value: &GgufValue) -> Option<i64> {
    enclave_models::gguf::number(value).map(|n| n as i64)
}

/// The pre-tokenizer of `tokenizer.ggml.pre`, as in the original `tokenizer.json`.
fn pre_tokenizer(pre: &str) -> Result<(Value, Value)> {
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let sequence = |mut splits: Vec<Value>| {
        splits.push(byte_level(false));
        json!({"type": "Sequence", "pretokenizers": splits})
    };
    Ok(match pre {
        // GPT-2's own regex, built into the byte-level pre-tokenizer.
        "default" | "gpt2" => (byte_level(true), Value::Null),
        "deepseek-v3" => (
            sequence(vec![
                split(r"\p{N}{1,3}"),
                split("[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+"),
                split(r"[!\x22#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            ]),
            Value::Null,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            sequence(vec![split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")]),
            json!({"type": "NFC"}),
        ),
        "llama-bpe" | "llama3" => (
            sequence(vec![split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")]),
            Value::Null,
        ),
        other => {
            return Err(err(format!(
                "tokenizer.ggml.pre {other:?} is not supported (supported: default, gpt2, deepseek-v3, qwen2, deepseek-r1-qwen, llama-bpe)"
            )))
        }
    })
}

/// The `tokenizers` JSON and the `tokenizer_config.json` equivalent (special tokens,
/// `add_bos_token`, chat template) of a GGUF file's metadata.
pub(crate) fn hf_tokenizer(metadata: &HashMap<String, GgufValue>) -> Result<(Value, Value)> {
    let model = metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| err("tokenizer.ggml.model is missing"))?;
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer.ggml.model {model:?} is not supported yet (supported: gpt2)"
        )));
    }
    let pre = metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map_or("default", String::as_str);
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let merges = strings(metadata, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match metadata.get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(items)) => items.iter().map(|v| integer(v).unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (&token, &kind)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert(token.to_string(), json!(id));
        if kind == CONTROL || kind == USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == CONTROL,
            }));
        }
    }
    let (pre_tokenizer, normalizer) = pre_tokenizer(pre)?;
    // Llama 3's tokenizer.json takes whole vocabulary words before merges (`ignore_merges`),
    // and llama.cpp adds its BOS unless the file says otherwise.
    let llama3 = matches!(pre, "llama-bpe" | "llama3");
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": llama3, "vocab": vocab, "merges": merges,
        },
    });
    let token_at = |key: &str| {
        metadata
            .get(key)
            .and_then(integer)
            .and_then(|id| tokens.get(usize::try_from(id).ok()?))
            .map(|t| json!(t))
    };
    let flag = |key: &str| metadata.get(key).and_then(|v| v.to_bool().ok());
    let mut config = json!({});
    if let Some(bos) = token_at("tokenizer.ggml.bos_token_id") {
        config["bos_token"] = bos;
    }
    if let Some(eos) = token_at("tokenizer.ggml.eos_token_id") {
        config["eos_token"] = eos;
    }
    if let Some(pad) = token_at("tokenizer.ggml.padding_token_id") {
        config["pad_token"] = pad;
    }
    config["add_bos_token"] = json!(flag("tokenizer.ggml.add_bos_token").unwrap_or(llama3));
    config["add_eos_token"] = json!(flag("tokenizer.ggml.add_eos_token").unwrap_or(false));
    if let Some(template) = metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        config["chat_template"] = json!(template);
    }
    Ok((tokenizer, config))
}
