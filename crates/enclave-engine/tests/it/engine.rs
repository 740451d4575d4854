//! The generation loop on a tiny model, against `transformers` goldens.

use candle_core::safetensors::load;
use enclave_engine::{Engine, EngineConfig, FinishReason, GenerateRequest, Prompt, SamplingParams};

use crate::{fixtures, ids, read_json};

fn engine(name: &str) -> Engine {
    Engine::load(
        &fixtures().join("models").join(name),
        &EngineConfig::default(),
    )
    .unwrap()
}

fn goldens(name: &str) -> serde_json::Value {
    read_json(fixtures().join("models").join(name).join("goldens.json"))
}

fn greedy_request(prompt: Prompt, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        sampling: Some(SamplingParams::greedy()),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..GenerateRequest::new(prompt)
    }
}

#[test]
fn greedy_generation_matches_transformers_with_raw_logprobs() {
    for name in ["llama-llama3-rope", "qwen2", "qwen2-tied"] {
        let engine = engine(name);
        let golden = goldens(name);
        let logits = load(
            fixtures()
                .join("models")
                .join(name)
                .join("goldens.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (i, prompt) in golden["prompts"].as_array().unwrap().iter().enumerate() {
            let expected = ids(&prompt["greedy"]);
            let request = engine
                .validate(greedy_request(
                    Prompt::TokenIds(ids(&prompt["ids"])),
                    expected.len(),
                ))
                .unwrap();
            let mut streamed = String::new();
            let generation = engine
                .generate(&request, |event| streamed.push_str(event.text))
                .unwrap();
            assert_eq!(generation.ids, expected, "{name} prompt {i}");
            assert_eq!(generation.finish_reason, FinishReason::Length);
            assert_eq!(streamed, generation.text);
            assert_eq!(
                generation.text,
                engine.tokenizer().decode(&expected, true).unwrap()
            );
            // The first token's logprob is the log-softmax of the reference's last logits.
            let last: Vec<Vec<f32>> = logits[&format!("logits.{i}")].to_vec2().unwrap();
            let row = last.last().unwrap();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&l| (l as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let expected_lp = row[expected[0] as usize] as f64 - lse;
            assert!((generation.logprobs[0] as f64 - expected_lp).abs() < 1e-4);
            assert_eq!(generation.logprobs.len(), generation.ids.len());
        }
    }
}

#[test]
fn text_and_chat_prompts_tokenize_as_transformers_does() {
    let engine = engine("qwen2");
    for prompt in goldens("qwen2")["prompts"].as_array().unwrap() {
        let request = if let Some(text) = prompt["text"].as_str() {
            GenerateRequest::new(Prompt::Text(text.into()))
        } else {
            let messages = prompt["chat"].as_array().unwrap().clone();
            GenerateRequest::new(Prompt::Chat(messages))
        };
        let valid = engine
            .validate(GenerateRequest {
                max_tokens: Some(1),
                ..request
            })
            .unwrap();
        assert_eq!(valid.prompt_ids, ids(&prompt["ids"]));
    }
}

#[test]
fn stop_strings_end_generation_and_are_not_emitted() {
    let engine = engine("qwen2");
    let prompt = Prompt::Text("The quick brown fox".into());
    let full = engine
        .generate(
            &engine.validate(greedy_request(prompt.clone(), 32)).unwrap(),
            |_| {},
        )
        .unwrap();
    // Pick a stop string from the middle of the greedy output.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let mut request = greedy_request(prompt, 32);
    request.stop = vec![stop.clone()];
    let mut streamed = String::new();
    let stopped = engine
        .generate(&engine.validate(request).unwrap(), |e| {
            streamed.push_str(e.text)
        })
        .unwrap();
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.text, full.text[..cut]);
    assert_eq!(streamed, stopped.text);
    assert!(!streamed.contains(&stop));
}

#[test]
fn stop_token_ids_and_eos_end_generation() {
    let engine = engine("qwen2");
    let prompt = Prompt::TokenIds(vec![0, 344, 74, 454]);
    let full = engine
        .generate(
            &engine.validate(greedy_request(prompt.clone(), 10)).unwrap(),
            |_| {},
        )
        .unwrap();
    let mut request = greedy_request(prompt, 10);
    request.stop_token_ids = vec![full.ids[4]];
    let stopped = engine
        .generate(&engine.validate(request).unwrap(), |_| {})
        .unwrap();
    let first = full.ids.iter().position(|&t| t == full.ids[4]).unwrap();
    assert_eq!(stopped.ids, full.ids[..=first]);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);

    // Without ignore_eos, the tokenizer's and generation_config's EOS ids stop generation.
    let valid = engine
        .validate(GenerateRequest {
            max_tokens: Some(4),
            ..GenerateRequest::new(Prompt::Text("x".into()))
        })
        .unwrap();
    assert!(valid.stop_token_ids.contains(&1));
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let engine = engine("qwen2");
    let run = |seed| {
        let request = GenerateRequest {
            sampling: Some(SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            }),
            max_tokens: Some(24),
            ignore_eos: true,
            ..GenerateRequest::new(Prompt::Text("Hello".into()))
        };
        engine
            .generate(&engine.validate(request).unwrap(), |_| {})
            .unwrap()
            .ids
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn prompts_longer_than_the_context_are_refused_up_front() {
    let engine = Engine::load(
        &fixtures().join("models/qwen2"),
        &EngineConfig {
            max_model_len: Some(16),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let err = engine
        .validate(GenerateRequest::new(Prompt::TokenIds(vec![5; 20])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("maximum context length is 16 tokens"), "{err}");
    let err = engine
        .validate(GenerateRequest {
            max_tokens: Some(10),
            ..GenerateRequest::new(Prompt::TokenIds(vec![5; 10]))
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("20 were requested (10 in the prompt, 10 for the completion)"),
        "{err}"
    );
    // Without max_tokens, generation is bounded by the room left.
    let valid = engine
        .validate(GenerateRequest::new(Prompt::TokenIds(vec![5; 10])))
        .unwrap();
    assert_eq!(valid.max_new_tokens, 6);
    let err = engine
        .validate(GenerateRequest::new(Prompt::TokenIds(vec![9999])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}

#[test]
fn generation_config_supplies_eos_and_default_sampling() {
    let engine = engine("qwen2");
    let config = engine.generation_config();
    assert_eq!(config.eos_token_ids, vec![1]);
    let defaults = config.default_sampling();
    assert_eq!(defaults.temperature, 0.6);
    assert_eq!(defaults.top_p, 0.95);
}

#[test]
fn auto_dtype_keeps_bf16_checkpoints_and_widens_the_rest_on_cpu() {
    use candle_core::{DType, Device};
    use enclave_engine::DTypeChoice;
    let cpu = Device::Cpu;
    assert_eq!(
        DTypeChoice::Auto.resolve(&cpu, Some(DType::BF16)),
        DType::BF16
    );
    assert_eq!(
        DTypeChoice::Auto.resolve(&cpu, Some(DType::F32)),
        DType::F32
    );
    assert_eq!(
        DTypeChoice::Auto.resolve(&cpu, Some(DType::F16)),
        DType::F32
    );
    assert_eq!(DTypeChoice::Auto.resolve(&cpu, None), DType::F32);
    assert_eq!(
        DTypeChoice::F16.resolve(&cpu, Some(DType::BF16)),
        DType::F16
    );
    // The fixtures are float32 checkpoints: auto loads them exactly.
    let engine = engine("qwen2");
    assert_eq!(engine.model().info().dtype, DType::F32);
    assert_eq!(
        enclave_models::checkpoint_dtype(&fixtures().join("models/qwen2")).unwrap(),
        Some(DType::F32)
    );
}
