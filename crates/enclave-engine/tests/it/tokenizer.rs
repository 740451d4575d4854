//! The real DeepSeek-V3 tokenizer against `transformers` 4.x, and the tiny fixtures' tokenizer.

use enclave_engine::Tokenizer;

use crate::{deepseek_v3_tokenizer, fixtures, ids, read_json};

#[test]
fn deepseek_v3_encode_and_decode_match_transformers() {
    let tok = deepseek_v3_tokenizer();
    let goldens = read_json(fixtures().join("tokenizer/deepseek-v3.json"));
    let cases = goldens["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids_with_special"]),
            "with special tokens: {text:?}"
        );
        let without = ids(&case["ids_without_special"]);
        assert_eq!(
            tok.encode(text, false).unwrap(),
            without,
            "without: {text:?}"
        );
        let with = ids(&case["ids_with_special"]);
        assert_eq!(
            tok.decode(&with, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode: {text:?}"
        );
        assert_eq!(
            tok.decode(&with, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode skipping special tokens: {text:?}"
        );
        // Round trip: decoding the plain encoding gives the text back.
        assert_eq!(tok.decode(&without, false).unwrap(), text);
    }
}

#[test]
fn deepseek_v3_special_tokens_come_from_tokenizer_config() {
    let tok = deepseek_v3_tokenizer();
    let special = tok.special_tokens();
    assert_eq!(special.bos.as_deref(), Some("<｜begin▁of▁sentence｜>"));
    assert_eq!(special.eos.as_deref(), Some("<｜end▁of▁sentence｜>"));
    assert_eq!(tok.eos_token_id(), Some(1));
    // add_bos_token: true puts BOS first, and only with special tokens.
    assert_eq!(tok.encode("hi", true).unwrap()[0], 0);
    assert_ne!(tok.encode("hi", false).unwrap()[0], 0);
}

#[test]
fn tiny_tokenizer_matches_the_prompts_transformers_encoded() {
    for model in ["qwen2", "llama-llama3-rope"] {
        let dir = fixtures().join("models").join(model);
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let goldens = read_json(dir.join("goldens.json"));
        for prompt in goldens["prompts"].as_array().unwrap() {
            if let Some(text) = prompt["text"].as_str() {
                assert_eq!(
                    tok.encode(text, true).unwrap(),
                    ids(&prompt["ids"]),
                    "{text:?}"
                );
            }
        }
    }
}

#[test]
fn a_missing_tokenizer_file_is_named() {
    let err = Tokenizer::from_dir(std::path::Path::new("/nonexistent"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
}

/// Token bytes are exact even where a token is half a character: concatenated, they are the
/// text's UTF-8, which decoding tokens one by one cannot give.
#[test]
fn token_bytes_rebuild_the_text_exactly() {
    let tok = enclave_engine::Tokenizer::from_dir(
        &crate::shared_fixtures().join("deepseek-v3-tokenizer"),
    )
    .unwrap();
    for text in [
        "Hello, world!\n\tTabs",
        "中文和日本語のテキスト 🤖🚀",
        "café naïve Ünïcödé",
    ] {
        let ids = tok.encode(text, false).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| tok.token_bytes(id).unwrap())
            .collect();
        assert_eq!(bytes, text.as_bytes(), "{text:?}");
    }
    let user = tok.token_to_id("<｜User｜>").unwrap();
    assert_eq!(tok.token_bytes(user).unwrap(), "<｜User｜>".as_bytes());
}
