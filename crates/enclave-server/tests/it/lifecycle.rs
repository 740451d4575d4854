//! Loading, disconnects and shutdown.

use enclave_engine::EngineHandle;
use serde_json::{json, Value};

use crate::{fixtures, load, server_config, serving_config, settled, sse_chunks, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_the_model_is_warm() {
    let server = TestServer::listen(server_config()).await;
    assert_eq!(server.get("/livez").await.0, 200);
    let response = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let (status, reply) = server
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 503);
    assert_eq!(reply["error"]["code"], "model_loading");

    let handle =
        EngineHandle::start(load(&fixtures().join("models/qwen2")), serving_config()).unwrap();
    server.state.warm_up_and_serve(handle).await.unwrap();
    assert_eq!(server.get("/health").await.0, 200);
    let (status, _) = server
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    server.shutdown().await.unwrap();
}

/// A client that goes away mid-stream cancels its generation: the requests leave the engine
/// and their KV blocks return (no leak). One sequence runs at a time, so the requests under
/// test are still queued behind a long one when their clients leave; the long one's client
/// leaves too, mid-generation. The long one is sixteen choices of 480 tokens, run one after
/// another: the tiny model makes 480 tokens in milliseconds, and a single choice could end
/// (letting the queued ones run to their end) while a loaded machine delays the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_cancels_the_generation_and_frees_its_blocks() {
    let serving = enclave_engine::ServingConfig {
        max_num_seqs: 1,
        ..serving_config()
    };
    let server = TestServer::start(
        &fixtures().join("models/qwen2"),
        crate::server_config(),
        serving,
    )
    .await;
    let baseline = settled(&server.state).await;
    let long =
        json!({"prompt": "Once", "max_tokens": 480, "ignore_eos": true, "stream": true, "n": 16});
    let mut holder = server
        .client
        .post(server.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert!(holder
        .chunk()
        .await
        .unwrap()
        .unwrap()
        .starts_with(b"data: "));
    for path in ["/v1/chat/completions", "/v1/completions"] {
        // Chat streams open with the role; completions with `echo` open with the prompt.
        let body = json!({
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "prompt": "Tell me a long story.", "echo": true,
            "max_tokens": 400, "ignore_eos": true, "stream": true, "n": 2,
        });
        let mut response = server
            .client
            .post(server.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let first = response.chunk().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: "));
        drop(response);
    }
    drop(holder);
    let after = settled(&server.state).await;
    // The four queued choices and at least the long request's last.
    assert!(
        after.cancelled >= baseline.cancelled + 5,
        "{} cancelled",
        after.cancelled - baseline.cancelled
    );
    assert_eq!(after.scheduler.blocks.used, baseline.scheduler.blocks.used);
    assert!(
        after.scheduler.tokens_computed < baseline.scheduler.tokens_computed + 16 * 480,
        "cancelled before the end"
    );
    server.shutdown().await.unwrap();
}

/// SIGTERM's path: the server stops accepting, the request in flight still completes, and
/// `serve` returns cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let mut server = TestServer::qwen2().await;
    let mut response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "Once", "max_tokens": 60, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = String::from_utf8(response.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    server.trigger_shutdown();
    while let Some(chunk) = response.chunk().await.unwrap() {
        body += std::str::from_utf8(&chunk).unwrap();
    }
    let chunks = sse_chunks(&body);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let base = server.base.clone();
    server.wait().await.unwrap();
    // No longer accepting.
    assert!(reqwest::get(format!("{base}/livez")).await.is_err());
}
