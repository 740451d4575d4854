//! OIDC / JWT bearer tokens: signatures checked against a JWKS (a file, or a URL fetched
//! and cached), `iss`, `aud`, `exp` and `nbf` checked, tenant and roles read from configurable
//! claims. Keys are looked up by `kid`; an unknown `kid` makes the set be read again (at most
//! once per [`MIN_REFRESH`]), which is how a rotation at the identity provider reaches us
//! without a restart. Reads of the set run in the background, one at a time: a token whose key
//! is known never waits for one (an old set is refreshed behind it), and a token naming an
//! unknown key waits at most [`UNKNOWN_KEY_WAIT`] for the read it caused or joined, so a flood
//! of forged key ids costs one read per [`MIN_REFRESH`] and delays no one else.
//!
//! Only asymmetric keys are used: a symmetric key in a JWKS would let anyone who can read the
//! set mint tokens.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex, RwLock};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::watch;

use crate::error::{GatewayError, Result};

/// The default least time between two reads of the key set caused by unknown key ids (so a
/// flood of forged `kid`s cannot hammer the identity provider).
pub const MIN_REFRESH: Duration = Duration::from_secs(30);

/// How long a token naming an unknown key waits for the read of the key set it started or
/// joined (a rotation's first tokens), before it is refused.
pub const UNKNOWN_KEY_WAIT: Duration = Duration::from_secs(2);

/// Where the signing keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    /// `https://idp.example/.well-known/jwks.json` (or `http://` on a trusted network).
    Url(String),
}

/// What a token must satisfy, and where its tenant and roles are.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    /// Claim naming the tenant (default `tenant`).
    pub tenant_claim: String,
    /// Claim holding the role, a string or an array of strings (default `roles`).
    pub roles_claim: String,
    /// Seconds of clock skew tolerated for `exp` and `nbf`.
    pub leeway: u64,
    /// Re-read the key set at least this often.
    pub refresh: Duration,
    /// Re-read it for an unknown key id at most this often ([`MIN_REFRESH`]).
    pub min_refresh: Duration,
}

/// A verified token: who, which tenant, which roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub subject: String,
    pub tenant: String,
    pub roles: Vec<String>,
}

struct KeySet {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched: Instant,
}

/// Verifies bearer tokens against the configured issuer's keys.
pub struct OidcVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    settings: OidcSettings,
    keys: RwLock<Option<Arc<KeySet>>>,
    http: reqwest::Client,
    refresh: Mutex<Refresh>,
    /// Counts finished reads; waiters watch it change.
    refreshed: watch::Sender<u64>,
}

/// Ends a background read however its task ends (done, panicked or cancelled), so a read
/// that never finished cannot leave every later one waiting on it.
struct RefreshDone(Arc<Inner>);

impl Drop for RefreshDone {
    fn drop(&mut self) {
        self.0.state().running = false;
        self.0.refreshed.send_modify(|n| *n += 1);
    }
}

/// The background read of the key set.
#[derive(Default)]
struct Refresh {
    running: bool,
    last_started: Option<Instant>,
    /// Reads started (for tests and logs).
    started: u64,
}

