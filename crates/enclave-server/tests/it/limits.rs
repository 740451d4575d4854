//! Rate limits and usage through the real server: exactly the configured number of requests
//! pass, the token limit counts real prompt and completion tokens, concurrency slots are held
//! while a stream runs, limits apply per key and per tenant, and usage adds up.

use std::sync::Arc;

use enclave_gateway::{unix_time, Authenticator, Limits, NewKey, Roles, Store};
use enclave_server::Access;
use serde_json::{json, Value};

use crate::{fixtures, server_config, serving_config, TestServer, MODEL};

struct Setup {
    server: TestServer,
    store: Store,
    _dir: tempfile::TempDir,
}

async fn setup(tenant_limits: Limits) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    store
        .create_tenant("acme", &["*".into()], tenant_limits, unix_time())
        .await
        .unwrap();
    let authenticator = Authenticator::new(store.clone(), Roles::default());
    let server = TestServer::start_with(
        &fixtures().join("models/qwen2"),
        enclave_server::ServerConfig {
            reasoning_split: false,
            ..server_config()
        },
        serving_config(),
        Access::Keys(Arc::new(authenticator)),
    )
    .await;
    Setup {
        server,
        store,
        _dir: dir,
    }
}

async fn key(store: &Store, limits: Limits) -> (String, String) {
    let created = store
        .create_key(
            NewKey {
                tenant: "acme".into(),
                role: "developer".into(),
                models: vec!["*".into()],
                name: String::new(),
                expires_at: None,
                limits,
                created_by: "test".into(),
            },
            &Roles::default(),
            unix_time(),
        )
        .await
        .unwrap();
    (created.info.id, created.key)
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

async fn models(setup: &Setup, key: &str) -> reqwest::Response {
    setup
        .server
        .client
        .get(format!("{}/v1/models", setup.server.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn complete(setup: &Setup, key: &str, max_tokens: u32) -> (u16, Value) {
    let response = setup
        .server
        .client
        .post(format!("{}/v1/completions", setup.server.base))
        .bearer_auth(key)
        .json(&json!({"model": MODEL, "prompt": "Hello there", "max_tokens": max_tokens, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn exactly_the_requests_per_minute_pass_with_openai_headers() {
    let setup = setup(Limits::default()).await;
    let (_, limited) = key(
        &setup.store,
        Limits {
            requests_per_minute: Some(3),
            ..Limits::default()
        },
    )
    .await;
    let (_, free) = key(&setup.store, Limits::default()).await;
    for remaining in [2, 1, 0] {
        let response = models(&setup, &limited).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-ratelimit-limit-requests").as_deref(),
            Some("3")
        );
        assert_eq!(
            header(&response, "x-ratelimit-remaining-requests"),
            Some(remaining.to_string())
        );
        assert!(header(&response, "x-ratelimit-reset-requests")
            .unwrap()
            .ends_with('s'));
    }
    let refused = models(&setup, &limited).await;
    assert_eq!(refused.status(), 429);
    let retry: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(
        header(&refused, "x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    // Another key of the tenant is not limited by this one's allowance, and gets no headers.
    let other = models(&setup, &free).await;
    assert_eq!(other.status(), 200);
    assert_eq!(header(&other, "x-ratelimit-limit-requests"), None);
}

#[tokio::test]
async fn a_tenant_limit_is_shared_by_its_keys() {
    let setup = setup(Limits {
        requests_per_minute: Some(3),
        ..Limits::default()
    })
    .await;
    let (_, a) = key(&setup.store, Limits::default()).await;
    let (_, b) = key(&setup.store, Limits::default()).await;
    for k in [&a, &a, &b] {
        assert_eq!(models(&setup, k).await.status(), 200);
    }
    for k in [&a, &b] {
        assert_eq!(models(&setup, k).await.status(), 429);
    }
}

#[tokio::test]
async fn the_token_limit_counts_prompt_and_completion_tokens() {
    let setup = setup(Limits::default()).await;
    // 30 tokens a minute refill one token every two seconds: the test runs well within that.
    let (id, limited) = key(
        &setup.store,
        Limits {
            tokens_per_minute: Some(30),
            ..Limits::default()
        },
    )
    .await;
    let (status, first) = complete(&setup, &limited, 8).await;
    assert_eq!(status, 200, "{first}");
    let used = first["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(used, first["usage"]["prompt_tokens"].as_u64().unwrap() + 8);
    assert!(used < 30);
    // The next response reports what the first one used.
    let response = models(&setup, &limited).await;
    let remaining: u64 = header(&response, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining >= 30 - used && remaining <= 30 - used + 1,
        "{remaining} left after {used}"
    );
    // A request reserves its prompt and `max_tokens` up front: twenty more do not fit in what
    // is left, a smaller one does (and is charged what it used).
    let (status, refused) = complete(&setup, &limited, 20).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["type"], "tokens", "{refused}");
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let fits = (remaining - prompt - 1) as u32;
    let (status, second) = complete(&setup, &limited, fits).await;
    assert_eq!(status, 200, "{second}");
    let (status, third) = complete(&setup, &limited, 1).await;
    assert_eq!(status, 429, "{third}");
    assert_eq!(third["error"]["type"], "tokens", "{third}");

    // Usage reaches the database with the same counts the responses gave.
    setup
        .server
        .state
        .usage_ledger()
        .flush(&setup.store)
        .await
        .unwrap();
    let usage = setup
        .store
        .usage(None, Some(&id), unix_time())
        .await
        .unwrap();
    assert_eq!(usage.len(), 1);
    let counts = usage[0].counts;
    assert_eq!(counts.requests, 3, "the refused requests are not counted");
    assert_eq!(
        counts.prompt_tokens + counts.completion_tokens,
        used + second["usage"]["total_tokens"].as_u64().unwrap()
    );
    assert_eq!(counts.completion_tokens, 8 + u64::from(fits));
}

#[tokio::test]
async fn a_concurrency_slot_is_held_until_the_stream_ends() {
    let setup = setup(Limits::default()).await;
    let (_, limited) = key(
        &setup.store,
        Limits {
            concurrent_requests: Some(1),
            ..Limits::default()
        },
    )
    .await;
    let mut stream = setup
        .server
        .client
        .post(format!("{}/v1/completions", setup.server.base))
        .bearer_auth(&limited)
        .json(&json!({"model": MODEL, "prompt": "Once", "max_tokens": 64, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    let refused = models(&setup, &limited).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrent"),
        "{body}"
    );
    while stream.chunk().await.unwrap().is_some() {}
    // The body is done; the slot comes back once the server drops it.
    let mut status = 0;
    for _ in 0..50 {
        status = models(&setup, &limited).await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn every_choice_takes_a_concurrency_slot() {
    let setup = setup(Limits::default()).await;
    let (_, limited) = key(
        &setup.store,
        Limits {
            concurrent_requests: Some(4),
            ..Limits::default()
        },
    )
    .await;
    let completions = |body: Value| {
        setup
            .server
            .client
            .post(format!("{}/v1/completions", setup.server.base))
            .bearer_auth(&limited)
            .json(&body)
            .send()
    };
    // Two prompts × n = 3 is six generations: never within four, so a 400 naming `n`.
    let refused =
        completions(json!({"model": MODEL, "prompt": ["a", "b"], "n": 3, "max_tokens": 2}))
            .await
            .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["param"], "n", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("6 generations"),
        "{body}"
    );
    // A stream of three choices holds three slots: a second request of two waits (429).
    let mut stream = completions(
        json!({"model": MODEL, "prompt": "Once", "n": 3, "max_tokens": 64,
                                        "ignore_eos": true, "stream": true}),
    )
    .await
    .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(!stream.chunk().await.unwrap().unwrap().is_empty());
    let busy = completions(json!({"model": MODEL, "prompt": "Hi", "n": 2, "max_tokens": 2}))
        .await
        .unwrap();
    assert_eq!(busy.status(), 429);
    assert!(busy.headers().get("retry-after").is_some());
    let one = completions(json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}))
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    while stream.chunk().await.unwrap().is_some() {}
}

/// A key of `tenant` (created with no limits), for the fairness test.
async fn tenant_key(store: &Store, tenant: &str) -> String {
    if tenant != "acme" {
        store
            .create_tenant(tenant, &["*".into()], Limits::default(), unix_time())
            .await
            .unwrap();
    }
    let created = store
        .create_key(
            NewKey {
                tenant: tenant.into(),
                role: "developer".into(),
                models: vec!["*".into()],
                name: String::new(),
                expires_at: None,
                limits: Limits::default(),
                created_by: "test".into(),
            },
            &Roles::default(),
            unix_time(),
        )
        .await
        .unwrap();
    created.key
}

/// One tenant's flood cannot starve another: it holds at most its share of the engine's places
/// (its next request is a 429, the other tenant's is accepted), and the other's request is
/// admitted at the next free slot rather than behind everything the flood queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_starve_another() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    store
        .create_tenant("acme", &["*".into()], Limits::default(), unix_time())
        .await
        .unwrap();
    let acme = tenant_key(&store, "acme").await;
    let globex = tenant_key(&store, "globex").await;
    // One running slot and eight waiting: each tenant may hold five.
    let serving = enclave_engine::ServingConfig {
        max_num_seqs: 1,
        max_waiting_requests: 8,
        ..serving_config()
    };
    let server = TestServer::start_with(
        &fixtures().join("models/qwen2"),
        server_config(),
        serving,
        Access::Keys(Arc::new(Authenticator::new(
            store.clone(),
            Roles::default(),
        ))),
    )
    .await;
    let engine = server.state.engine().unwrap();
    assert_eq!(engine.max_outstanding_per_flow(), 5);
    let baseline = crate::settled(&server.state).await;
    let post = |key: &str, body: Value| {
        server
            .client
            .post(server.url("/v1/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    // Everything below is queued while the engine is held, in this order.
    let hold = engine.inject_hold();
    let mut flood = post(
        &acme,
        json!({"model": MODEL, "prompt": "Once", "n": 5, "max_tokens": 480,
                                       "ignore_eos": true, "stream": true}),
    )
    .await
    .unwrap();
    assert_eq!(flood.status(), 200);
    let more = post(
        &acme,
        json!({"model": MODEL, "prompt": "Again", "max_tokens": 4}),
    )
    .await
    .unwrap();
    assert_eq!(more.status(), 429, "acme holds its whole share");
    assert!(more.headers().get("retry-after").is_some());
    let body: Value = more.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant"),
        "{body}"
    );
    let other = tokio::spawn(post(
        &globex,
        json!({"model": MODEL, "prompt": "Hello", "max_tokens": 8, "ignore_eos": true}),
    ));
    while engine.outstanding_in_flow("globex") == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    drop(hold);
    let answered = other.await.unwrap().unwrap();
    assert_eq!(answered.status(), 200);
    // Served after acme's first choice, not after all five (5 × 480 tokens first-come,
    // first-served); the slack is for acme's second choice running meanwhile.
    let generated = engine.stats().generated_tokens - baseline.generated_tokens;
    assert!(
        generated < 2 * 480 + 8,
        "{generated} tokens generated before globex's answer"
    );
    while flood.chunk().await.unwrap().is_some() {}
    server.shutdown().await.unwrap();
}

/// A stream whose client stops reading is abandoned after the send timeout, and the tokens the
/// engine generated for it meanwhile are charged to the key all the same (not refunded with
/// the unused reservation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_generated_for_an_abandoned_stream_are_charged() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    store
        .create_tenant("acme", &["*".into()], Limits::default(), unix_time())
        .await
        .unwrap();
    // Refilled at 1,000 a second: small against the ~10,000 tokens the engine generates.
    let budget = 60_000;
    let (_, limited) = key(
        &store,
        Limits {
            tokens_per_minute: Some(budget),
            ..Limits::default()
        },
    )
    .await;
    let server = TestServer::start_with(
        &fixtures().join("models/qwen2"),
        enclave_server::ServerConfig {
            max_n: 64,
            connections: enclave_server::ConnectionLimits {
                send_timeout: std::time::Duration::from_secs(1),
                ..enclave_server::ConnectionLimits::default()
            },
            ..server_config()
        },
        serving_config(),
        Access::Keys(Arc::new(Authenticator::new(
            store.clone(),
            Roles::default(),
        ))),
    )
    .await;
    let engine = server.state.engine().unwrap();
    let baseline = crate::settled(&server.state).await;
    let started = std::time::Instant::now();
    let connection = crate::never_reading_stream(&server, Some(&limited)).await;
    while engine.outstanding() < 64 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Never read: abandoned after the send timeout, and everything given back.
    while engine.outstanding() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let generated =
        crate::settled(&server.state).await.generated_tokens - baseline.generated_tokens;
    assert!(generated > 64, "{generated} generated");
    let response = server
        .client
        .get(server.url("/v1/models"))
        .bearer_auth(&limited)
        .send()
        .await
        .unwrap();
    let remaining: u64 = response.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // All but the sequences' last tokens (sent as the engine noticed them gone) are charged,
    // besides the prompt; what the bucket refilled meanwhile is the slack.
    let charged = budget - remaining.min(budget);
    let refilled = (started.elapsed().as_secs_f64() * 1000.0).ceil() as u64;
    assert!(
        charged + 64 + refilled >= generated,
        "{charged} charged of {generated} generated ({refilled} refilled)"
    );
    drop(connection);
    server.shutdown().await.unwrap();
}
