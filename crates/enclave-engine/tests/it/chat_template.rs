//! The DeepSeek-V3 and DeepSeek-R1 chat templates, byte for byte against
//! `transformers.apply_chat_template` (4.x).

use enclave_engine::ChatTemplate;

use crate::{deepseek_v3_tokenizer, fixtures, ids, read_json, shared_fixtures};

fn templates() -> Vec<(&'static str, ChatTemplate)> {
    let tok = deepseek_v3_tokenizer();
    let v3_dir = shared_fixtures().join("deepseek-v3-tokenizer");
    let v3 = ChatTemplate::from_model_dir(&v3_dir, tok.config(), tok.special_tokens().clone())
        .unwrap()
        .unwrap();
    let r1_source =
        std::fs::read_to_string(shared_fixtures().join("deepseek-r1/chat_template.jinja")).unwrap();
    let r1 = ChatTemplate::new(r1_source, tok.special_tokens().clone()).unwrap();
    vec![("deepseek-v3", v3), ("deepseek-r1", r1)]
}

#[test]
fn deepseek_templates_render_byte_for_byte() {
    let tok = deepseek_v3_tokenizer();
    let templates = templates();
    let goldens = read_json(fixtures().join("chat-template/deepseek.json"));
    let cases = goldens["cases"].as_array().unwrap();
    let mut seen = std::collections::HashSet::new();
    for case in cases {
        let template_name = case["template"].as_str().unwrap();
        let (_, template) = templates.iter().find(|(n, _)| *n == template_name).unwrap();
        let messages = case["messages"].as_array().unwrap();
        let tools = case["tools"].as_array().map(Vec::as_slice);
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let conversation = case["conversation"].as_str().unwrap();
        let text = template.render(messages, tools, add).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{template_name} / {conversation} / add_generation_prompt={add}"
        );
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&case["ids"]),
            "{conversation}"
        );
        seen.insert((template_name.to_string(), conversation.to_string()));
    }
    for conversation in [
        "system_user",
        "multi_turn",
        "assistant_with_think",
        "tool_calls",
        "tool_outputs_last",
    ] {
        for template in ["deepseek-v3", "deepseek-r1"] {
            assert!(seen.contains(&(template.to_string(), conversation.to_string())));
        }
    }
}

#[test]
fn r1_strips_earlier_reasoning_and_opens_think() {
    let (_, r1) = templates().remove(1);
    let messages = vec![
        serde_json::json!({"role": "user", "content": "q1"}),
        serde_json::json!({"role": "assistant", "content": "<think>secret</think>answer"}),
        serde_json::json!({"role": "user", "content": "q2"}),
    ];
    let text = r1.render(&messages, None, true).unwrap();
    assert!(!text.contains("secret"), "{text}");
    assert!(text.ends_with("<｜Assistant｜><think>\n"), "{text}");
}

/// Gemma's template (built in for Gemma GGUF files, which carry none) byte for byte against
/// `apply_chat_template`, and a conversation that does not alternate is refused as it is there.
#[test]
fn gemma_template_renders_byte_for_byte() {
    let source = include_str!("../../src/templates/gemma.jinja").to_string();
    let special = enclave_engine::SpecialTokens {
        bos: Some("<bos>".into()),
        ..Default::default()
    };
    let template = ChatTemplate::new(source, special).unwrap();
    let goldens = read_json(fixtures().join("chat-template/gemma.json"));
    let cases = goldens["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let text = template
            .render(case["messages"].as_array().unwrap(), None, add)
            .unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{}",
            case["conversation"]
        );
    }
    let broken = [
        serde_json::json!({"role": "user", "content": "a"}),
        serde_json::json!({"role": "user", "content": "b"}),
    ];
    let err = template
        .render(&broken, None, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("alternate"), "{err}");
}
