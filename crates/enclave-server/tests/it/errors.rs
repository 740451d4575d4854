//! Every client mistake gets an OpenAI error object with the right status, never a 500.

use serde_json::{json, Value};

use crate::{fixtures, server_config, serving_config, TestServer, MODEL};

fn chat(extra: Value) -> Value {
    let mut body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert_eq!(error["type"], want_type, "{body}");
    assert!(!error["message"].as_str().unwrap().is_empty());
    if let Some(param) = param {
        assert_eq!(error["param"], param, "{body}");
    }
    assert!(
        error.get("code").is_some(),
        "code is always present (maybe null)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_parameters_are_400_naming_the_parameter() {
    let server = TestServer::qwen2().await;
    let cases = [
        (chat(json!({"temperature": -0.5})), "temperature"),
        (chat(json!({"temperature": 2.5})), "temperature"),
        (chat(json!({"stop": vec!["x"; 17]})), "stop"),
        (chat(json!({"stop": ["ok", "y".repeat(513)]})), "stop"),
        (chat(json!({"logit_bias": {"5": 10}})), "logit_bias"),
        (
            chat(json!({"response_format": {"type": "json_object"}})),
            "response_format",
        ),
        (
            chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            "tools",
        ),
        (chat(json!({"tool_choice": "required"})), "tool_choice"),
        (chat(json!({"top_p": 1.5})), "top_p"),
        (chat(json!({"max_tokens": 0})), "max_tokens"),
        (
            chat(json!({"max_completion_tokens": -3})),
            "max_completion_tokens",
        ),
        (chat(json!({"n": 0})), "n"),
        (chat(json!({"n": 1000})), "n"),
        (chat(json!({"presence_penalty": 3.0})), "presence_penalty"),
        (
            chat(json!({"top_logprobs": 50, "logprobs": true})),
            "top_logprobs",
        ),
        (chat(json!({"top_logprobs": 2})), "top_logprobs"),
        (chat(json!({"top_k": -7})), "top_k"),
        (
            chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            "messages[0].role",
        ),
        (chat(json!({"messages": []})), "messages"),
        (
            chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
            "messages[0].content[0]",
        ),
    ];
    for (body, param) in cases {
        let (status, reply) = server.post("/v1/chat/completions", body).await;
        assert_error(status, &reply, 400, "invalid_request_error", Some(param));
    }
    // Unsupported fields at their neutral values are accepted, as clients send them.
    let neutral = json!({"logit_bias": {}, "response_format": {"type": "text"}, "tools": [],
        "tool_choice": "auto", "functions": null, "function_call": "none"});
    let (status, reply) = server.post("/v1/chat/completions", chat(neutral)).await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = server
        .post(
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": -100}}),
        )
        .await;
    assert_error(
        status,
        &reply,
        400,
        "invalid_request_error",
        Some("logit_bias"),
    );
    let (status, reply) = server
        .post("/v1/completions", json!({"prompt": "hi", "logprobs": 99}))
        .await;
    assert_error(
        status,
        &reply,
        400,
        "invalid_request_error",
        Some("logprobs"),
    );
    let (status, reply) = server
        .post("/v1/completions", json!({"prompt": [], "max_tokens": 2}))
        .await;
    assert_error(status, &reply, 400, "invalid_request_error", Some("prompt"));
    let (status, reply) = server
        .post(
            "/v1/completions",
            json!({"prompt": [999999], "max_tokens": 2}),
        )
        .await;
    assert_error(status, &reply, 400, "invalid_request_error", Some("prompt"));
    let (status, reply) = server
        .post("/detokenize", json!({"tokens": [999999]}))
        .await;
    assert_error(status, &reply, 400, "invalid_request_error", Some("tokens"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_past_the_context_names_the_numbers() {
    let server = TestServer::qwen2().await;
    let (status, reply) = server
        .post("/v1/chat/completions", chat(json!({"max_tokens": 600})))
        .await;
    assert_error(
        status,
        &reply,
        400,
        "invalid_request_error",
        Some("messages"),
    );
    assert_eq!(reply["error"]["code"], "context_length_exceeded");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("512") && message.contains("600"),
        "{message}"
    );
    let (status, reply) = server
        .post(
            "/v1/completions",
            json!({"prompt": vec![5u32; 600], "max_tokens": 1}),
        )
        .await;
    assert_error(status, &reply, 400, "invalid_request_error", Some("prompt"));
    // Text that could never fit (more than 16 bytes per token of the 512-token context) is
    // refused before it is tokenized, on every route that takes text.
    let huge = "a ".repeat(512 * 8 + 1);
    for (path, body) in [
        ("/tokenize", json!({"prompt": huge})),
        ("/v1/completions", json!({"prompt": huge, "max_tokens": 1})),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": huge}]})),
        ),
    ] {
        let (status, reply) = server.post(path, body).await;
        assert_eq!(status, 400, "{path}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("more than 8192 bytes"),
            "{path}: {message}"
        );
    }
    // Within the bound, a long text is tokenized (on the work pool past 16 KiB, here inline).
    let (status, reply) = server
        .post("/tokenize", json!({"prompt": "a ".repeat(2000)}))
        .await;
    assert_eq!(status, 200, "{reply}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_and_routes_are_404() {
    let server = TestServer::qwen2().await;
    let (status, reply) = server
        .post("/v1/chat/completions", chat(json!({"model": "gpt-4o"})))
        .await;
    assert_error(status, &reply, 404, "invalid_request_error", Some("model"));
    assert_eq!(reply["error"]["code"], "model_not_found");
    let (status, reply) = server.get("/v1/embeddings").await;
    assert_error(status, &reply, 404, "invalid_request_error", None);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_json_or_too_large() {
    let config = enclave_server::ServerConfig {
        max_body_bytes: 4096,
        ..server_config()
    };
    let server =
        TestServer::start(&fixtures().join("models/qwen2"), config, serving_config()).await;
    let url = server.url("/v1/chat/completions");
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let retry = response.headers().get("retry-after").cloned();
        (status, response.json::<Value>().await.unwrap(), retry)
    };
    let (status, reply, _) = send(
        server
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_error(status, &reply, 400, "invalid_request_error", None);
    let (status, reply, _) = send(server.client.post(&url).body("hello")).await;
    assert_error(status, &reply, 415, "invalid_request_error", None);
    let (status, reply, _) = send(
        server
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(json!({"messages": "hi"}).to_string()),
    )
    .await;
    assert_error(status, &reply, 400, "invalid_request_error", None);
    let big = chat(json!({"messages": [{"role": "user", "content": "x".repeat(10_000)}]}));
    let (status, reply, _) = send(server.client.post(&url).json(&big)).await;
    assert_error(status, &reply, 413, "invalid_request_error", None);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_503_with_retry_after() {
    let serving = enclave_engine::ServingConfig {
        max_num_seqs: 1,
        max_waiting_requests: 0,
        ..serving_config()
    };
    let server =
        TestServer::start(&fixtures().join("models/qwen2"), server_config(), serving).await;
    // More generations than the server ever holds at once: a 400 (no retry would help),
    // even while it is idle.
    for (body, param) in [
        (json!({"prompt": "b", "max_tokens": 2, "n": 2}), "n"),
        (json!({"prompt": ["b", "c"], "max_tokens": 2}), "prompt"),
    ] {
        let (status, reply) = server.post("/v1/completions", body).await;
        assert_error(status, &reply, 400, "invalid_request_error", Some(param));
    }
    let (status, reply) = server
        .post("/v1/chat/completions", chat(json!({"n": 2})))
        .await;
    assert_error(status, &reply, 400, "invalid_request_error", Some("n"));
    // One long streaming request holds the only place.
    let holder = server
        .client
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "a", "max_tokens": 400, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(holder.status(), 200);
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "b", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let reply: Value = response.json().await.unwrap();
    assert_error(503, &reply, 503, "server_error", None);
    drop(holder);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_is_an_openai_error() {
    let server = TestServer::qwen2().await;
    let (status, reply) = server.get("/v1/chat/completions").await;
    assert_error(status, &reply, 405, "invalid_request_error", None);
    server.shutdown().await.unwrap();
}
