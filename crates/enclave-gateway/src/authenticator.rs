//! Turns presented credentials into a [`Principal`], through a short-lived cache of key
//! records so a busy server reads the database about once per key per [`CACHE_TTL`], and a
//! revocation made anywhere (admin API, `enclave keys revoke` on the same database, another
//! replica) takes effect within that time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{GatewayError, Result};
use crate::keys;
use crate::limits::Limits;
use crate::oidc::OidcVerifier;
use crate::principal::{Grants, Identity, Principal};
use crate::rbac::{ModelScope, Permissions, Roles};
use crate::store::{KeyForAuth, Store, Tenant};
use crate::tls::ClientCertificate;

/// How long a key record read from the database is trusted (the bound on revocation delay).
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// A key's last-used time is written at most this often (seconds), not on every request.
const LAST_USED_RESOLUTION: i64 = 60;
/// Entries beyond which expired ones are swept (and, if that is not enough, all), so random
/// well-formed ids cannot grow the cache without bound.
const CACHE_CAPACITY: usize = 16_384;

struct Cached {
    fetched: Instant,
    key: Option<KeyForAuth>,
}

/// Client certificates (mTLS) bound to a tenant, a role and model patterns: those whose every
/// named field matches — a subject, with or without its issuer, or one certificate's or one
/// key's SHA-256 fingerprint. Names are compared whole as [`crate::certificate_subject`] writes
/// them (RFC 4514 escaping makes that one-to-one); fingerprints as lowercase hex.
#[derive(Debug, Clone)]
pub struct CertificateBinding {
    /// `CN=app1, O=Acme`.
    pub subject: Option<String>,
    /// The issuing CA's subject: without it, any trusted CA may issue the subject.
    pub issuer: Option<String>,
    /// SHA-256 of the certificate (DER).
    pub sha256: Option<String>,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo (DER).
    pub public_key_sha256: Option<String>,
    pub tenant: String,
    pub role: String,
    pub models: ModelScope,
}

impl CertificateBinding {
    /// Whether `certificate` is one this binding names.
    pub fn matches(&self, certificate: &ClientCertificate) -> bool {
        let same = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        same(&self.subject, &certificate.subject)
            && same(&self.issuer, &certificate.issuer)
            && same(&self.sha256, &certificate.sha256)
            && same(&self.public_key_sha256, &certificate.public_key_sha256)
    }

    /// A binding must name a subject or a fingerprint (an issuer alone would admit every
    /// certificate of that CA); fingerprints are 64 lowercase hex digits.
    fn check(&self) -> Result<()> {
        if self.subject.is_none() && self.sha256.is_none() && self.public_key_sha256.is_none() {
            return Err(GatewayError::invalid(
                "client_identities",
                "each names a subject, a sha256 or a public_key_sha256 (an issuer alone would \
                 admit every certificate of its CA)",
            ));
        }
        for digest in [&self.sha256, &self.public_key_sha256]
            .into_iter()
            .flatten()
        {
            let hex = digest.len() == 64
                && digest
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            if !hex {
                return Err(GatewayError::invalid(
                    "client_identities",
                    format!("`{digest}` is not a SHA-256 fingerprint (64 lowercase hex digits)"),
                ));
            }
        }
        Ok(())
    }
}

/// Authenticates API keys against the [`Store`], OIDC tokens with the configured verifier, and
/// client certificates by their bindings.
pub struct Authenticator {
    store: Store,
    /// Built-in and configured roles.
    roles: Roles,
    /// Those with the database's, as last read (refreshed after [`CACHE_TTL`]).
    all_roles: Mutex<Option<(Instant, Arc<Roles>)>>,
    cache: Mutex<HashMap<String, Cached>>,
    certificates: Vec<CertificateBinding>,
    tenants: Mutex<HashMap<String, (Instant, Option<Tenant>)>>,
    oidc: Option<OidcVerifier>,
}

