//! OIDC bearer tokens: ES256 keys made here, their JWKS served from a file and from a real
//! HTTP server, and every way a token can be wrong.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use enclave_gateway::{
    unix_time, Authenticator, GatewayError, Identity, JwksSource, Limits, OidcSettings,
    OidcVerifier, Permission, Roles, Store,
};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "enclave";

struct SigningKey {
    encoding: EncodingKey,
    jwk: Value,
}

fn signing_key(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate().unwrap();
    let raw = pair.public_key_raw(); // 0x04 || X || Y
    SigningKey {
        encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }),
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn token(key: &SigningKey, kid: &str, claims: Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    encode(&header, &claims, &key.encoding).unwrap()
}

fn claims(changes: Value) -> Value {
    let now = unix_time();
    let mut claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "tenant": "acme",
        "roles": ["developer", "unknown-role"], "iat": now, "nbf": now - 10, "exp": now + 600,
    });
    for (k, v) in changes.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

fn settings(jwks: JwksSource) -> OidcSettings {
    OidcSettings {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        jwks,
        tenant_claim: "tenant".into(),
        roles_claim: "roles".into(),
        leeway: 5,
        refresh: Duration::from_secs(600),
        min_refresh: Duration::ZERO,
    }
}

async fn authenticator(dir: &std::path::Path, jwks: JwksSource) -> Authenticator {
    let store = Store::connect(&Store::sqlite_url(dir)).await.unwrap();
    store
        .create_tenant(
            "acme",
            &["deepseek-*".into()],
            Limits::default(),
            unix_time(),
        )
        .await
        .unwrap();
    let verifier = OidcVerifier::new(settings(jwks)).unwrap();
    assert_eq!(verifier.load_keys().await.unwrap(), 1);
    Authenticator::new(store, Roles::default()).with_oidc(verifier)
}

fn refused(result: enclave_gateway::Result<enclave_gateway::Principal>) -> bool {
    matches!(result, Err(GatewayError::Unauthenticated(_)))
}

#[tokio::test]
async fn tokens_are_checked_for_signature_issuer_audience_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key("k1");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&key])).unwrap();
    let auth = authenticator(dir.path(), JwksSource::File(path)).await;

    let principal = auth
        .authenticate_bearer(&token(&key, "k1", claims(json!({}))))
        .await
        .unwrap();
    assert_eq!(
        principal.identity,
        Identity::Token {
            subject: "alice".into()
        }
    );
    assert_eq!(
        (principal.tenant.as_str(), principal.role.as_str()),
        ("acme", "developer")
    );
    assert!(principal.can(Permission::Inference));
    assert!(!principal.can(Permission::KeysManage));
    assert!(principal.may_use_model("deepseek-r1"));
    assert!(
        !principal.may_use_model("gemma-3"),
        "the tenant's models bound the token"
    );

    let now = unix_time();
    let other = signing_key("k1"); // same kid, another key: a forged signature
    let cases = [
        (
            "wrong issuer",
            token(&key, "k1", claims(json!({"iss": "https://evil.example"}))),
        ),
        (
            "wrong audience",
            token(&key, "k1", claims(json!({"aud": "someone-else"}))),
        ),
        (
            "expired",
            token(&key, "k1", claims(json!({"exp": now - 60}))),
        ),
        (
            "not yet valid",
            token(&key, "k1", claims(json!({"nbf": now + 600}))),
        ),
        ("forged signature", token(&other, "k1", claims(json!({})))),
        ("unknown key id", token(&key, "k9", claims(json!({})))),
        (
            "no known role",
            token(&key, "k1", claims(json!({"roles": ["root"]}))),
        ),
        (
            "unknown tenant",
            token(&key, "k1", claims(json!({"tenant": "globex"}))),
        ),
        (
            "no tenant claim",
            token(&key, "k1", claims(json!({"tenant": null}))),
        ),
        ("garbage", "eyJhbGciOi.not-a.token".to_string()),
        ("empty", String::new()),
    ];
    for (what, token) in cases {
        assert!(
            refused(auth.authenticate_bearer(&token).await),
            "{what} was accepted"
        );
    }
    // A token signed with a shared secret under the same key id is refused: the set holds
    // only the public key.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let hmac = encode(
        &header,
        &claims(json!({})),
        &EncodingKey::from_secret(b"k1"),
    )
    .unwrap();
    assert!(refused(auth.authenticate_bearer(&hmac).await));
    // API keys still go their own way.
    assert!(refused(
        auth.authenticate_bearer(&format!("enc_{}_{}", "0".repeat(16), "0".repeat(64)))
            .await
    ));
}

