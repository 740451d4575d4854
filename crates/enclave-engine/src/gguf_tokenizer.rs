//! A GGUF file's tokenizer rebuilt as the Hugging Face tokenizer it was converted from.
//!
//! `tokenizer.ggml.model = "gpt2"` (byte-level BPE): tokens in id order, merges, token types
//! (control and user-defined tokens become added tokens), and the pre-tokenizer named by
//! `tokenizer.ggml.pre`, whose regular expressions are those of the original
//! `tokenizer.json` (llama.cpp keeps the same table in `llama-vocab.cpp`).
//!
//! `tokenizer.ggml.model = "llama"` (SentencePiece BPE: Llama 2, Gemma): the file has scores
//! instead of merges. SentencePiece repeatedly merges the adjacent pair whose concatenation is
//! the highest-scoring vocabulary entry, which is BPE whose merges are every split of every
//! entry ranked by that entry's score — how `transformers` converts these tokenizers too.
//! Spaces become `▁`, and characters outside the vocabulary fall back to `<0xXX>` byte tokens.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as GgufValue;
use serde_json::{json, Value};

use crate::error::{EngineError, Result};

/// llama.cpp's token types.
const NORMAL: i64 = 1;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Texts llama.cpp recognises as end-of-turn tokens (`llama-vocab.cpp`), which end generation
/// like EOS does.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// The ids of tokens that end a turn (see [`END_OF_TURN_TEXTS`]); like llama.cpp, whatever
/// type the file gives them.
pub(crate) fn end_of_turn_ids(metadata: &HashMap<String, GgufValue>) -> Vec<u32> {
    let Ok(tokens) = strings(metadata, "tokenizer.ggml.tokens") else {
        return Vec::new();
    };
    let types = token_types(metadata, tokens.len());
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (token, _))| END_OF_TURN_TEXTS.contains(token))
        .map(|(id, _)| id as u32)
        .collect()
}

fn token_types(metadata: &HashMap<String, GgufValue>, count: usize) -> Vec<i64> {
    match metadata.get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(items)) => items.iter().map(|v| integer(v).unwrap_or(1)).collect(),
        _ => vec![NORMAL; count],
    }
}

/// Gemma's chat template (`transformers`' `google/gemma-3-*-it` one), for Gemma GGUF files that
/// carry none.
const GEMMA_CHAT_TEMPLATE: &str = include_str!("templates/gemma.jinja");

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
    let pre = metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map_or("default", String::as_str);
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let types = token_types(metadata, tokens.len());
    if types.len() != tokens.len() {
        return Err(err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let flag = |key: &str| metadata.get(key).and_then(|v| v.to_bool().ok());
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (&token, &kind)) in tokens.iter().zip(&types).enumerate() {
        // The first of duplicated entries wins, as in llama.cpp's text-to-token map.
        vocab.entry(token.to_string()).or_insert(json!(id));
        if kind == CONTROL || kind == USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == CONTROL,
            }));
        }
    }
    // Llama 3's tokenizer.json takes whole vocabulary words before merges (`ignore_merges`),
    // and llama.cpp adds its BOS unless the file says otherwise.
    let llama3 = matches!(pre, "llama-bpe" | "llama3");
    let token_at = |key: &str| {
        metadata
            .get(key)
            .and_then(integer)
            .and_then(|id| tokens.get(usize::try_from(id).ok()?))
    };
    let tokenizer = match model.as_str() {
        "gpt2" => {
            let merges = strings(metadata, "tokenizer.ggml.merges")?;
            let (pre_tokenizer, normalizer) = pre_tokenizer(pre)?;
            json!({
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
            })
        }
        "llama" => {
            let scores = match metadata.get("tokenizer.ggml.scores") {
                Some(GgufValue::Array(items)) => items
                    .iter()
                    .map(|v| enclave_models::gguf::number(v).map(|n| n as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or_else(|| err("tokenizer.ggml.scores must hold numbers"))?,
                _ => return Err(err("tokenizer.ggml.scores is missing")),
            };
            if scores.len() != tokens.len() {
                return Err(err(format!(
                    "tokenizer.ggml.scores has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                )));
            }
            // llama.cpp prepends a space unless the file says not to.
            let add_space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let merges = sentencepiece_merges(&tokens, &types, &scores);
            let replace_space =
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
            let mut normalizers = vec![replace_space];
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                normalizers.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
                    "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                    "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges,
                },
            })
        }
        other => {
            return Err(err(format!(
                "tokenizer.ggml.model {other:?} is not supported (supported: gpt2, llama)"
            )))
        }
    };
    let mut config = json!({});
    if let Some(bos) = token_at("tokenizer.ggml.bos_token_id") {
        config["bos_token"] = json!(bos);
    }
    if let Some(eos) = token_at("tokenizer.ggml.eos_token_id") {
        config["eos_token"] = json!(eos);
    }
    if let Some(pad) = token_at("tokenizer.ggml.padding_token_id") {
        config["pad_token"] = json!(pad);
    }
    if let Some(unk) = token_at("tokenizer.ggml.unknown_token_id") {
        config["unk_token"] = json!(unk);
    }
    let sentencepiece = model == "llama";
    config["add_bos_token"] =
        json!(flag("tokenizer.ggml.add_bos_token").unwrap_or(llama3 || sentencepiece));
    config["add_eos_token"] = json!(flag("tokenizer.ggml.add_eos_token").unwrap_or(false));
    let architecture = metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok());
    match metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        Some(template) => config["chat_template"] = json!(template),
        None if architecture.is_some_and(|a| a.starts_with("gemma")) => {
            config["chat_template"] = json!(GEMMA_CHAT_TEMPLATE)
        }
        None => {}
    }
    Ok((tokenizer, config))
}

/// SentencePiece's merge order as BPE merges: every split of every normal or user-defined entry
/// into two vocabulary entries, highest-scoring result first (ties: lower id first). (llama.cpp
/// may also merge into control tokens; those only occur as parsed special tokens here.)
fn sentencepiece_merges(tokens: &[&str], types: &[i64], scores: &[f32]) -> Vec<[String; 2]> {
    let known: std::collections::HashSet<&str> = tokens.iter().copied().collect();
    let mut merges: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (id, ((&token, &kind), &score)) in tokens.iter().zip(types).zip(scores).enumerate() {
        if kind != NORMAL && kind != USER_DEFINED {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if known.contains(left) && known.contains(right) {
                merges.push((score, id, left, right));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    merges
        .into_iter()
        .map(|(_, _, left, right)| [left.to_string(), right.to_string()])
        .collect()
}
