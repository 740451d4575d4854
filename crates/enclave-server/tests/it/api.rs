//! Every endpoint's happy path, checked against the engine run directly.

use enclave_engine::{GenerateRequest, Prompt, SamplingParams};
use serde_json::{json, Value};

use crate::{fixtures, load, sse_chunks, TestServer, MODEL};

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Why is"}, {"type": "text", "text": "the sky blue?"}]},
        ],
        "temperature": 0,
        "max_tokens": 12,
        "ignore_eos": true,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// What the engine generates alone for these prompt ids (greedy).
fn engine_text(ids: &[u32], max_tokens: usize) -> (String, Vec<u32>) {
    let engine = load(&fixtures().join("models/qwen2"));
    let request = engine
        .validate(GenerateRequest {
            sampling: Some(SamplingParams::greedy()),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..GenerateRequest::new(Prompt::TokenIds(ids.to_vec()))
        })
        .unwrap();
    let generation = engine.generate(&request, |_| {}).unwrap();
    (generation.text, generation.ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_health() {
    let server = TestServer::qwen2().await;
    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], 512);
    let (status, model) = server.get(&format!("/v1/models/{MODEL}")).await;
    assert_eq!((status, &model["id"]), (200, &json!(MODEL)));
    let (status, error) = server.get("/v1/models/openai/gpt-4").await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(server.get("/health").await.0, 200);
    assert_eq!(server.get("/livez").await.0, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_matches_the_engine_and_streams_the_same_text() {
    let server = TestServer::qwen2().await;
    let (status, tokenized) = server
        .post(
            "/tokenize",
            json!({"messages": chat_body(json!({}))["messages"]}),
        )
        .await;
    assert_eq!(status, 200);
    let prompt_ids: Vec<u32> = serde_json::from_value(tokenized["tokens"].clone()).unwrap();
    assert_eq!(tokenized["count"], prompt_ids.len());
    let (expected, _) = engine_text(&prompt_ids, 12);

    let (status, reply) = server
        .post("/v1/chat/completions", chat_body(json!({})))
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], MODEL);
    assert!(reply["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(reply["created"].as_u64().unwrap() > 1_700_000_000);
    let choice = &reply["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], expected.as_str());
    assert!(choice["message"].get("reasoning_content").is_none());
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(reply["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(reply["usage"]["completion_tokens"], 12);
    assert_eq!(reply["usage"]["total_tokens"], prompt_ids.len() + 12);

    let (status, body) = server
        .post_raw(
            "/v1/chat/completions",
            chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
        )
        .await;
    assert_eq!(status, 200);
    let chunks = sse_chunks(&body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text += t;
        }
    }
    assert_eq!(text, expected);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    assert_eq!(usage["usage"]["prompt_tokens"], prompt_ids.len());
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_seeded_and_reproducible() {
    let server = TestServer::qwen2().await;
    let body = chat_body(json!({"n": 3, "temperature": 1.0, "seed": 42, "max_tokens": 10}));
    let (status, first) = server.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (_, second) = server.post("/v1/chat/completions", body).await;
    let texts = |r: &Value| -> Vec<String> {
        r["choices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i);
                c["message"]["content"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let a = texts(&first);
    assert_eq!(a.len(), 3);
    assert_eq!(a, texts(&second), "same seed, same choices");
    assert!(a[0] != a[1] || a[1] != a[2], "choices differ: {a:?}");
    assert_eq!(first["usage"]["completion_tokens"], 30);
    let (_, other) = server
        .post(
            "/v1/chat/completions",
            chat_body(json!({"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 10})),
        )
        .await;
    assert_ne!(a, texts(&other), "another seed, other choices");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text() {
    let server = TestServer::qwen2().await;
    let (_, full) = server
        .post("/v1/completions", json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": true}))
        .await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the greedy text.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let before = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
            "ignore_eos": true, "stop": [stop, "never-seen"], "stream": stream});
        let (status, raw) = server.post_raw("/v1/completions", body).await;
        assert_eq!(status, 200);
        let (got, finish) = if stream {
            let chunks = sse_chunks(&raw);
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["text"].as_str())
                .collect();
            let finish = chunks
                .iter()
                .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(String::from));
            (text, finish.unwrap())
        } else {
            let reply: Value = serde_json::from_str(&raw).unwrap();
            (
                reply["choices"][0]["text"].as_str().unwrap().to_string(),
                reply["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        };
        assert_eq!(got, before, "stream={stream}");
        assert_eq!(finish, "stop");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_list_each_token_with_alternatives() {
    let server = TestServer::qwen2().await;
    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            chat_body(json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 6})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let content = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 6);
    let mut bytes_seen = Vec::new();
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], entry["token"]);
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        let bytes: Vec<u8> = serde_json::from_value(entry["bytes"].clone()).unwrap();
        bytes_seen.extend(bytes);
    }
    // The tokens' exact bytes make up the text (the fixture's random output is full of partial
    // characters, which a token's decoded text shows as U+FFFD).
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&bytes_seen), text);
    let (_, plain) = server
        .post("/v1/chat/completions", chat_body(json!({})))
        .await;
    assert!(plain["choices"][0]["logprobs"].is_null());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_take_every_prompt_shape() {
    let server = TestServer::qwen2().await;
    let (_, tokenized) = server
        .post("/tokenize", json!({"prompt": "The cat sat"}))
        .await;
    let ids: Vec<u32> = serde_json::from_value(tokenized["tokens"].clone()).unwrap();
    let (_, detokenized) = server.post("/detokenize", json!({"tokens": ids})).await;
    assert!(detokenized["prompt"]
        .as_str()
        .unwrap()
        .ends_with("The cat sat"));
    let (expected, _) = engine_text(&ids, 5);

    let base = json!({"max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let with = |prompt: Value| {
        let mut b = base.clone();
        b["prompt"] = prompt;
        b
    };
    for prompt in [json!("The cat sat"), json!(ids)] {
        let (status, reply) = server.post("/v1/completions", with(prompt)).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["object"], "text_completion");
        assert!(reply["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(reply["choices"][0]["text"], expected.as_str());
        assert_eq!(reply["usage"]["prompt_tokens"], ids.len());
        assert_eq!(reply["usage"]["completion_tokens"], 5);
    }
    for prompt in [json!(["The cat sat", "The cat sat"]), json!([ids, ids])] {
        let mut body = with(prompt);
        body["n"] = json!(2);
        let (status, reply) = server.post("/v1/completions", body).await;
        assert_eq!(status, 200, "{reply}");
        let choices = reply["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4);
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            assert_eq!(c["text"], expected.as_str());
        }
        assert_eq!(reply["usage"]["prompt_tokens"], 2 * ids.len());
        assert_eq!(reply["usage"]["completion_tokens"], 20);
        let cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(
            cached <= 2 * ids.len() as u64,
            "cached {cached} of {}",
            2 * ids.len()
        );
    }
    // A prompt of three blocks, asked for twice with n = 4: the second time its first two
    // blocks come from the prefix cache, counted once (not once per choice), streamed or not.
    let long: Vec<u32> = ids.iter().copied().cycle().take(40).collect();
    let mut body = with(json!(long));
    body["n"] = json!(4);
    let (status, first) = server.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (status, unstreamed) = server.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{unstreamed}");
    assert_eq!(
        unstreamed["usage"]["prompt_tokens_details"]["cached_tokens"],
        32
    );
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, sse) = server.post_raw("/v1/completions", body).await;
    assert_eq!(status, 200, "{sse}");
    let chunks = sse_chunks(&sse);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &unstreamed["usage"], "streamed usage: {sse}");
    // OpenAI's default of 16 tokens when max_tokens is absent.
    let (_, reply) = server
        .post(
            "/v1/completions",
            json!({"prompt": "The cat sat", "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(reply["usage"]["completion_tokens"], 16);
    server.shutdown().await.unwrap();
}

/// What lm-evaluation-harness's `local-completions` sends for log-likelihood: token ids,
/// `echo`, `logprobs: 1`, `max_tokens: 1`, and reads the prompt's token log-probabilities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_logprobs_scores_the_prompt() {
    let server = TestServer::qwen2().await;
    let (_, tokenized) = server
        .post("/tokenize", json!({"prompt": "The quick brown fox jumps"}))
        .await;
    let ids: Vec<u32> = serde_json::from_value(tokenized["tokens"].clone()).unwrap();
    let body =
        json!({"prompt": ids, "echo": true, "logprobs": 1, "max_tokens": 1, "temperature": 0});
    let (status, reply) = server.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{reply}");
    let choice = &reply["choices"][0];
    let prompt_text = detokenize(&server, &ids).await;
    assert!(choice["text"].as_str().unwrap().starts_with(&prompt_text));
    let lp = &choice["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), ids.len() + 1);
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["top_logprobs"][0].is_null());
    for k in 1..tokens.len() {
        let logprob = lp["token_logprobs"][k].as_f64().unwrap();
        assert!(logprob <= 0.0);
        let top = lp["top_logprobs"][k].as_object().unwrap();
        assert_eq!(top.len(), 1);
        // The top alternative is at least as likely as the actual token.
        assert!(top.values().next().unwrap().as_f64().unwrap() >= logprob - 1e-6);
    }
    let offsets: Vec<u64> = serde_json::from_value(lp["text_offset"].clone()).unwrap();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    // Scoring the same prompt twice gives the same numbers (the prefix cache holds no logits).
    let (_, again) = server
        .post(
            "/v1/completions",
            json!({"prompt": ids, "echo": true, "logprobs": 1, "max_tokens": 1, "temperature": 0}),
        )
        .await;
    assert_eq!(
        again["choices"][0]["logprobs"]["token_logprobs"],
        lp["token_logprobs"]
    );
    server.shutdown().await.unwrap();
}

async fn detokenize(server: &TestServer, ids: &[u32]) -> String {
    let (_, reply) = server.post("/detokenize", json!({"tokens": ids})).await;
    reply["prompt"].as_str().unwrap().to_string()
}

/// Served names are often Hub ids with a slash; the SDK's `models.retrieve` puts them in the
/// path as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_names_may_hold_slashes() {
    let config = enclave_server::ServerConfig {
        served_model_name: "deepseek-ai/tiny-qwen2".into(),
        ..crate::server_config()
    };
    let server = TestServer::start(
        &fixtures().join("models/qwen2"),
        config,
        crate::serving_config(),
    )
    .await;
    let (status, model) = server.get("/v1/models/deepseek-ai/tiny-qwen2").await;
    assert_eq!(status, 200, "{model}");
    assert_eq!(model["id"], "deepseek-ai/tiny-qwen2");
    let (status, _) = server
        .post(
            "/v1/completions",
            json!({"model": "deepseek-ai/tiny-qwen2", "prompt": "hi", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    server.shutdown().await.unwrap();
}
