//! Streaming detokenization never emits a broken character and adds up to the full decode.

use enclave_engine::IncrementalDetokenizer;

use crate::{deepseek_v3_tokenizer, fixtures, ids, read_json};

#[test]
fn streamed_text_equals_full_decode_and_has_no_broken_characters() {
    let tok = deepseek_v3_tokenizer();
    let goldens = read_json(fixtures().join("tokenizer/deepseek-v3.json"));
    for case in goldens["cases"].as_array().unwrap() {
        let all = ids(&case["ids_without_special"]);
        let prompt = &all[..all.len() / 3];
        let generated = &all[all.len() / 3..];
        let prefix = tok.decode(prompt, false).unwrap();
        // A prompt cut inside a character gives no context: the completion decodes alone.
        let expected = if prefix.ends_with('\u{FFFD}') {
            tok.decode(generated, false).unwrap()
        } else {
            tok.decode(&all, false).unwrap()[prefix.len()..].to_string()
        };
        let mut detok = IncrementalDetokenizer::new(&tok, prompt, false);
        let mut streamed = String::new();
        for &id in generated {
            let delta = detok.push(&tok, id).unwrap();
            if !expected.contains('\u{FFFD}') {
                assert!(!delta.contains('\u{FFFD}'), "broken character in {delta:?}");
            }
            streamed.push_str(&delta);
        }
        streamed.push_str(&detok.flush(&tok).unwrap());
        assert_eq!(streamed, expected, "{:?}", case["text"]);
    }
}

#[test]
fn a_character_split_across_tokens_is_held_until_complete() {
    let tok = deepseek_v3_tokenizer();
    let text = "Emoji: 😀🎉🚀👩‍👩‍👧‍👦 深度求索";
    let all = tok.encode(text, false).unwrap();
    // The test only means something if some token alone is an incomplete UTF-8 sequence.
    assert!(all
        .iter()
        .any(|&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}')));
    let mut detok = IncrementalDetokenizer::new(&tok, &[], false);
    let mut held = 0;
    let mut streamed = String::new();
    for &id in &all {
        let delta = detok.push(&tok, id).unwrap();
        held += usize::from(delta.is_empty());
        assert!(!delta.contains('\u{FFFD}'));
        streamed.push_str(&delta);
    }
    streamed.push_str(&detok.flush(&tok).unwrap());
    assert!(held > 0, "some token should have been held back");
    assert_eq!(streamed, text);
}