/// The key set from a real HTTP server; a rotation there (new key id) is picked up when a token
/// names the new id, without a restart.
#[tokio::test]
async fn a_jwks_url_is_fetched_and_rotation_is_followed() {
    let first = signing_key("2026-01");
    let second = signing_key("2026-02");
    let served = Arc::new(Mutex::new(jwks(&[&first])));
    let app = {
        let served = served.clone();
        axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let body = served.lock().unwrap().clone();
                async move { body }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let auth = authenticator(dir.path(), JwksSource::Url(url)).await;
    assert!(auth
        .authenticate_bearer(&token(&first, "2026-01", claims(json!({}))))
        .await
        .is_ok());
    let rotated = token(&second, "2026-02", claims(json!({})));
    assert!(
        refused(auth.authenticate_bearer(&rotated).await),
        "not published yet"
    );
    *served.lock().unwrap() = jwks(&[&second]);
    assert!(
        auth.authenticate_bearer(&rotated).await.is_ok(),
        "published: fetched again"
    );
    // A bad URL is a clear error at start.
    let broken =
        OidcVerifier::new(settings(JwksSource::Url("http://127.0.0.1:9/none".into()))).unwrap();
    let error = broken.load_keys().await.unwrap_err().to_string();
    assert!(error.contains("oidc.jwks_url"), "{error}");
}

/// Reads of the key set run in the background, one at a time and at most once per
/// `min_refresh`: while the identity provider hangs, tokens with a known key are verified at
/// once, a flood of forged key ids causes one read, and each forged token is refused after a
/// bounded wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_ids_cannot_make_token_checks_wait() {
    let key = signing_key("2026-01");
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The first read answers; every later one hangs until the test opens the gate.
    let gate = Arc::new(tokio::sync::Notify::new());
    let app = {
        let (fetches, gate) = (fetches.clone(), gate.clone());
        let body = jwks(&[&key]);
        axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (fetches, gate, body) = (fetches.clone(), gate.clone(), body.clone());
                async move {
                    if fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                        gate.notified().await;
                    }
                    body
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let verifier = Arc::new(
        OidcVerifier::new(OidcSettings {
            min_refresh: Duration::from_secs(3600),
            ..settings(JwksSource::Url(url))
        })
        .unwrap(),
    );
    assert_eq!(verifier.load_keys().await.unwrap(), 1);
    let forger = signing_key("forged");
    let forged: Vec<_> = (0..50)
        .map(|i| {
            let verifier = verifier.clone();
            let token = token(&forger, &format!("forged-{i}"), claims(json!({})));
            tokio::spawn(async move { verifier.verify(&token).await })
        })
        .collect();
    // Wait until the one read they caused is hanging at the provider.
    while fetches.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A good token is verified meanwhile: were it to wait for the hanging read, it would take
    // the HTTP client's 10 s timeout; the bound here is half that (and no measure of speed).
    let good = token(&key, "2026-01", claims(json!({})));
    let verified = tokio::time::timeout(Duration::from_secs(5), verifier.verify(&good)).await;
    assert!(matches!(verified, Ok(Ok(_))), "{verified:?}");
    // Each forged token is refused after its bounded wait, the read still hanging.
    for task in forged {
        assert!(matches!(
            task.await.unwrap(),
            Err(GatewayError::Unauthenticated(_))
        ));
    }
    assert_eq!(verifier.refreshes_started(), 1);
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Later forged ids within `min_refresh` cause no read at all.
    let later = token(&forger, "forged-later", claims(json!({})));
    assert!(verifier.verify(&later).await.is_err());
    assert_eq!(verifier.refreshes_started(), 1);
    gate.notify_waiters();
}
