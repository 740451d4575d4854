//! Each tenant's sensitive-data policy through the real server: `mask` changes what the model
//! receives (its prompt-token count is the masked text's), `block` is a 400 that names the
//! category and never the value, `log_only` serves the prompt as sent while the audit record
//! holds only the redacted text; masked completions (streamed or not) are the redacted text.

use std::collections::HashMap;
use std::sync::Arc;

use enclave_gateway::{unix_time, AuditQuery, Authenticator, Limits, Roles, Store};
use enclave_redact::Redactor;
use enclave_server::redaction::{CompletionAction, PromptAction, RedactionPolicies, TenantPolicy};
use enclave_server::Access;
use serde_json::{json, Value};

use crate::{fixtures, server_config, serving_config, TestServer};

const ID: &str = "11010519491231002X";

async fn key(store: &Store, tenant: &str) -> String {
    if tenant != "default" {
        store
            .create_tenant(tenant, &["*".to_string()], Limits::default(), unix_time())
            .await
            .unwrap();
    }
    crate::new_key(store, tenant, "developer").await.key
}

async fn server(store: &Store, redaction: Option<RedactionPolicies>) -> TestServer {
    let config = enclave_server::ServerConfig {
        redaction: redaction.map(Arc::new),
        ..server_config()
    };
    TestServer::start_with(
        &fixtures().join("models/qwen2"),
        config,
        serving_config(),
        Access::Keys(Arc::new(Authenticator::new(
            store.clone(),
            Roles::default(),
        ))),
    )
    .await
}