impl OidcVerifier {
    pub fn new(settings: OidcSettings) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| GatewayError::invalid("oidc", e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                keys: RwLock::new(None),
                http,
                refresh: Mutex::new(Refresh::default()),
                refreshed: watch::Sender::new(0),
            }),
        })
    }

    /// Reads the key set now (at start, so a wrong path or URL is reported before serving).
    pub async fn load_keys(&self) -> Result<usize> {
        let set = self.inner.fetch().await?;
        let count = set.keys.len();
        *self.inner.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(set));
        Ok(count)
    }

    /// Reads of the key set started since this verifier was made (beyond [`Self::load_keys`]).
    pub fn refreshes_started(&self) -> u64 {
        self.inner.state().started
    }

    /// The verified claims of `token`, or `Unauthenticated` (the reason for logs only).
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| GatewayError::Unauthenticated("malformed token"))?;
        let kid = header
            .kid
            .ok_or(GatewayError::Unauthenticated("token without a key id"))?;
        let (key, algorithm) = self.inner.key(&kid).await?;
        if header.alg != algorithm {
            return Err(GatewayError::Unauthenticated(
                "token algorithm differs from its key's",
            ));
        }
        let mut validation = Validation::new(algorithm);
        let settings = &self.inner.settings;
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.validate_nbf = true;
        validation.leeway = settings.leeway;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                GatewayError::Unauthenticated(match e.kind() {
                    ErrorKind::InvalidSignature => "bad token signature",
                    ErrorKind::ExpiredSignature => "expired token",
                    ErrorKind::ImmatureSignature => "token not valid yet",
                    ErrorKind::InvalidIssuer => "wrong token issuer",
                    ErrorKind::InvalidAudience => "wrong token audience",
                    ErrorKind::MissingRequiredClaim(_) => "token misses a required claim",
                    _ => "invalid token",
                })
            })?
            .claims;
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
        let subject = text("sub").ok_or(GatewayError::Unauthenticated("token without `sub`"))?;
        let tenant = text(&settings.tenant_claim).ok_or(GatewayError::Unauthenticated(
            "token without a tenant claim",
        ))?;
        let roles = match claims.get(&settings.roles_claim) {
            Some(Value::String(role)) => vec![role.clone()],
            Some(Value::Array(roles)) => roles
                .iter()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        Ok(VerifiedToken {
            subject,
            tenant,
            roles,
        })
    }
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, Refresh> {
        self.refresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key `kid`: at once when known (refreshing an old set behind it); when unknown,
    /// after the background read it starts or joins, waiting at most [`UNKNOWN_KEY_WAIT`].
    async fn key(self: &Arc<Self>, kid: &str) -> Result<(DecodingKey, Algorithm)> {
        let known = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            keys.as_ref()
                .map(|set| (set.keys.get(kid).cloned(), set.fetched.elapsed()))
        };
        if let Some((Some(key), age)) = known {
            if age >= self.settings.refresh {
                self.start_refresh();
            }
            return Ok(key);
        }
        let mut refreshed = self.refreshed.subscribe();
        if self.start_refresh() {
            let _ = tokio::time::timeout(UNKNOWN_KEY_WAIT, refreshed.changed()).await;
        }
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.as_ref()
            .and_then(|set| set.keys.get(kid).cloned())
            .ok_or(GatewayError::Unauthenticated("unknown token key id"))
    }

    /// Starts a background read of the key set unless one runs or one started less than
    /// `min_refresh` ago; whether a read is running now.
    fn start_refresh(self: &Arc<Self>) -> bool {
        let mut state = self.state();
        if state.running {
            return true;
        }
        let now = Instant::now();
        if state
            .last_started
            .is_some_and(|at| now.duration_since(at) < self.settings.min_refresh)
        {
            return false;
        }
        state.running = true;
        state.last_started = Some(now);
        state.started += 1;
        drop(state);
        let done = RefreshDone(self.clone());
        tokio::spawn(async move {
            match done.0.fetch().await {
                Ok(set) => {
                    *done.0.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(set));
                }
                // The old set keeps serving if the provider is briefly unreachable.
                Err(e) => tracing::warn!(error = %e, "cannot refresh the JWKS"),
            }
        });
        true
    }

    async fn fetch(&self) -> Result<KeySet> {
        let text = match &self.settings.jwks {
            JwksSource::File(path) => tokio::fs::read_to_string(path).await.map_err(|e| {
                GatewayError::invalid("oidc.jwks_file", format!("{}: {e}", path.display()))
            })?,
            JwksSource::Url(url) => {
                let response = self
                    .http
                    .get(url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| GatewayError::invalid("oidc.jwks_url", format!("{url}: {e}")))?;
                response
                    .text()
                    .await
                    .map_err(|e| GatewayError::invalid("oidc.jwks_url", format!("{url}: {e}")))?
            }
        };
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| GatewayError::invalid("oidc.jwks", format!("not a JWK set: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Some(algorithm)) = (&jwk.common.key_id, jwk_algorithm(jwk)) else {
                continue; // keys without an id or a signing algorithm cannot be chosen
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid.clone(), (key, algorithm));
            }
        }
        Ok(KeySet {
            keys,
            fetched: Instant::now(),
        })
    }
}

/// A key's algorithm: its `alg`, or the usual one for its curve or type.
fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
    if let Some(alg) = jwk.common.key_algorithm {
        return match alg {
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::RS384 => Some(Algorithm::RS384),
            KeyAlgorithm::RS512 => Some(Algorithm::RS512),
            KeyAlgorithm::PS256 => Some(Algorithm::PS256),
            KeyAlgorithm::PS384 => Some(Algorithm::PS384),
            KeyAlgorithm::PS512 => Some(Algorithm::PS512),
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::ES384 => Some(Algorithm::ES384),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            // Symmetric keys would let anyone holding the JWKS mint tokens.
            _ => None,
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        AlgorithmParameters::OctetKey(_) => None,
    }
}