impl Authenticator {
    pub fn new(store: Store, roles: Roles) -> Self {
        Self {
            store,
            roles,
            all_roles: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            certificates: Vec::new(),
            tenants: Mutex::new(HashMap::new()),
            oidc: None,
        }
    }

    /// Also accepts OIDC/JWT bearer tokens that `verifier` accepts.
    pub fn with_oidc(mut self, verifier: OidcVerifier) -> Self {
        self.oidc = Some(verifier);
        self
    }

    /// The principal of a bearer credential: an API key (`enc_…`), or a JWT when OIDC is
    /// configured.
    pub async fn authenticate_bearer(&self, token: &str) -> Result<Principal> {
        match &self.oidc {
            Some(oidc) if !token.starts_with(keys::KEY_PREFIX) => {
                self.authenticate_token(oidc, token).await
            }
            _ => self.authenticate_key(token).await,
        }
    }

    async fn authenticate_token(&self, oidc: &OidcVerifier, token: &str) -> Result<Principal> {
        let verified = oidc.verify(token).await?;
        let roles = self.roles().await?;
        // The union of the roles this configuration knows; unknown role names grant nothing.
        let known: Vec<&String> = verified
            .roles
            .iter()
            .filter(|r| roles.permissions(r).is_some())
            .collect();
        if known.is_empty() {
            return Err(GatewayError::Unauthenticated(
                "token names no configured role",
            ));
        }
        let permissions = Permissions::of(
            &known
                .iter()
                .filter_map(|r| roles.permissions(r))
                .flat_map(|p| p.iter())
                .collect::<Vec<_>>(),
        );
        let tenant = self
            .tenant(&verified.tenant)
            .await?
            .ok_or(GatewayError::Unauthenticated(
                "token's tenant does not exist",
            ))?;
        Ok(Principal::new(
            Identity::Token {
                subject: verified.subject,
            },
            tenant.name.clone(),
            known
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(","),
            permissions,
            Grants {
                tenant_models: tenant.models.clone(),
                key_models: ModelScope::all(),
                tenant_limits: tenant.limits,
                key_limits: Limits::default(),
                expires_at: None,
            },
        ))
    }

    /// Also accepts clients by these certificate subjects; each role must be built in or
    /// configured (a binding made at start cannot wait for the database).
    pub fn with_certificates(mut self, bindings: Vec<CertificateBinding>) -> Result<Self> {
        for binding in &bindings {
            binding.check()?;
            self.roles.require(&binding.role)?;
        }
        self.certificates = bindings;
        Ok(self)
    }

    /// The principal a verified client certificate is bound to (the first binding that
    /// matches it); `Unauthenticated` when it is bound to nothing (or its tenant is gone).
    pub async fn authenticate_certificate(
        &self,
        certificate: &ClientCertificate,
    ) -> Result<Principal> {
        let binding = self
            .certificates
            .iter()
            .find(|b| b.matches(certificate))
            .ok_or(GatewayError::Unauthenticated(
                "certificate subject not bound",
            ))?;
        let permissions = self
            .roles()
            .await?
            .permissions(&binding.role)
            .ok_or(GatewayError::Unauthenticated("role no longer configured"))?;
        let tenant = self
            .tenant(&binding.tenant)
            .await?
            .ok_or(GatewayError::Unauthenticated(
                "certificate's tenant does not exist",
            ))?;
        Ok(Principal::new(
            Identity::Certificate {
                subject: certificate.subject.clone(),
            },
            tenant.name.clone(),
            binding.role.clone(),
            permissions,
            Grants {
                tenant_models: tenant.models.clone(),
                key_models: binding.models.clone(),
                tenant_limits: tenant.limits,
                key_limits: Limits::default(),
                expires_at: None,
            },
        ))
    }

