//! What Dify's "OpenAI-API-compatible" model provider sends and needs.

use serde_json::{json, Value};

use crate::{TestServer, MODEL};

/// The credential check when a user adds the model: non-streaming, `max_tokens: 5`; Dify reads
/// `object` and `model` from the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_check() {
    let server = TestServer::qwen2().await;
    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 5, "stream": false}),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], MODEL);
    assert!(reply["choices"][0]["message"]["content"].is_string());
    server.shutdown().await.unwrap();
}

/// A streamed chat as Dify sends it (always with `stream_options.include_usage`): every event
/// is `data: ` plus JSON and a blank line, every chunk has `choices`, the usage chunk has empty
/// `choices`, and no chunk is an error object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat() {
    let server = TestServer::qwen2().await;
    let body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 16,
        "user": "dify-user-1",
    });
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = response.text().await.unwrap();
    let chunks = crate::sse_chunks(&text);
    for chunk in &chunks {
        assert!(
            chunk.get("choices").is_some(),
            "every chunk has choices: {chunk}"
        );
        assert!(
            chunk.get("error").is_none(),
            "no error object mid-stream: {chunk}"
        );
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    let u = &usage["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let finished: Vec<&Value> = chunks
        .iter()
        .filter(|c| {
            c["choices"]
                .get(0)
                .is_some_and(|c| !c["finish_reason"].is_null())
        })
        .collect();
    assert_eq!(finished.len(), 1);
    server.shutdown().await.unwrap();
}

/// An error after streaming began (here: the engine stops mid-generation) ends the choice with a
/// `finish_reason` and the stream with `[DONE]`, never a bare error object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_mid_stream_ends_the_choice_cleanly() {
    let server = TestServer::qwen2().await;
    let mut response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&json!({
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 480, "ignore_eos": true, "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    let mut body = String::from_utf8(response.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let engine = server.state.engine().unwrap().clone();
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .unwrap();
    while let Some(chunk) = response.chunk().await.unwrap() {
        body += std::str::from_utf8(&chunk).unwrap();
    }
    let chunks = crate::sse_chunks(&body);
    assert!(chunks
        .iter()
        .all(|c| c.get("error").is_none() && c.get("choices").is_some()));
    let reasons: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["finish_reason"].as_str())
        .collect();
    assert_eq!(reasons.len(), 1, "{body}");
    assert_eq!(reasons[0], "error");
    server.shutdown().await.unwrap();
}
