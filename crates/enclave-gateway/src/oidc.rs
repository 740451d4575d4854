//! OIDC / JWT bearer tokens: signatures checked against a JWKS (a file, or a URL fetched
//! and cached), `iss`, `aud`, `exp` and `nbf` checked, tenant and roles read from configurable
//! claims. Keys are looked up by `kid`; an unknown `kid` makes the set be read again (at most
//! once per [`MIN_REFRESH`]), which is how a rotation at the identity provider reaches us
//! without a restart.
//!
//! Only asymmetric keys are used: a symmetric key in a JWKS would let anyone who can read the
//! set mint tokens.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::error::{GatewayError, Result};

/// The default least time between two reads of the key set caused by unknown key ids (so a
/// flood of forged `kid`s cannot hammer the identity provider).
pub const MIN_REFRESH: Duration = Duration::from_secs(30);

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
    settings: OidcSettings,
    keys: Mutex<Option<KeySet>>,
    http: reqwest::Client,
}

impl OidcVerifier {
    pub fn new(settings: OidcSettings) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| GatewayError::invalid("oidc", e.to_string()))?;
        Ok(Self {
            settings,
            keys: Mutex::new(None),
            http,
        })
    }

    /// Reads the key set now (at start, so a wrong path or URL is reported before serving).
    pub async fn load_keys(&self) -> Result<usize> {
        let set = self.fetch().await?;
        let count = set.keys.len();
        *self.keys.lock().await = Some(set);
        Ok(count)
    }

    /// The verified claims of `token`, or `Unauthenticated` (the reason for logs only).
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| GatewayError::Unauthenticated("malformed token"))?;
        let kid = header
            .kid
            .ok_or(GatewayError::Unauthenticated("token without a key id"))?;
        let (key, algorithm) = self.key(&kid).await?;
        if header.alg != algorithm {
            return Err(GatewayError::Unauthenticated(
                "token algorithm differs from its key's",
            ));
        }
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.validate_nbf = true;
        validation.leeway = self.settings.leeway;
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
        let tenant = text(&self.settings.tenant_claim).ok_or(GatewayError::Unauthenticated(
            "token without a tenant claim",
        ))?;
        let roles = match claims.get(&self.settings.roles_claim) {
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

    /// The key `kid`, reading the set again when it is unknown or old.
    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm)> {
        let mut keys = self.keys.lock().await;
        let stale = keys.as_ref().is_none_or(|set| {
            let age = set.fetched.elapsed();
            age >= self.settings.refresh
                || (!set.keys.contains_key(kid) && age >= self.settings.min_refresh)
        });
        if stale {
            match self.fetch().await {
                Ok(set) => *keys = Some(set),
                // The old set keeps serving if the provider is briefly unreachable.
                Err(e) => tracing::warn!(error = %e, "cannot refresh the JWKS"),
            }
        }
        keys.as_ref()
            .and_then(|set| set.keys.get(kid).cloned())
            .ok_or(GatewayError::Unauthenticated("unknown token key id"))
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
