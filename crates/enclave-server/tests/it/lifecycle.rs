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

/// A server that runs one sequence at a time and takes up to 64 choices per request, so that
/// requests under test queue behind a long one (the tiny model makes 480 tokens in
/// milliseconds: a long request must be many choices).
async fn one_sequence_at_a_time() -> TestServer {
    let serving = enclave_engine::ServingConfig {
        max_num_seqs: 1,
        ..serving_config()
    };
    let config = enclave_server::ServerConfig {
        max_n: 64,
        ..server_config()
    };
    TestServer::start(&fixtures().join("models/qwen2"), config, serving).await
}

/// A client that goes away mid-stream cancels its generation: the requests leave the engine
/// and their KV blocks return (no leak). One sequence runs at a time, so the requests under
/// test are still queued behind a long one when their clients leave; the long one's client
/// leaves too, mid-generation. The long one is sixty-four choices of 480 tokens, run one after
/// another: the tiny model makes 480 tokens in milliseconds, and a single choice could end
/// (letting the queued ones run to their end) while a loaded machine delays the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_cancels_the_generation_and_frees_its_blocks() {
    let server = one_sequence_at_a_time().await;
    let baseline = settled(&server.state).await;
    let long =
        json!({"prompt": "Once", "max_tokens": 480, "ignore_eos": true, "stream": true, "n": 64});
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
        after.scheduler.tokens_computed < baseline.scheduler.tokens_computed + 64 * 480,
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

/// A bug that panics the engine thread: the streams in flight end in `finish_reason: "error"`
/// (not as if complete), `/health` and `/livez` turn 503 so an orchestrator takes the replica
/// out of service and restarts it, new requests get an error at once instead of hanging, and
/// the process stays up to say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_engine_fails_its_requests_and_its_health_check() {
    // Sixty-four long choices, one at a time: the fault comes while most are still to run.
    let server = one_sequence_at_a_time().await;
    assert_eq!(server.get("/health").await.0, 200);
    let long =
        json!({"prompt": "Once", "max_tokens": 480, "ignore_eos": true, "stream": true, "n": 64});
    let mut stream = server
        .client
        .post(server.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut body = stream.chunk().await.unwrap().unwrap().to_vec();
    // An unstreamed request queued behind it (accepted once 65 requests are outstanding).
    let queued = {
        let (client, url) = (server.client.clone(), server.url("/v1/completions"));
        tokio::spawn(async move {
            let response = client
                .post(url)
                .json(&json!({"prompt": "hi", "max_tokens": 2}))
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        })
    };
    let engine = server.state.engine().unwrap();
    while engine.outstanding() < 65 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    engine.inject_panic();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    // Every choice ends with a finish reason, and those the fault cut short with "error".
    let chunks = sse_chunks(&String::from_utf8(body).unwrap());
    let finishes: Vec<(u64, String)> = chunks
        .iter()
        .filter_map(|c| {
            let choice = &c["choices"][0];
            let reason = choice["finish_reason"].as_str()?;
            Some((choice["index"].as_u64()?, reason.to_string()))
        })
        .collect();
    let mut indices: Vec<u64> = finishes.iter().map(|(i, _)| *i).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..64).collect::<Vec<u64>>(), "{finishes:?}");
    assert!(finishes.iter().any(|(_, r)| r == "error"), "{finishes:?}");
    // The queued request is told why (the engine caught the panic and failed it).
    let (status, reply) = queued.await.unwrap();
    assert_eq!(status, 500, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("injected fault"), "{message}");

    let (status, reply) = server.get("/health").await;
    assert_eq!(status, 503);
    assert_eq!(reply["error"]["code"], "engine_stopped");
    // Liveness fails too: a dead engine never comes back, so the orchestrator restarts the
    // process.
    let (status, reply) = server.get("/livez").await;
    assert_eq!(status, 503);
    assert_eq!(reply["error"]["code"], "engine_stopped");
    let (status, reply) = server
        .post("/v1/completions", json!({"prompt": "hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 500, "{reply}");
    assert!(reply["error"]["message"].is_string());
    server.shutdown().await.unwrap();
}

/// A client that gives up on an unstreamed request (its connection closed while the answer is
/// still being generated) cancels the generation too: hyper sees the connection end and drops
/// the handler, whose choice streams cancel their requests. The engine is held still while the
/// client leaves, so the generation cannot finish first however slow the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstreamed_request_is_cancelled_when_its_client_leaves() {
    let server = one_sequence_at_a_time().await;
    let baseline = settled(&server.state).await;
    let engine = server.state.engine().unwrap();
    let hold = engine.inject_hold();
    // A raw connection, closed by the test itself: a pooled HTTP client may keep reading a
    // dropped request's answer.
    let body =
        json!({"prompt": "Once", "max_tokens": 480, "ignore_eos": true, "n": 64}).to_string();
    let mut connection = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap();
    post_completion(&mut connection, &body).await;
    while engine.outstanding() < 64 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    drop(connection);
    // The streams go when the handler is dropped; the engine has not run a step meanwhile.
    let dropped = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while engine.outstanding() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(dropped.is_ok(), "the handler outlived its connection");
    drop(hold);
    // The engine takes in the 64 submissions it was sent and finds every stream gone.
    let cancelled = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while engine.stats().cancelled < baseline.cancelled + 64 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(cancelled.is_ok(), "{:?}", engine.stats());
    let after = settled(&server.state).await;
    assert_eq!(after.cancelled, baseline.cancelled + 64);
    assert_eq!(
        after.scheduler.tokens_computed,
        baseline.scheduler.tokens_computed
    );
    server.shutdown().await.unwrap();
}

/// A client that keeps its connection but stops reading a stream (its receive window full)
/// holds nothing for longer than the send timeout: the server gives up on it, the stream's
/// generations are cancelled and their places in the engine return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_its_client_stopped_reading_is_cancelled_after_the_send_timeout() {
    let serving = enclave_engine::ServingConfig {
        max_num_seqs: 1,
        ..serving_config()
    };
    let config = enclave_server::ServerConfig {
        max_n: 64,
        connections: enclave_server::ConnectionLimits {
            send_timeout: std::time::Duration::from_secs(1),
            ..enclave_server::ConnectionLimits::default()
        },
        ..server_config()
    };
    let server = TestServer::start(&fixtures().join("models/qwen2"), config, serving).await;
    let baseline = settled(&server.state).await;
    let engine = server.state.engine().unwrap();
    let mut connection = crate::never_reading_stream(&server, None).await;
    while engine.outstanding() < 64 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Never read. Without the send timeout the stream's task waits on the full channel for
    // as long as the connection stays open, holding all 64 places.
    let released = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while engine.outstanding() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        released.is_ok(),
        "{} places still held",
        engine.outstanding()
    );
    let after = settled(&server.state).await;
    assert!(after.cancelled > baseline.cancelled, "nothing cancelled");
    assert!(after.scheduler.tokens_computed < baseline.scheduler.tokens_computed + 64 * 480);
    // The server closed the connection: reading now drains what was buffered, then ends.
    let drained = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut buf = vec![0; 1 << 16];
        loop {
            match tokio::io::AsyncReadExt::read(&mut connection, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection stayed open");
    drop(connection);
    server.shutdown().await.unwrap();
}

/// Sends a completions request on a raw connection (the test then decides how it reads).
async fn post_completion(connection: &mut tokio::net::TcpStream, body: &str) {
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: enclave\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(connection, request.as_bytes())
        .await
        .unwrap();
}