    async fn tenant(&self, name: &str) -> Result<Option<Tenant>> {
        {
            let tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((fetched, tenant)) = tenants.get(name) {
                if fetched.elapsed() < CACHE_TTL {
                    return Ok(tenant.clone());
                }
            }
        }
        let tenant = self.store.tenant(name).await?;
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants.insert(name.to_string(), (Instant::now(), tenant.clone()));
        Ok(tenant)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every role a key may hold now: built-in, configured, and created in the database (as
    /// read at most [`CACHE_TTL`] ago, so a role created or deleted anywhere counts within
    /// that).
    pub async fn roles(&self) -> Result<Arc<Roles>> {
        {
            let cached = self.all_roles.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((fetched, roles)) = cached.as_ref() {
                if fetched.elapsed() < CACHE_TTL {
                    return Ok(roles.clone());
                }
            }
        }
        let roles = Arc::new(self.store.roles(&self.roles).await?);
        *self.all_roles.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), roles.clone()));
        Ok(roles)
    }

    /// Forgets the roles read from the database, so a role this process just created or
    /// deleted counts from the next request on.
    pub fn forget_roles(&self) {
        *self.all_roles.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The built-in and configured roles (those a role created in the database may not
    /// shadow).
    pub fn configured_roles(&self) -> &Roles {
        &self.roles
    }

    /// The principal an API key stands for; `Unauthenticated` for anything malformed,
    /// unknown, revoked or expired (the reason is for logs only).
    pub async fn authenticate_key(&self, key: &str) -> Result<Principal> {
        let id = keys::key_id(key).ok_or(GatewayError::Unauthenticated("malformed key"))?;
        let now = unix_time();
        let record = match self.cached(id) {
            Some(hit) => hit,
            None => {
                let fetched = self.store.key_for_auth(id).await?;
                self.remember(id, fetched.clone());
                fetched
            }
        };
        let record = record.ok_or(GatewayError::Unauthenticated("unknown key"))?;
        if !keys::matches(key, &record.sha256) {
            return Err(GatewayError::Unauthenticated("wrong secret"));
        }
        let info = &record.info;
        if info.revoked_at.is_some() {
            return Err(GatewayError::Unauthenticated("revoked key"));
        }
        if info.expires_at.is_some_and(|at| at <= now) {
            return Err(GatewayError::Unauthenticated("expired key"));
        }
        // A role dropped from the configuration leaves its keys powerless, not stronger.
        let permissions = self
            .roles()
            .await?
            .permissions(&info.role)
            .ok_or(GatewayError::Unauthenticated("role no longer configured"))?;
        if info
            .last_used_at
            .is_none_or(|at| now - at >= LAST_USED_RESOLUTION)
        {
            if let Err(e) = self.store.touch_key(&info.id, now).await {
                tracing::warn!(error = %e, key = %info.id, "cannot record the key's last use");
            }
            self.mark_used(id, now);
        }
        Ok(Principal::new(
            Identity::ApiKey {
                id: info.id.clone(),
            },
            info.tenant.clone(),
            info.role.clone(),
            permissions,
            Grants {
                tenant_models: record.tenant_models.clone(),
                key_models: info.models.clone(),
                tenant_limits: record.tenant_limits,
                key_limits: info.limits,
                expires_at: info.expires_at,
            },
        ))
    }

    /// A fresh cache entry for `id`: `Some(record or known-missing)`, `None` to ask the store.
    fn cached(&self, id: &str) -> Option<Option<KeyForAuth>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(id)
            .filter(|c| c.fetched.elapsed() < CACHE_TTL)
            .map(|c| c.key.clone())
    }

    fn remember(&self, id: &str, key: Option<KeyForAuth>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, c| c.fetched.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(
            id.to_string(),
            Cached {
                fetched: Instant::now(),
                key,
            },
        );
    }

    fn mark_used(&self, id: &str, now: i64) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(key)) = cache.get_mut(id).map(|c| c.key.as_mut()) {
            key.info.last_used_at = Some(now);
        }
    }
}

/// Milliseconds since the Unix epoch (audit record times).
pub fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Seconds since the Unix epoch.
pub fn unix_time() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
