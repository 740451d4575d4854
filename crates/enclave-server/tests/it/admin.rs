//! The management API on its own listener: absent from the API listener, every route
//! authenticated, tenants and keys created and revoked over HTTP, a tenant's key manager
//! confined to its tenant and unable to mint stronger keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use enclave_gateway::{unix_time, Authenticator, Limits, NewKey, Roles, Store};
use enclave_server::{Access, ADMIN_ROUTES};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::{fixtures, server_config, serving_config, TestServer};

pub struct Admin {
    pub api: TestServer,
    pub admin: String,
    pub store: Store,
    /// An `admin` key of the `default` tenant.
    pub root: String,
    _dir: tempfile::TempDir,
}

pub async fn start() -> Admin {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let custom = ["keys:manage".to_string(), "inference".to_string()];
    let roles = Roles::with_custom([("key-manager", &custom[..])]).unwrap();
    let root = store
        .create_key(
            NewKey {
                tenant: "default".into(),
                role: "admin".into(),
                models: vec!["*".into()],
                name: "root".into(),
                expires_at: None,
                limits: Limits::default(),
                created_by: "test".into(),
            },
            &roles,
            unix_time(),
        )
        .await
        .unwrap()
        .key;
    let authenticator = Authenticator::new(store.clone(), roles);
    let api = TestServer::start_with(
        &fixtures().join("models/qwen2"),
        server_config(),
        serving_config(),
        Access::Keys(Arc::new(authenticator)),
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(enclave_server::serve_admin(
        listener,
        api.state.clone(),
        std::future::pending(),
    ));
    Admin {
        api,
        admin,
        store,
        root,
        _dir: dir,
    }
}

impl Admin {
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let client = &self.api.client;
        let url = format!("{}{path}", self.admin);
        let mut request = match method {
            "POST" => client.post(url).json(&body.unwrap_or(json!({}))),
            "DELETE" => client.delete(url),
            _ => client.get(url),
        };
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn admin_routes_live_only_on_the_admin_listener_and_need_credentials() {
    let admin = start().await;
    for (method, path, permission) in ADMIN_ROUTES {
        let path = path
            .replace("{id}", "0123456789abcdef")
            .replace("{name}", "some-role");
        let (status, body) = admin.call(method, &path, None, None).await;
        let expected = if permission.is_some() { 401 } else { 200 };
        assert_eq!(status, expected, "{method} {path}: {body}");
    }
    // The API listener has none of them, whoever asks.
    let on_api = admin
        .api
        .client
        .get(format!("{}/admin/v1/keys", admin.api.base))
        .bearer_auth(&admin.root)
        .send()
        .await
        .unwrap();
    assert_eq!(on_api.status(), 404);
    // And the admin listener has no inference.
    let (status, _) = admin
        .call("POST", "/v1/completions", Some(&admin.root), None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn tenants_and_keys_over_http() {
    let admin = start().await;
    let root = Some(admin.root.as_str());
    let (status, tenant) = admin
        .call("POST", "/admin/v1/tenants", root, Some(json!({"name": "acme", "models": ["tiny-*"], "limits": {"requests_per_minute": 100}})))
        .await;
    assert_eq!(status, 201, "{tenant}");
    assert_eq!(tenant["limits"]["requests_per_minute"], 100);
    let (status, again) = admin
        .call(
            "POST",
            "/admin/v1/tenants",
            root,
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(status, 409, "{again}");
    let (status, bad) = admin
        .call(
            "POST",
            "/admin/v1/tenants",
            root,
            Some(json!({"name": "x'; DROP TABLE tenants; --"})),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["param"], "tenant");
    let (status, bad) = admin
        .call(
            "POST",
            "/admin/v1/tenants",
            root,
            Some(json!({"name": "beta", "colour": "red"})),
        )
        .await;
    assert_eq!(status, 400, "{bad}");

    // A key manager for acme, made by the root admin.
    let (status, manager) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            root,
            Some(json!({"tenant": "acme", "role": "key-manager"})),
        )
        .await;
    assert_eq!(status, 201, "{manager}");
    let manager = manager["key"].as_str().unwrap().to_string();
    let m = Some(manager.as_str());
    // It makes developer keys of its own tenant by default...
    let (status, dev) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            m,
            Some(json!({"role": "developer", "name": "app"})),
        )
        .await;
    assert_eq!(
        status, 403,
        "developer holds models:read, which the manager lacks: {dev}"
    );
    let (status, dev) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            m,
            Some(json!({"role": "key-manager", "name": "app"})),
        )
        .await;
    assert_eq!(status, 201, "{dev}");
    assert_eq!(dev["tenant"], "acme");
    // ...but not an admin key, nor keys of another tenant, which it cannot see.
    let (status, _) = admin
        .call("POST", "/admin/v1/keys", m, Some(json!({"role": "admin"})))
        .await;
    assert_eq!(status, 403);
    let (status, _) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            m,
            Some(json!({"tenant": "default", "role": "key-manager"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, listed) = admin.call("GET", "/admin/v1/keys", m, None).await;
    assert_eq!(status, 200);
    let tenants: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, ["acme", "acme"], "{listed}");
    assert!(
        !listed.to_string().contains(&manager[22..]),
        "secrets are never listed"
    );
    let (status, all) = admin.call("GET", "/admin/v1/keys", root, None).await;
    assert_eq!(status, 200);
    assert_eq!(all["keys"].as_array().unwrap().len(), 3);
    // Revoking the root's key from acme: not found; its own key: done, and the API listener
    // refuses it within seconds.
    let root_id = &all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["tenant"] == "default")
        .unwrap()["id"];
    let (status, _) = admin
        .call(
            "DELETE",
            &format!("/admin/v1/keys/{}", root_id.as_str().unwrap()),
            m,
            None,
        )
        .await;
    assert_eq!(status, 404);
    let dev_key = dev["key"].as_str().unwrap().to_string();
    let dev_id = dev["id"].as_str().unwrap();
    let tokenize = || {
        admin
            .api
            .client
            .post(format!("{}/tokenize", admin.api.base))
            .bearer_auth(&dev_key)
            .json(&json!({"prompt": "Hi"}))
            .send()
    };
    assert_eq!(tokenize().await.unwrap().status(), 200);
    let (status, revoked) = admin
        .call("DELETE", &format!("/admin/v1/keys/{dev_id}"), m, None)
        .await;
    assert_eq!((status, revoked["state"].as_str()), (200, Some("revoked")));
    let start = Instant::now();
    while tokenize().await.unwrap().status() != 401 {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The roles a key may be given, custom ones included.
    let (status, roles) = admin.call("GET", "/admin/v1/roles", m, None).await;
    assert_eq!(status, 200, "{roles}");
    let manager_role = roles["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "key-manager")
        .unwrap_or_else(|| panic!("{roles}"));
    assert_eq!(
        manager_role["permissions"],
        json!(["inference", "keys:manage"])
    );
    assert_eq!(manager_role["built_in"], false);
    // Tenants are for tenants:manage only; usage for metrics:read.
    let (status, _) = admin.call("GET", "/admin/v1/tenants", m, None).await;
    assert_eq!(status, 403);
    let (status, _) = admin.call("GET", "/admin/v1/usage", m, None).await;
    assert_eq!(status, 403);
    admin
        .api
        .state
        .usage_ledger()
        .flush(&admin.store)
        .await
        .unwrap();
    let (status, usage) = admin
        .call("GET", "/admin/v1/usage?tenant=acme", root, None)
        .await;
    assert_eq!(status, 200, "{usage}");
    let requests: u64 = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    assert!(requests >= 1, "{usage}");
}

/// Roles created over the admin API grant exactly their permissions to keys given them, can
/// only grant what their creator holds, and cannot be deleted while a key holds them.
/// A key limited in models, rate and lifetime cannot mint a key that is less limited in any
/// of them; what it may mint names it as its creator, on the key and in the audit record.
#[tokio::test]
async fn a_key_cannot_mint_a_broader_key() {
    let admin = start().await;
    let root = Some(admin.root.as_str());
    let (status, manager) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            root,
            Some(json!({"role": "key-manager", "models": ["nomatch-*"],
                "limits": {"requests_per_minute": 100}, "expires_in": 3600})),
        )
        .await;
    assert_eq!(status, 201, "{manager}");
    let manager_id = manager["id"].as_str().unwrap().to_string();
    let key = manager["key"].as_str().unwrap().to_string();
    let within = json!({"requests_per_minute": 50});
    // (what, body, the field named)
    let broader = [
        (
            "every model",
            json!({"role": "key-manager", "models": ["*"], "limits": within, "expires_in": 60}),
            "models",
        ),
        (
            "the default models (all)",
            json!({"role": "key-manager", "limits": within, "expires_in": 60}),
            "models",
        ),
        (
            "a wider glob",
            json!({"role": "key-manager", "models": ["nomatch*"], "limits": within, "expires_in": 60}),
            "models",
        ),
        (
            "no rate limit",
            json!({"role": "key-manager", "models": ["nomatch-a*"], "expires_in": 60}),
            "limits",
        ),
        (
            "a looser rate limit",
            json!({"role": "key-manager", "models": ["nomatch-a*"], "limits": {"requests_per_minute": 101}, "expires_in": 60}),
            "limits",
        ),
        (
            "no expiry",
            json!({"role": "key-manager", "models": ["nomatch-a*"], "limits": within}),
            "expires",
        ),
        (
            "a later expiry",
            json!({"role": "key-manager", "models": ["nomatch-a*"], "limits": within, "expires_in": 7200}),
            "expires",
        ),
    ];
    for (what, body, field) in broader {
        let (status, refused) = admin
            .call("POST", "/admin/v1/keys", Some(&key), Some(body))
            .await;
        assert_eq!(status, 403, "{what}: {refused}");
        assert_eq!(refused["error"]["param"], field, "{what}: {refused}");
    }
    let (status, minted) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            Some(&key),
            Some(
                json!({"role": "key-manager", "models": ["nomatch-a*", "nomatch-b"],
                "limits": within, "expires_in": 600}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let creator = format!("key:{manager_id}");
    assert_eq!(minted["created_by"], creator.as_str());
    // The refusals and the creation are each audited; the creation names its creator.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = admin
            .store
            .audit_entries(&enclave_gateway::AuditQuery {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        let created = records.iter().find(|e| {
            e.route.as_deref() == Some("/admin/v1/keys")
                && e.status == Some(201)
                && e.subject.as_deref() == Some(creator.as_str())
        });
        if let Some(created) = created {
            let detail: Value = serde_json::from_str(created.detail.as_deref().unwrap()).unwrap();
            assert_eq!(detail["created_by"], creator.as_str());
            assert_eq!(detail["id"], minted["id"]);
            let refused = records
                .iter()
                .filter(|e| e.status == Some(403) && e.subject.as_deref() == Some(creator.as_str()))
                .count();
            assert_eq!(refused, 7);
            break;
        }
        assert!(Instant::now() < deadline, "no audit record of the creation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn roles_created_over_http() {
    let admin = start().await;
    let root = Some(admin.root.as_str());
    let summariser = json!({"name": "summariser", "permissions": ["inference"],
        "description": "the summary bot"});
    let (status, role) = admin
        .call("POST", "/admin/v1/roles", root, Some(summariser.clone()))
        .await;
    assert_eq!(status, 201, "{role}");
    assert_eq!(role["permissions"], json!(["inference"]));
    assert_eq!(role["origin"], "database");
    let (status, again) = admin
        .call("POST", "/admin/v1/roles", root, Some(summariser))
        .await;
    assert_eq!(status, 409, "{again}");
    for (body, expected) in [
        (json!({"name": "admin", "permissions": ["inference"]}), 409),
        (
            json!({"name": "key-manager", "permissions": ["inference"]}),
            409,
        ),
        (
            json!({"name": "x", "permissions": ["launch:missiles"]}),
            400,
        ),
        (
            json!({"name": "x'; DROP TABLE roles; --", "permissions": []}),
            400,
        ),
        (
            json!({"name": "x", "permissions": ["inference"], "extra": 1}),
            400,
        ),
    ] {
        let (status, error) = admin
            .call("POST", "/admin/v1/roles", root, Some(body.clone()))
            .await;
        assert_eq!(status, expected, "{body}: {error}");
    }

    // Creating roles needs config:manage; and no one defines a role stronger than themselves.
    let (_, manager) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            root,
            Some(json!({"role": "key-manager"})),
        )
        .await;
    let manager = manager["key"].as_str().unwrap().to_string();
    let operator = crate::new_key(&admin.store, "default", "operator")
        .await
        .key;
    let (status, _) = admin
        .call(
            "POST",
            "/admin/v1/roles",
            Some(&manager),
            Some(json!({"name": "y", "permissions": []})),
        )
        .await;
    // A key manager lists roles (GET) but may not create them (POST needs config:manage).
    assert_eq!(status, 403);
    let (status, _) = admin
        .call("GET", "/admin/v1/roles", Some(&manager), None)
        .await;
    assert_eq!(status, 200);
    let (status, refused) = admin
        .call(
            "POST",
            "/admin/v1/roles",
            Some(&operator),
            Some(json!({"name": "y", "permissions": ["tenants:manage"]})),
        )
        .await;
    assert_eq!(status, 403, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("tenants:manage"), "{refused}");

    // A key with the new role: inference yes, the model list no.
    let (status, created) = admin
        .call(
            "POST",
            "/admin/v1/keys",
            root,
            Some(json!({"role": "summariser"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let bot = created["key"].as_str().unwrap().to_string();
    let api = |method: &str, path: &str| {
        let url = format!("{}{path}", admin.api.base);
        let request = match method {
            "POST" => admin
                .api
                .client
                .post(url)
                .json(&json!({"model": crate::MODEL, "prompt": "hi"})),
            _ => admin.api.client.get(url),
        };
        request.bearer_auth(&bot).send()
    };
    assert_eq!(api("POST", "/tokenize").await.unwrap().status(), 200);
    assert_eq!(api("GET", "/v1/models").await.unwrap().status(), 403);
    let (_, listed) = admin.call("GET", "/admin/v1/roles", root, None).await;
    assert!(
        listed["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "summariser" && r["description"] == "the summary bot"),
        "{listed}"
    );

    // Not deleted while a key holds it; deleted once none does; built-in ones never.
    let (status, held) = admin
        .call("DELETE", "/admin/v1/roles/summariser", root, None)
        .await;
    assert_eq!(status, 400, "{held}");
    assert!(held["error"]["message"]
        .as_str()
        .unwrap()
        .contains("revoke"));
    let id = created["id"].as_str().unwrap();
    let (status, _) = admin
        .call("DELETE", &format!("/admin/v1/keys/{id}"), root, None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = admin
        .call("DELETE", "/admin/v1/roles/summariser", root, None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = admin
        .call("DELETE", "/admin/v1/roles/summariser", root, None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = admin
        .call("DELETE", "/admin/v1/roles/admin", root, None)
        .await;
    assert_eq!(status, 400);
    // Gone within the authenticator's cache lifetime: no new key may get it.
    let start = Instant::now();
    loop {
        let (status, _) = admin
            .call(
                "POST",
                "/admin/v1/keys",
                root,
                Some(json!({"role": "summariser"})),
            )
            .await;
        if status == 400 {
            break;
        }
        assert_eq!(status, 201);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the deleted role still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The admin listener's table, written down here independently of the server's.
const EXPECTED_ADMIN: &[(&str, &str, Option<enclave_gateway::Permission>)] = {
    use enclave_gateway::Permission::*;
    &[
        ("GET", "/admin/v1/tenants", Some(TenantsManage)),
        ("POST", "/admin/v1/tenants", Some(TenantsManage)),
        ("GET", "/admin/v1/keys", Some(KeysManage)),
        ("POST", "/admin/v1/keys", Some(KeysManage)),
        ("DELETE", "/admin/v1/keys/{id}", Some(KeysManage)),
        ("GET", "/admin/v1/usage", Some(MetricsRead)),
        ("GET", "/metrics", Some(MetricsRead)),
        ("GET", "/admin/v1/audit", Some(AuditRead)),
        ("GET", "/admin/v1/audit/verify", Some(AuditRead)),
        ("POST", "/admin/v1/audit/erase", Some(TenantsManage)),
        ("GET", "/admin/v1/roles", Some(KeysManage)),
        ("POST", "/admin/v1/roles", Some(ConfigManage)),
        ("DELETE", "/admin/v1/roles/{name}", Some(ConfigManage)),
        ("GET", "/livez", None),
    ]
};

/// Every built-in role × every admin route: 403 exactly where the role lacks the route's
/// permission; elsewhere the handler answers (with an empty body or a made-up id that is a 4xx
/// of its own, never 401/403).
#[tokio::test]
async fn the_admin_authorization_matrix_holds() {
    assert_eq!(
        ADMIN_ROUTES, EXPECTED_ADMIN,
        "an admin route was added or changed: update EXPECTED_ADMIN"
    );
    let admin = start().await;
    for (role, permissions, _) in enclave_gateway::BUILT_IN_ROLES {
        let key = crate::new_key(&admin.store, "default", role).await.key;
        for (method, path, needs) in EXPECTED_ADMIN {
            let path = path
                .replace("{id}", "0123456789abcdef")
                .replace("{name}", "no-such-role");
            let (status, body) = admin.call(method, &path, Some(&key), None).await;
            let allowed = needs.is_none_or(|p| permissions.contains(&p));
            if allowed {
                assert!(
                    status != 401 && status != 403 && status < 500,
                    "{role}: {method} {path} → {status} {body}"
                );
            } else {
                assert_eq!(status, 403, "{role}: {method} {path} → {body}");
            }
        }
    }
}

/// `GET /metrics` (metrics:read) in the Prometheus text format: requests by listener, route
/// and status, refusals, and the engine's token counters after a completion.
#[tokio::test]
async fn metrics_count_requests_refusals_and_tokens() {
    let admin = start().await;
    let completion = admin
        .api
        .client
        .post(format!("{}/v1/completions", admin.api.base))
        .bearer_auth(&admin.root)
        .json(
            &json!({"model": crate::MODEL, "prompt": "hello", "max_tokens": 5,
            "ignore_eos": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(completion.status(), 200);
    let usage = completion.json::<Value>().await.unwrap()["usage"].clone();
    let refused = admin
        .api
        .client
        .get(format!("{}/v1/models", admin.api.base))
        .bearer_auth("enc_0123456789abcdef_00")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // The engine publishes its counters after each step, a moment after the last event.
    let wanted_tokens = 1.0 + usage["completion_tokens"].as_f64().unwrap();
    let start = Instant::now();
    let text = loop {
        let response = admin
            .api
            .client
            .get(format!("{}/metrics", admin.admin))
            .bearer_auth(&admin.root)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let text = response.text().await.unwrap();
        if text.contains(&format!("enclave_generation_tokens_total {wanted_tokens}"))
            || start.elapsed() > Duration::from_secs(5)
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert_eq!(
        value(
            r#"enclave_http_requests_total{listener="api",method="POST",route="/v1/completions",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            r#"enclave_http_requests_total{listener="api",method="GET",route="/v1/models",status="401"}"#
        ),
        1.0
    );
    assert!(value("enclave_auth_failures_total") >= 1.0);
    assert_eq!(value("enclave_model_ready"), 1.0);
    // The warm-up request generates one token of one prompt token; the completion the rest.
    assert_eq!(value("enclave_generation_tokens_total"), wanted_tokens);
    assert_eq!(
        value("enclave_prompt_tokens_total"),
        1.0 + usage["prompt_tokens"].as_f64().unwrap()
    );
    assert!(value(r#"enclave_kv_cache_blocks{state="free"}"#) > 0.0);
    assert!(text.contains("enclave_http_request_duration_seconds_bucket"));

    // Without metrics:read (a developer key): 403.
    let developer = crate::new_key(&admin.store, "default", "developer")
        .await
        .key;
    let (status, _) = admin.call("GET", "/metrics", Some(&developer), None).await;
    assert_eq!(status, 403);
    // Server-wide series are not another tenant's to read, even with metrics:read; its own
    // usage is.
    admin
        .store
        .create_tenant("acme", &["*".to_string()], Limits::default(), unix_time())
        .await
        .unwrap();
    let tenant_analyst = crate::new_key(&admin.store, "acme", "analyst").await.key;
    let (status, body) = admin
        .call("GET", "/metrics", Some(&tenant_analyst), None)
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("/admin/v1/usage"), "{body}");
    let (status, _) = admin
        .call("GET", "/admin/v1/usage", Some(&tenant_analyst), None)
        .await;
    assert_eq!(status, 200);
    let server_analyst = crate::new_key(&admin.store, "default", "analyst").await.key;
    let (status, _) = admin
        .call("GET", "/metrics", Some(&server_analyst), None)
        .await;
    assert_eq!(status, 200);
}
