//! Tokenizers rebuilt from GGUF metadata encode exactly as the Hugging Face tokenizer they were
//! converted from, and an engine on a GGUF file generates what the safetensors folder does.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value as G};
use enclave_engine::{
    DTypeChoice, Engine, EngineConfig, GenerateRequest, Prompt, SamplingParams, Tokenizer,
};
use enclave_models::GgufFile;
use serde_json::Value;

use crate::{fixtures, shared_fixtures};

const TEXTS: &[&str] = &[
    "Hello world",
    "  leading spaces and trailing  ",
    "Numbers 1234567 and 3.14159, dates 2026-11-30",
    "中文测试，你好世界！深度求索。",
    "日本語のテキストとカタカナ",
    "emoji 🤖🚀 and tabs\t\tnewlines\n\n\nend",
    "code: fn main() { println!(\"hi\"); } // don't",
    "<｜User｜>special tokens inline<｜Assistant｜><think>\nreasoning</think>",
    "I'll say it's what we've done, they'd've",
    "",
];

fn assert_same(ours: &Tokenizer, hf: &Tokenizer) {
    for text in TEXTS {
        for special in [true, false] {
            let want = hf.encode(text, special).unwrap();
            assert_eq!(
                ours.encode(text, special).unwrap(),
                want,
                "{text:?} special={special}"
            );
            assert_eq!(
                ours.decode(&want, false).unwrap(),
                hf.decode(&want, false).unwrap(),
                "decode {text:?}"
            );
        }
    }
    assert_eq!(ours.eos_token_id(), hf.eos_token_id());
}

#[test]
fn the_fixture_ggufs_tokenizer_matches_its_tokenizer_json() {
    let path = fixtures().join("gguf/qwen2-f32.gguf");
    let file = GgufFile::open(&path).unwrap();
    let ours = Tokenizer::from_gguf(file.metadata(), &path).unwrap();
    let hf = Tokenizer::from_dir(&fixtures().join("models/qwen2")).unwrap();
    assert_same(&ours, &hf);
}

/// Writes a vocabulary-only GGUF from a Hugging Face tokenizer folder the way llama.cpp's
/// `convert_hf_to_gguf.py` does (`scripts/make_gguf_fixtures.py` has the same logic).
fn vocab_gguf(tokenizer_dir: &Path, pre: &str, out: &Path) {
    let tok: Value = serde_json::from_str(
        &std::fs::read_to_string(tokenizer_dir.join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(tokenizer_dir.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let mut by_id: std::collections::BTreeMap<u64, (String, i32)> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (id.as_u64().unwrap(), (t.clone(), 1)))
        .collect();
    for added in tok["added_tokens"].as_array().unwrap() {
        let kind = if added["special"].as_bool().unwrap() {
            3
        } else {
            4
        };
        by_id.insert(
            added["id"].as_u64().unwrap(),
            (added["content"].as_str().unwrap().to_string(), kind),
        );
    }
    let size = by_id.keys().max().unwrap() + 1;
    let (mut tokens, mut types) = (Vec::new(), Vec::new());
    for id in 0..size {
        let (token, kind) = by_id.get(&id).cloned().unwrap_or((format!("[PAD{id}]"), 4));
        tokens.push(G::String(token));
        types.push(G::I32(kind));
    }
    let merges: Vec<G> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => G::String(s.clone()),
            pair => G::String(format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            )),
        })
        .collect();
    let token_id = |key: &str| {
        let content = match &cfg[key] {
            Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap().to_string(),
        };
        let id = (0..size)
            .find(|id| by_id.get(id).is_some_and(|(t, _)| *t == content))
            .unwrap();
        G::U32(id as u32)
    };
    let metadata = vec![
        ("general.architecture", G::String("llama".into())),
        ("tokenizer.ggml.model", G::String("gpt2".into())),
        ("tokenizer.ggml.pre", G::String(pre.into())),
        ("tokenizer.ggml.tokens", G::Array(tokens)),
        ("tokenizer.ggml.token_type", G::Array(types)),
        ("tokenizer.ggml.merges", G::Array(merges)),
        ("tokenizer.ggml.bos_token_id", token_id("bos_token")),
        ("tokenizer.ggml.eos_token_id", token_id("eos_token")),
        (
            "tokenizer.ggml.add_bos_token",
            G::Bool(cfg["add_bos_token"].as_bool().unwrap_or(false)),
        ),
        (
            "tokenizer.ggml.add_eos_token",
            G::Bool(cfg["add_eos_token"].as_bool().unwrap_or(false)),
        ),
    ];
    let refs: Vec<(&str, &G)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut file, &refs, &[]).unwrap();
}

