//! The audit log through the real server: one record per call with who, from where, which
//! route and model, the status, the tokens the response reported and the `x-request-id` it
//! carried; refusals recorded too; admin actions with what changed and never a secret; the
//! admin API serving records, verification and erasure.

use std::time::{Duration, Instant};

use enclave_gateway::{AuditEntry, AuditQuery, Roles};
use serde_json::{json, Value};

use crate::admin::{start, Admin};

/// Every record committed so far, oldest first (after the writer has caught up).
async fn records(admin: &Admin) -> Vec<AuditEntry> {
    admin.api.state.audit_log().unwrap().flush().await.unwrap();
    admin
        .store
        .audit_entries(&AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        })
        .await
        .unwrap()
}

async fn key(admin: &Admin, tenant: &str, role: &str) -> (String, String) {
    let created = crate::new_key(&admin.store, tenant, role).await;
    (created.info.id, created.key)
}

/// The record of the response that carried `request_id`, waiting for a stream's to land.
async fn record_of(admin: &Admin, request_id: &str) -> AuditEntry {
    let start = Instant::now();
    loop {
        if let Some(entry) = records(admin)
            .await
            .into_iter()
            .find(|e| e.request_id.as_deref() == Some(request_id))
        {
            return entry;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no record of {request_id}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_call_is_recorded_with_what_it_did() {
    let admin = start().await;
    let (id, developer) = key(&admin, "default", "developer").await;
    let api = &admin.api;

    // A completion: its record has the tokens the response reported.
    let response = api
        .client
        .post(format!("{}/v1/completions", api.base))
        .bearer_auth(&developer)
        .json(
            &json!({"model": crate::MODEL, "prompt": "The audit", "max_tokens": 4,
            "ignore_eos": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = response.json().await.unwrap();
    let entry = record_of(&admin, &request_id).await;
    assert_eq!(entry.kind, "api");
    assert_eq!(entry.subject, Some(format!("key:{id}")));
    assert_eq!(entry.tenant.as_deref(), Some("default"));
    assert_eq!(entry.source.as_deref(), Some("127.0.0.1"));
    assert_eq!(entry.method.as_deref(), Some("POST"));
    assert_eq!(entry.route.as_deref(), Some("/v1/completions"));
    assert_eq!(entry.model.as_deref(), Some(crate::MODEL));
    assert_eq!(entry.status, Some(200));
    assert_eq!(entry.prompt_tokens, body["usage"]["prompt_tokens"].as_i64());
    assert_eq!(
        entry.completion_tokens,
        body["usage"]["completion_tokens"].as_i64()
    );
    assert_eq!(entry.text, None, "no text unless a policy asks for it");

    // A streamed chat: recorded when the stream ends, with all its tokens.
    let response = api
        .client
        .post(format!("{}/v1/chat/completions", api.base))
        .bearer_auth(&developer)
        .json(
            &json!({"model": crate::MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6, "ignore_eos": true, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let text = response.text().await.unwrap();
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|chunk| chunk.get("usage").filter(|u| !u.is_null()).cloned())
        .unwrap();
    let entry = record_of(&admin, &request_id).await;
    assert_eq!(entry.completion_tokens, Some(6));
    assert_eq!(entry.prompt_tokens, usage["prompt_tokens"].as_i64());
    assert_eq!(entry.route.as_deref(), Some("/v1/chat/completions"));

    // Refusals: a made-up key (401, anonymous) and a missing permission (403, the caller).
    let response = api
        .client
        .get(format!("{}/v1/models", api.base))
        .bearer_auth(format!("enc_0123456789abcdef_{}", "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let unknown = record_of(&admin, response.headers()["x-request-id"].to_str().unwrap()).await;
    assert_eq!(
        (unknown.status, unknown.subject.as_deref()),
        (Some(401), Some("anonymous"))
    );
    let (status, _) = admin
        .call("GET", "/admin/v1/tenants", Some(&developer), None)
        .await;
    assert_eq!(status, 403);

    // An admin action: committed before the answer, with what changed and no secret.
    let (status, created) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            Some(&admin.root),
            Some(json!({"role": "viewer", "name": "dashboards"})),
        )
        .await;
    assert_eq!(status, 201);
    let secret = created["key"].as_str().unwrap();
    let entries = admin
        .store
        .audit_entries(&AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let action = entries
        .iter()
        .rev()
        .find(|e| {
            e.route.as_deref() == Some("/admin/v1/keys") && e.method.as_deref() == Some("POST")
        })
        .unwrap_or_else(|| panic!("the admin action was answered before it was recorded"));
    assert_eq!(action.kind, "admin");
    assert_eq!(action.status, Some(201));
    let detail: Value = serde_json::from_str(action.detail.as_deref().unwrap()).unwrap();
    assert_eq!(detail["action"], "key.create");
    assert_eq!(detail["id"], created["id"]);
    assert_eq!(detail["role"], "viewer");
    let all = serde_json::to_string(
        &records(&admin)
            .await
            .iter()
            .map(AuditEntry::to_json)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(
        !all.contains(secret),
        "a key's secret reached the audit log"
    );
    assert!(all.contains("/admin/v1/tenants") && all.contains("\"status\":403"));

    // Liveness probes are not audited; the whole chain verifies.
    let before = records(&admin).await.len();
    for _ in 0..3 {
        api.client
            .get(format!("{}/livez", api.base))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(records(&admin).await.len(), before);
    assert_eq!(admin.store.verify_audit().await.unwrap().problem, None);
}

#[tokio::test]
async fn the_admin_api_serves_the_log_to_auditors_and_erases_subjects() {
    let admin = start().await;
    let (status, _) = admin
        .call(
            "POST",
            "/admin/v1/tenants",
            Some(&admin.root),
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(status, 201);
    let (acme_id, acme_dev) = key(&admin, "acme", "developer").await;
    let (_, acme_auditor) = key(&admin, "acme", "auditor").await;
    let (_, developer) = key(&admin, "default", "developer").await;
    for caller in [&acme_dev, &developer] {
        let response = admin
            .api
            .client
            .get(format!("{}/v1/models", admin.api.base))
            .bearer_auth(caller)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    records(&admin).await;

    // An acme auditor sees acme's records only; another tenant's are "missing".
    let (status, listed) = admin
        .call("GET", "/admin/v1/audit?since=1d", Some(&acme_auditor), None)
        .await;
    assert_eq!(status, 200, "{listed}");
    let listed = listed["records"].as_array().unwrap();
    assert!(!listed.is_empty());
    assert!(listed.iter().all(|r| r["tenant"] == "acme"), "{listed:?}");
    assert!(listed
        .iter()
        .any(|r| r["subject"] == format!("key:{acme_id}") && r["route"] == "/v1/models"));
    assert!(listed[0]["time"].as_str().unwrap().ends_with('Z'));
    let (status, _) = admin
        .call(
            "GET",
            "/admin/v1/audit?tenant=default",
            Some(&acme_auditor),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, bad) = admin
        .call(
            "GET",
            "/admin/v1/audit?since=yesterday",
            Some(&acme_auditor),
            None,
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    // Paging: after the last seen.
    let last = listed.last().unwrap()["seq"].as_i64().unwrap();
    let (_, after) = admin
        .call(
            "GET",
            &format!("/admin/v1/audit?after={last}"),
            Some(&acme_auditor),
            None,
        )
        .await;
    assert!(after["records"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["seq"].as_i64().unwrap() > last));
    // Developers do not read the audit log; auditors do not erase.
    let (status, _) = admin
        .call("GET", "/admin/v1/audit", Some(&developer), None)
        .await;
    assert_eq!(status, 403);
    let (status, _) = admin
        .call(
            "POST",
            "/admin/v1/audit/erase",
            Some(&acme_auditor),
            Some(json!({"user": acme_id})),
        )
        .await;
    assert_eq!(status, 403);

    // Erasure: the subject's records keep their facts, lose who and from where.
    let (status, erased) = admin
        .call(
            "POST",
            "/admin/v1/audit/erase",
            Some(&admin.root),
            Some(json!({"user": acme_id})),
        )
        .await;
    assert_eq!(status, 200, "{erased}");
    assert!(erased["erased"].as_u64().unwrap() >= 1);
    let after = records(&admin).await;
    assert!(after
        .iter()
        .all(|e| e.subject.as_deref() != Some(&format!("key:{acme_id}"))));
    assert!(after
        .iter()
        .any(|e| e.erased && e.route.as_deref() == Some("/v1/models")));
    let erase_record = after
        .iter()
        .rev()
        .find(|e| e.route.as_deref() == Some("/admin/v1/audit/erase") && e.status == Some(200))
        .unwrap();
    assert!(!erase_record.detail.as_deref().unwrap().contains(&acme_id));
    let (status, verified) = admin
        .call("GET", "/admin/v1/audit/verify", Some(&acme_auditor), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(verified["erased"].as_u64().unwrap() >= 1);
    // The next verification resumes after the last one's head; `full=true` walks it all.
    let head = verified["head_seq"].as_i64().unwrap();
    let (_, again) = admin
        .call("GET", "/admin/v1/audit/verify", Some(&acme_auditor), None)
        .await;
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(again["from_seq"].as_i64(), Some(head + 1), "{again}");
    let (_, full) = admin
        .call(
            "GET",
            "/admin/v1/audit/verify?full=true",
            Some(&acme_auditor),
            None,
        )
        .await;
    assert_eq!(full["ok"], true, "{full}");
    assert_eq!(full["from_seq"].as_i64(), Some(1), "{full}");
}

/// Repeated failed logins from one address block it — even with a good key — for the
/// configured time, with a security record in the audit log; then it is let in again.
#[tokio::test]
async fn failed_logins_block_the_address_for_a_while() {
    use std::sync::Arc;

    use enclave_gateway::{AbuseLimits, Authenticator};
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let config = enclave_server::ServerConfig {
        abuse: AbuseLimits {
            max_failures: 3,
            window: Duration::from_secs(60),
            block: Duration::from_secs(2),
        },
        ..crate::server_config()
    };
    let server = crate::TestServer::start_with(
        &crate::fixtures().join("models/qwen2"),
        config,
        crate::serving_config(),
        enclave_server::Access::Keys(Arc::new(Authenticator::new(
            store.clone(),
            Roles::default(),
        ))),
    )
    .await;
    let good = crate::new_key(&store, "default", "viewer").await.key;
    let models = |key: String| {
        server
            .client
            .get(format!("{}/v1/models", server.base))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(models(good.clone()).await.unwrap().status(), 200);
    for i in 0..3 {
        let guess = format!("enc_{:016x}_{}", i, "0".repeat(64));
        assert_eq!(models(guess).await.unwrap().status(), 401);
    }
    let blocked = models(good.clone()).await.unwrap();
    assert_eq!(blocked.status(), 429);
    assert!(blocked.headers().contains_key("retry-after"));
    let body: Value = blocked.json().await.unwrap();
    assert_eq!(body["error"]["code"], "blocked", "{body}");

    server.state.audit_log().unwrap().flush().await.unwrap();
    let entries = store
        .audit_entries(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let security = entries
        .iter()
        .find(|e| e.kind == "security")
        .unwrap_or_else(|| panic!("no security record: {entries:?}"));
    assert_eq!(security.source.as_deref(), Some("127.0.0.1"));
    let detail: Value = serde_json::from_str(security.detail.as_deref().unwrap()).unwrap();
    assert_eq!(
        (
            detail["event"].as_str(),
            detail["offender"].as_str(),
            detail["failures"].as_u64()
        ),
        (Some("blocked"), Some("source"), Some(3))
    );
    assert_eq!(store.verify_audit().await.unwrap().problem, None);

    // After the block, the address is served again.
    let start = Instant::now();
    loop {
        let status = models(good.clone()).await.unwrap().status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(start.elapsed() < Duration::from_secs(10), "still blocked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A server with keys in a SQLite file (the queue's behaviour does not depend on the
/// database) and the given audit queue; its store's URL, for tampering.
async fn queued_server(
    queue: enclave_gateway::AuditQueueConfig,
) -> (
    crate::TestServer,
    enclave_gateway::Store,
    String,
    tempfile::TempDir,
) {
    use std::sync::Arc;

    use enclave_gateway::{Authenticator, Store};
    let dir = tempfile::tempdir().unwrap();
    let url = Store::sqlite_url(dir.path());
    let store = Store::connect(&url).await.unwrap();
    let config = enclave_server::ServerConfig {
        audit_queue: queue,
        ..crate::server_config()
    };
    let server = crate::TestServer::listen_with(
        config,
        enclave_server::Access::Keys(Arc::new(Authenticator::new(
            store.clone(),
            Roles::default(),
        ))),
    )
    .await;
    (server, store, url, dir)
}

/// Under `reject`, a full queue (the database held by another writer) refuses authenticated
/// requests with a 503 and `Retry-After` rather than serving them unrecorded: every request
/// answered 200 has its record once the database is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_queue_refuses_rather_than_serving_unrecorded() {
    use sqlx::{Connection, Executor};
    let (server, store, url, _dir) = queued_server(enclave_gateway::AuditQueueConfig {
        capacity: 2,
        on_backpressure: enclave_gateway::Backpressure::Reject,
        ..Default::default()
    })
    .await;
    let created = crate::new_key(&store, "default", "viewer").await;
    // Another writer holds the database: the audit writer's commit waits.
    let mut holder = sqlx::AnyConnection::connect(&url).await.unwrap();
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute("UPDATE audit_chain SET last_seq = last_seq WHERE id = 1")
        .await
        .unwrap();
    let mut served = 0;
    let mut refused = None;
    for _ in 0..20 {
        let response = server
            .client
            .get(server.url("/v1/models"))
            .bearer_auth(&created.key)
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => served += 1,
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                refused = Some(response.json::<Value>().await.unwrap());
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let refused = refused.unwrap_or_else(|| panic!("never refused ({served} served)"));
    assert_eq!(refused["error"]["code"], "audit_unavailable", "{refused}");
    assert!(
        (1..=4).contains(&served),
        "{served} served into a queue of 2"
    );
    holder.execute("ROLLBACK").await.unwrap();
    let log = server.state.audit_log().unwrap();
    log.flush().await.unwrap();
    let subject = format!("key:{}", created.info.id);
    let recorded = store
        .audit_entries(&AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.subject.as_deref() == Some(subject.as_str()) && e.status == Some(200))
        .count();
    assert_eq!(recorded, served, "every request served has its record");
    let stats = log.stats();
    assert_eq!((stats.dropped, stats.rejected), (0, 1));
    assert_eq!(store.verify_audit().await.unwrap().problem, None);
}

/// A flood without credentials (and with malformed ones) is not one row per request but one
/// summary per source, counting them; the authenticated requests among it each have their
/// record; nothing is dropped, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_without_credentials_is_summarised_per_source() {
    use futures_util::StreamExt;
    let (server, store, _url, _dir) = queued_server(enclave_gateway::AuditQueueConfig {
        capacity: 64,
        ..Default::default()
    })
    .await;
    let created = crate::new_key(&store, "default", "viewer").await;
    // A tenth keyed, a tenth to an unknown route, the rest without or with malformed
    // credentials.
    const TOTAL: usize = 3_300;
    const KEYED: usize = TOTAL / 10;
    const ANONYMOUS: usize = TOTAL - KEYED;
    let send = |i: usize| {
        let client = server.client.clone();
        let (url, unknown) = (server.url("/v1/models"), server.url("/no/such/route"));
        let key = created.key.clone();
        async move {
            let request = match i % 10 {
                0 => client.get(url).bearer_auth(key),
                1 => client.get(unknown),
                2 => client
                    .get(url)
                    .header("authorization", "Basic Zm9vOmJhcg=="),
                _ => client.get(url),
            };
            request.send().await.unwrap().status().as_u16()
        }
    };
    // 32 at a time.
    let statuses: Vec<u16> = futures_util::stream::iter(0..TOTAL)
        .map(send)
        .buffer_unordered(32)
        .collect()
        .await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, KEYED);
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), ANONYMOUS);
    let log = server.state.audit_log().unwrap();
    log.flush().await.unwrap();
    let entries = store
        .audit_entries(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let keyed = entries
        .iter()
        .filter(|e| e.status == Some(200) && e.route.as_deref() == Some("/v1/models"))
        .count();
    assert_eq!(keyed, KEYED);
    let summaries: Vec<Value> = entries
        .iter()
        .filter(|e| e.route.as_deref() == Some("refused.summary"))
        .map(|e| {
            assert_eq!(e.source.as_deref(), Some("127.0.0.1"));
            serde_json::from_str(e.detail.as_deref().unwrap()).unwrap()
        })
        .collect();
    let counted: u64 = summaries.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(counted as usize, ANONYMOUS, "{summaries:?}");
    let unknown: u64 = summaries
        .iter()
        .filter_map(|s| s["routes"]["unmatched 401"].as_u64())
        .sum();
    assert_eq!(unknown as usize, TOTAL / 10);
    assert!(entries.len() < KEYED + 10, "{} records", entries.len());
    let stats = log.stats();
    assert_eq!((stats.dropped, stats.summarised), (0, ANONYMOUS as u64));
    assert_eq!(store.verify_audit().await.unwrap().problem, None);
}
