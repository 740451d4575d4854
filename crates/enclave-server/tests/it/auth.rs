//! Authentication and authorization through the real server: every route without credentials,
//! and every role × route × own/other tenant with API keys from a real SQLite database.

use std::sync::Arc;

use enclave_gateway::{
    unix_time, Authenticator, Limits, NewKey, Permission, Roles, Store, BUILT_IN_ROLES,
};
use enclave_server::{Access, ROUTES};
use serde_json::{json, Value};

use crate::{fixtures, server_config, serving_config, TestServer, MODEL};

/// A small valid request for each route (method, path as called, body).
fn call_for(path: &str) -> (String, Option<Value>) {
    match path {
        "/v1/chat/completions" => (
            path.into(),
            Some(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
            ),
        ),
        "/v1/completions" => (
            path.into(),
            Some(json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1})),
        ),
        "/tokenize" => (path.into(), Some(json!({"model": MODEL, "prompt": "Hi"}))),
        "/detokenize" => (path.into(), Some(json!({"model": MODEL, "tokens": [1, 2]}))),
        "/v1/models/{*id}" => (format!("/v1/models/{MODEL}"), None),
        other => (other.into(), None),
    }
}

async fn send(server: &TestServer, method: &str, path: &str, key: Option<&str>) -> (u16, Value) {
    let (url_path, body) = call_for(path);
    let url = format!("{}{url_path}", server.base);
    let mut request = match method {
        "POST" => server.client.post(url).json(&body.unwrap_or(json!({}))),
        _ => server.client.get(url),
    };
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

struct Keys {
    /// (role, key) in tenant `acme`, whose models include the served one.
    own: Vec<(&'static str, String)>,
    /// (role, key) in tenant `other`, whose models do not.
    other: Vec<(&'static str, String)>,
    expired: String,
    revoked: String,
}

async fn keys(store: &Store) -> Keys {
    let roles = Roles::default();
    let now = unix_time();
    store
        .create_tenant("acme", &["tiny-*".into()], Limits::default(), now)
        .await
        .unwrap();
    store
        .create_tenant("other", &["deepseek-*".into()], Limits::default(), now)
        .await
        .unwrap();
    let make = |tenant: &'static str, role: &'static str, expires_at: Option<i64>, at: i64| {
        let store = store.clone();
        let roles = roles.clone();
        async move {
            let new = NewKey {
                tenant: tenant.into(),
                role: role.into(),
                models: vec!["*".into()],
                name: format!("{tenant}-{role}"),
                expires_at,
                limits: Limits::default(),
                created_by: "test".into(),
            };
            store.create_key(new, &roles, at).await.unwrap()
        }
    };
    let mut own = Vec::new();
    let mut other = Vec::new();
    for (role, _, _) in BUILT_IN_ROLES {
        own.push((role, make("acme", role, None, now).await.key));
        other.push((role, make("other", role, None, now).await.key));
    }
    let expired = make("acme", "admin", Some(now - 60), now - 120).await.key;
    let revoked = make("acme", "admin", None, now).await;
    store.revoke_key(&revoked.info.id, now).await.unwrap();
    Keys {
        own,
        other,
        expired,
        revoked: revoked.key,
    }
}

async fn server(store: Store) -> TestServer {
    let authenticator = Authenticator::new(store, Roles::default());
    TestServer::start_with(
        &fixtures().join("models/qwen2"),
        enclave_server::ServerConfig {
            reasoning_split: false,
            ..server_config()
        },
        serving_config(),
        Access::Keys(Arc::new(authenticator)),
    )
    .await
}

/// A new route cannot be added unprotected: every route of the table, and a path that is no
/// route at all, refuse a caller without credentials — except the two public probes.
#[tokio::test]
async fn every_route_but_the_probes_needs_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let server = server(store).await;
    for (method, path, permission) in ROUTES {
        let (status, body) = send(&server, method, path, None).await;
        if permission.is_none() {
            assert_eq!(status, 200, "{method} {path}");
        } else {
            assert_eq!(status, 401, "{method} {path}: {body}");
            assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
        }
    }
    let (status, _) = send(&server, "GET", "/v1/no-such-route", None).await;
    assert_eq!(status, 401, "unknown routes reveal nothing");
    let (status, _) = send(&server, "POST", "/v1/embeddings", None).await;
    assert_eq!(status, 401);
}

/// What each route should need, written down here independently of the server's table.
const EXPECTED: &[(&str, &str, Option<Permission>)] = &[
    ("POST", "/v1/chat/completions", Some(Permission::Inference)),
    ("POST", "/v1/completions", Some(Permission::Inference)),
    ("POST", "/tokenize", Some(Permission::Inference)),
    ("POST", "/detokenize", Some(Permission::Inference)),
    ("GET", "/v1/models", Some(Permission::ModelsRead)),
    ("GET", "/v1/models/{*id}", Some(Permission::ModelsRead)),
    ("GET", "/health", None),
    ("GET", "/livez", None),
];

/// What each built-in role should be allowed, written down here independently.
fn expected_role(role: &str) -> Vec<Permission> {
    use Permission::*;
    match role {
        "admin" => Permission::ALL.to_vec(),
        "operator" => vec![
            Inference,
            ModelsRead,
            ModelsManage,
            MetricsRead,
            ConfigManage,
        ],
        "developer" => vec![Inference, ModelsRead],
        "analyst" => vec![ModelsRead, MetricsRead],
        "auditor" => vec![AuditRead, MetricsRead],
        "viewer" => vec![ModelsRead],
        other => panic!("a built-in role the test does not know: {other}"),
    }
}

#[test]
fn the_route_table_is_the_expected_one() {
    assert_eq!(
        ROUTES, EXPECTED,
        "a route was added or changed: update EXPECTED"
    );
    for (role, permissions, _) in BUILT_IN_ROLES {
        assert_eq!(permissions, expected_role(role).as_slice(), "{role}");
    }
}

/// Every built-in role × every route × own and other tenant; expired, revoked and made-up keys.
#[tokio::test]
async fn the_authorization_matrix_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let keys = keys(&store).await;
    let server = server(store).await;
    for (tenant_is_own, list) in [(true, &keys.own), (false, &keys.other)] {
        for (role, key) in list {
            let permissions = expected_role(role);
            for (method, path, permission) in EXPECTED {
                let (status, body) = send(&server, method, path, Some(key)).await;
                let expected = match permission {
                    None => 200,
                    Some(p) if !permissions.contains(p) => 403,
                    // The tenant's own model list is empty, not an error.
                    Some(_) if *path == "/v1/models" => 200,
                    Some(_) if !tenant_is_own => 404,
                    Some(_) => 200,
                };
                assert_eq!(
                    status,
                    expected,
                    "{role} ({}) {method} {path}: {body}",
                    if tenant_is_own {
                        "own tenant"
                    } else {
                        "other tenant"
                    }
                );
                if expected == 404 {
                    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
                }
                if expected == 200 && *path == "/v1/models" {
                    let listed = body["data"].as_array().unwrap().len();
                    assert_eq!(listed, usize::from(tenant_is_own), "{role}: {body}");
                }
            }
        }
    }
    for (what, key) in [
        ("expired", keys.expired.as_str()),
        ("revoked", keys.revoked.as_str()),
        (
            "made up",
            "enc_0123456789abcdef_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
        ("foreign", "sk-proj-1234"),
    ] {
        let (status, body) = send(&server, "POST", "/v1/completions", Some(key)).await;
        assert_eq!(status, 401, "{what}: {body}");
        // The reason is not told.
        assert_eq!(
            body["error"]["message"], "the API key or token is not valid",
            "{what}"
        );
    }
}

/// Malformed and oversized credentials are clean 4xx answers, never 500s.
#[tokio::test]
async fn malformed_authorization_headers_are_client_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let keys = keys(&store).await;
    let server = server(store).await;
    let developer = &keys.own.iter().find(|(r, _)| *r == "developer").unwrap().1;
    let url = format!("{}/v1/models", server.base);
    let huge = format!("Bearer {}", "a".repeat(200_000));
    let sql = format!("Bearer enc_' OR '1'='1_{}", "0".repeat(64));
    let headers: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![("authorization", b"Basic dXNlcjpwYXNz".to_vec())],
        vec![("authorization", b"Bearer".to_vec())],
        vec![("authorization", b"Bearer    ".to_vec())],
        vec![("authorization", developer.as_bytes().to_vec())],
        vec![("authorization", b"Bearer \xff\xfe".to_vec())],
        vec![("authorization", sql.into_bytes())],
        vec![("authorization", huge.into_bytes())],
        vec![
            ("authorization", format!("Bearer {developer}").into_bytes()),
            ("authorization", b"Bearer other".to_vec()),
        ],
    ];
    for set in headers {
        let mut request = server.client.get(&url);
        for (name, value) in &set {
            request = request.header(
                *name,
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let status = request.send().await.unwrap().status().as_u16();
        assert!(
            (400..500).contains(&status),
            "{:?}: {status}",
            set.iter()
                .map(|(_, v)| String::from_utf8_lossy(&v[..v.len().min(40)]).into_owned())
                .collect::<Vec<_>>()
        );
    }
    // The server is still up and the good key still works.
    let ok = server
        .client
        .get(&url)
        .bearer_auth(developer)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

/// The prefix cache is partitioned by tenant (CVE-2025-46570): tenant B's request with tenant
/// A's cached prompt gets no cache hit, while A's second request does.
#[tokio::test]
async fn cached_prefixes_are_shared_only_within_a_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    let now = unix_time();
    let roles = Roles::default();
    let mut keys = Vec::new();
    for tenant in ["alpha", "beta"] {
        store
            .create_tenant(tenant, &["*".into()], Limits::default(), now)
            .await
            .unwrap();
        let new = NewKey {
            tenant: tenant.into(),
            role: "developer".into(),
            models: vec!["*".into()],
            name: String::new(),
            expires_at: None,
            limits: Limits::default(),
            created_by: "test".into(),
        };
        keys.push(store.create_key(new, &roles, now).await.unwrap().key);
    }
    let server = server(store).await;
    // 80 prompt tokens: several full 16-token blocks.
    let prompt: Vec<u32> = (0..80).map(|i| 3 + (i * 7) % 90).collect();
    let cached = |key: String| {
        let server = &server;
        let prompt = prompt.clone();
        async move {
            let reply: Value = server
                .client
                .post(format!("{}/v1/completions", server.base))
                .bearer_auth(key)
                .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            reply["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or_else(|| panic!("{reply}"))
        }
    };
    assert_eq!(cached(keys[0].clone()).await, 0, "alpha's first request");
    assert_eq!(
        cached(keys[1].clone()).await,
        0,
        "beta must not hit alpha's blocks"
    );
    assert!(
        cached(keys[0].clone()).await >= 64,
        "alpha's second request hits its blocks"
    );
    assert!(cached(keys[1].clone()).await >= 64, "and beta's its own");
}

/// OIDC tokens through the server: a good token is served by its roles and tenant, a token
/// with the wrong audience, issuer, signature or expiry gets 401.
#[tokio::test]
async fn oidc_tokens_through_the_server() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    let dir = tempfile::tempdir().unwrap();
    let store = crate::test_store(dir.path()).await;
    store
        .create_tenant("acme", &["tiny-*".into()], Limits::default(), unix_time())
        .await
        .unwrap();
    let signing = |kid: &str| {
        let pair = rcgen::KeyPair::generate().unwrap();
        let raw = pair.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])});
        (
            EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk,
        )
    };
    let (key, jwk) = signing("k1");
    let (forger, _) = signing("k1");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
    let verifier = enclave_gateway::OidcVerifier::new(enclave_gateway::OidcSettings {
        issuer: "https://idp".into(),
        audience: "enclave".into(),
        jwks: enclave_gateway::JwksSource::File(jwks),
        tenant_claim: "tenant".into(),
        roles_claim: "roles".into(),
        leeway: 5,
        refresh: std::time::Duration::from_secs(600),
        min_refresh: enclave_gateway::MIN_REFRESH,
    })
    .unwrap();
    verifier.load_keys().await.unwrap();
    let authenticator = Authenticator::new(store, Roles::default()).with_oidc(verifier);
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
    let now = unix_time();
    let token = |signer: &EncodingKey, changes: Value| {
        let mut claims = json!({"iss": "https://idp", "aud": "enclave", "sub": "alice",
            "tenant": "acme", "roles": "developer", "exp": now + 600});
        for (k, v) in changes.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        encode(&header, &claims, signer).unwrap()
    };
    let good = token(&key, json!({}));
    let (status, body) = send(&server, "POST", "/v1/completions", Some(&good)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = send(&server, "GET", "/v1/models", Some(&good)).await;
    assert_eq!(status, 200);
    let viewer = token(&key, json!({"roles": ["viewer"]}));
    assert_eq!(
        send(&server, "POST", "/v1/completions", Some(&viewer))
            .await
            .0,
        403
    );
    for (what, bad) in [
        ("audience", token(&key, json!({"aud": "other"}))),
        ("issuer", token(&key, json!({"iss": "https://evil"}))),
        ("signature", token(&forger, json!({}))),
        ("expiry", token(&key, json!({"exp": now - 120}))),
        (
            "everything",
            "eyJhbGciOiJFUzI1NiJ9.garbage.garbage".to_string(),
        ),
    ] {
        let (status, body) = send(&server, "GET", "/v1/models", Some(&bad)).await;
        assert_eq!(status, 401, "wrong {what}: {body}");
    }
}