#[test]
fn the_deepseek_v3_vocabulary_survives_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deepseek-v3-vocab.gguf");
    let source = shared_fixtures().join("deepseek-v3-tokenizer");
    vocab_gguf(&source, "deepseek-v3", &path);
    let file = GgufFile::open(&path).unwrap();
    let ours = Tokenizer::from_gguf(file.metadata(), &path).unwrap();
    let hf = Tokenizer::from_dir(&source).unwrap();
    assert_eq!(ours.vocab_size(), hf.vocab_size());
    assert_same(&ours, &hf);
}

#[test]
fn an_unknown_pre_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.gguf");
    vocab_gguf(&fixtures().join("models/qwen2"), "falcon", &path);
    let file = GgufFile::open(&path).unwrap();
    let error = Tokenizer::from_gguf(file.metadata(), &path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("\"falcon\"") && error.contains("not supported"),
        "{error}"
    );
}

#[test]
fn an_engine_on_the_gguf_generates_what_the_folder_generates() {
    let config = EngineConfig {
        dtype: DTypeChoice::Auto,
        ..EngineConfig::default()
    };
    let from_gguf = Engine::load(&fixtures().join("gguf/qwen2-f32.gguf"), &config).unwrap();
    let from_dir = Engine::load(&fixtures().join("models/qwen2"), &config).unwrap();
    assert_eq!(from_gguf.max_model_len(), from_dir.max_model_len());
    assert!(from_gguf.chat_template().is_some());
    let request = GenerateRequest {
        sampling: Some(SamplingParams::greedy()),
        max_tokens: Some(16),
        ..GenerateRequest::new(Prompt::Chat(vec![
            serde_json::json!({"role": "user", "content": "Why is the sky blue?"}),
        ]))
    };
    let run = |engine: &Engine| {
        let valid = engine.validate(request.clone()).unwrap();
        let generation = engine.generate(&valid, |_| {}).unwrap();
        (
            valid.prompt_ids,
            generation.ids,
            generation.text,
            generation.finish_reason,
        )
    };
    assert_eq!(run(&from_gguf), run(&from_dir));
}

/// The DeepSeek-V3 fixture as a `deepseek2` GGUF (real vocabulary, DeepSeek-R1's template in
/// `tokenizer.chat_template`): its prompts, text and chat, become exactly the ids transformers
/// gave them, and the engine generates from it.
#[test]
fn an_engine_on_the_deepseek_v3_gguf_tokenizes_as_transformers() {
    let config = EngineConfig {
        dtype: DTypeChoice::Auto,
        ..EngineConfig::default()
    };
    let engine = Engine::load(&fixtures().join("gguf/deepseek-v3-bf16.gguf"), &config).unwrap();
    let goldens = crate::read_json(fixtures().join("models/deepseek-v3/goldens.json"));
    let mut chats = 0;
    for golden in goldens["prompts"].as_array().unwrap() {
        let prompt = match (golden.get("text"), golden.get("chat")) {
            (Some(text), _) => Prompt::Text(text.as_str().unwrap().to_string()),
            (None, Some(chat)) => {
                chats += 1;
                Prompt::Chat(chat.as_array().unwrap().clone())
            }
            _ => panic!("golden without a prompt: {golden}"),
        };
        let request = GenerateRequest {
            sampling: Some(SamplingParams::greedy()),
            max_tokens: Some(8),
            ..GenerateRequest::new(prompt)
        };
        let valid = engine.validate(request).unwrap();
        assert_eq!(valid.prompt_ids, crate::ids(&golden["ids"]), "{golden}");
        let generation = engine.generate(&valid, |_| {}).unwrap();
        assert!(!generation.ids.is_empty());
    }
    assert!(chats > 0);
}