async fn post(server: &TestServer, key: &str, path: &str, body: Value) -> (u16, String) {
    let response = server
        .client
        .post(server.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

fn policy(prompt: PromptAction, completion: CompletionAction, store_text: bool) -> TenantPolicy {
    TenantPolicy {
        prompt,
        completion,
        store_text,
    }
}

#[tokio::test]
async fn prompt_policies_mask_block_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let tenants = HashMap::from([
        (
            "masked".to_string(),
            policy(PromptAction::Mask, CompletionAction::Off, false),
        ),
        (
            "blocked".to_string(),
            policy(PromptAction::Block, CompletionAction::Off, false),
        ),
        (
            "logged".to_string(),
            policy(PromptAction::LogOnly, CompletionAction::Off, false),
        ),
        (
            "phones".to_string(),
            policy(PromptAction::Block, CompletionAction::Off, false),
        ),
    ]);
    // The `phones` tenant looks for mobile numbers only.
    let scoped = HashMap::from([(
        "phones".to_string(),
        Arc::new(Redactor::new(Some(&["mobile".to_string()]), &[]).unwrap()),
    )]);
    let server = server(
        &store,
        Some(RedactionPolicies {
            redactor: Arc::new(Redactor::default()),
            default: TenantPolicy::default(),
            tenants,
            scoped,
        }),
    )
    .await;
    let (plain, masked, blocked, logged) = (
        key(&store, "default").await,
        key(&store, "masked").await,
        key(&store, "blocked").await,
        key(&store, "logged").await,
    );
    let prompt = format!("My ID number is {ID}, please remember it.");
    let tokens = |text: String| {
        let server = &server;
        let plain = plain.clone();
        async move {
            let (_, body) = post(server, &plain, "/tokenize", json!({"prompt": text})).await;
            serde_json::from_str::<Value>(&body).unwrap()["count"]
                .as_u64()
                .unwrap()
        }
    };
    let completion = |key: String| {
        let server = &server;
        let prompt = prompt.clone();
        async move {
            post(
                server,
                &key,
                "/v1/completions",
                json!({"model": crate::MODEL, "prompt": prompt, "max_tokens": 3, "echo": true}),
            )
            .await
        }
    };

    // mask: the model receives the placeholder (its prompt tokens are the masked text's).
    let masked_text = prompt.replace(ID, "[ID_CARD]");
    let (status, body) = completion(masked.clone()).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["usage"]["prompt_tokens"].as_u64(),
        Some(tokens(masked_text.clone()).await)
    );
    assert!(body["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with(&masked_text));
    assert_ne!(tokens(masked_text).await, tokens(prompt.clone()).await);

    // block: a 400 naming the category, not the value; chat too.
    let (status, body) = completion(blocked.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("id_card") && body.contains("sensitive_data"),
        "{body}"
    );
    assert!(!body.contains(ID), "the refusal echoed the value: {body}");
    let (status, body) = post(
        &server,
        &blocked,
        "/v1/chat/completions",
        json!({"model": crate::MODEL, "messages": [{"role": "user", "content": prompt}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(!body.contains(ID));
    // Token-id prompts cannot be checked: refused under block and mask.
    let (status, _) = post(
        &server,
        &blocked,
        "/v1/completions",
        json!({"model": crate::MODEL, "prompt": [1, 2, 3], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 400);

    // A tenant's own categories: an ID passes where only phone numbers are blocked.
    let phones = key(&store, "phones").await;
    let (status, _) = completion(phones.clone()).await;
    assert_eq!(status, 200);
    let (status, body) = post(
        &server,
        &phones,
        "/v1/completions",
        json!({"model": crate::MODEL, "prompt": "call 13812345678", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("mobile") && !body.contains("13812345678"));

    // log_only: served as sent (the raw prompt's tokens), the record holds the redacted text.
    let (status, body) = completion(logged.clone()).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["usage"]["prompt_tokens"].as_u64(),
        Some(tokens(prompt.clone()).await)
    );
    // No policy: untouched.
    let (status, body) = completion(plain.clone()).await;
    assert_eq!(status, 200);
    assert!(body.contains(ID));

    server.state.audit_log().unwrap().flush().await.unwrap();
    let entries = store
        .audit_entries(&AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let all =
        serde_json::to_string(&entries.iter().map(|e| e.to_json()).collect::<Vec<_>>()).unwrap();
    assert!(!all.contains(ID), "a raw ID reached the audit log");
    let logged_record = entries
        .iter()
        .find(|e| {
            e.tenant.as_deref() == Some("logged") && e.route.as_deref() == Some("/v1/completions")
        })
        .unwrap();
    let text: Value = serde_json::from_str(logged_record.text.as_deref().unwrap()).unwrap();
    assert_eq!(text["prompt"], prompt.replace(ID, "[ID_CARD]"));
    let detail: Value = serde_json::from_str(logged_record.detail.as_deref().unwrap()).unwrap();
    assert_eq!(detail["sensitive"]["prompt"], json!(["id_card"]));
    // Tenants without store_text or log_only keep no text.
    assert!(entries
        .iter()
        .filter(|e| e.tenant.as_deref() != Some("logged"))
        .all(|e| e.text.is_none()));
}

/// Completions masked as they stream: a custom pattern matching what the model writes (its
/// greedy output, learnt from a server without a policy) is replaced, streamed or not, exactly
/// as the redactor replaces it in the whole text.
#[tokio::test]
async fn completions_are_masked_streamed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let body = json!({"model": crate::MODEL, "prompt": "The weather today", "max_tokens": 24,
        "ignore_eos": true, "temperature": 0});
    let raw = {
        let plain = server(&store, None).await;
        let key = key(&store, "default").await;
        let (status, text) = post(&plain, &key, "/v1/completions", body.clone()).await;
        assert_eq!(status, 200);
        serde_json::from_str::<Value>(&text).unwrap()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // A "secret" the model is sure to write: a stretch of its own output.
    let chars: Vec<char> = raw.chars().collect();
    assert!(chars.len() >= 8, "{raw:?}");
    let secret: String = chars[2..8].iter().collect();
    let redactor = Arc::new(
        Redactor::new(Some(&[]), &[("canary".to_string(), regex_escape(&secret))]).unwrap(),
    );
    let expected = redactor.redact(&raw).text;
    assert!(expected.contains("[CANARY]") && !expected.contains(&secret));
    let server = server(
        &store,
        Some(RedactionPolicies {
            redactor,
            default: policy(PromptAction::Off, CompletionAction::Mask, true),
            tenants: HashMap::from([
                (
                    "cut".to_string(),
                    policy(PromptAction::Off, CompletionAction::Block, false),
                ),
                (
                    "logonly".to_string(),
                    policy(PromptAction::Off, CompletionAction::LogOnly, false),
                ),
            ]),
            scoped: HashMap::new(),
        }),
    )
    .await;
    let acme = key(&store, "acme").await;

    let (status, text) = post(&server, &acme, "/v1/completions", body.clone()).await;
    assert_eq!(status, 200);
    let full: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(full["choices"][0]["text"], expected.as_str());

    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let (status, text) = post(&server, &acme, "/v1/completions", streamed_body).await;
    assert_eq!(status, 200);
    let streamed: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, expected);
    assert!(!text.contains(&secret));

    // Logprobs would show the masked text: refused.
    let mut with_logprobs = body.clone();
    with_logprobs["logprobs"] = json!(1);
    let (status, _) = post(&server, &acme, "/v1/completions", with_logprobs).await;
    assert_eq!(status, 400);

    // store_text: the record holds the redacted completion.
    server.state.audit_log().unwrap().flush().await.unwrap();
    let entries = store
        .audit_entries(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let record = entries
        .iter()
        .find(|e| e.tenant.as_deref() == Some("acme") && e.status == Some(200))
        .unwrap();
    let logged: Value = serde_json::from_str(record.text.as_deref().unwrap()).unwrap();
    assert_eq!(logged["completion"][0], expected.as_str());

    // block: the choice ends just before the value, streamed or not.
    let before = &raw[..raw.find(&secret).unwrap()];
    let cut = key(&store, "cut").await;
    let (status, text) = post(&server, &cut, "/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{text}");
    let full: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(full["choices"][0]["text"], before);
    assert_eq!(full["choices"][0]["finish_reason"], "content_filter");
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let (_, text) = post(&server, &cut, "/v1/completions", streamed_body).await;
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, before);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "content_filter"));
    assert!(!text.contains(&secret));

    // log_only: the client gets the text as generated; the record holds it redacted.
    let logonly = key(&store, "logonly").await;
    let (_, text) = post(&server, &logonly, "/v1/completions", body.clone()).await;
    let full: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(full["choices"][0]["text"], raw.as_str());
    server.state.audit_log().unwrap().flush().await.unwrap();
    let entries = store
        .audit_entries(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let record = entries
        .iter()
        .find(|e| e.tenant.as_deref() == Some("logonly"))
        .unwrap();
    let logged: Value = serde_json::from_str(record.text.as_deref().unwrap()).unwrap();
    assert_eq!(logged["completion"][0], expected.as_str());
    assert!(
        !serde_json::to_string(&entries.iter().map(|e| e.to_json()).collect::<Vec<_>>())
            .unwrap()
            .contains(&secret)
    );
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || !c.is_ascii() {
                c.to_string()
            } else {
                format!("\\x{:02x}", c as u32)
            }
        })
        .collect()
}

/// A prompt dense with values beyond the per-request bound, or larger than the bound on
/// checked text, is a 400 naming the field and the bound (never the values); a large prompt
/// within both is masked (on the work pool) and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_beyond_the_redaction_bounds_are_refused_clearly() {
    use enclave_server::redaction::{MAX_CHECKED_BYTES, MAX_FINDINGS};
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let server = server(
        &store,
        Some(RedactionPolicies {
            redactor: Arc::new(Redactor::default()),
            default: policy(PromptAction::Mask, CompletionAction::Off, false),
            tenants: HashMap::new(),
            scoped: HashMap::new(),
        }),
    )
    .await;
    let key = key(&store, "default").await;
    let chat = |content: String| {
        json!({"model": crate::MODEL, "max_tokens": 1,
            "messages": [{"role": "user", "content": content}]})
    };
    let emails = |n: usize| {
        (0..n)
            .map(|i| format!("user{i}@example.com"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (status, body) = post(
        &server,
        &key,
        "/v1/chat/completions",
        chat(emails(MAX_FINDINGS + 1)),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["param"], "messages");
    assert!(body.contains(&format!("at most {MAX_FINDINGS}")), "{body}");
    assert!(
        !body.contains("user1@example.com"),
        "values are never echoed"
    );

    let too_long = "a ".repeat(MAX_CHECKED_BYTES / 2 + 1);
    let (status, body) = post(
        &server,
        &key,
        "/v1/completions",
        json!({"model": crate::MODEL,
        "max_tokens": 1, "prompt": too_long}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains(&format!("at most {MAX_CHECKED_BYTES}")),
        "{body}"
    );

    // 64 KiB with values every few bytes: past the inline size, so redacted on the pool, then
    // measured against what the tiny model's 512-token context could hold (the engine's 400).
    let within = format!("{} {ID}", emails(4_000));
    assert!(within.len() > 64 << 10);
    let (status, body) = post(
        &server,
        &key,
        "/v1/completions",
        json!({"model": crate::MODEL,
        "max_tokens": 1, "prompt": within}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("never holds more than 8192 bytes"), "{body}");
}
