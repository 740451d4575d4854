//! Turns presented credentials into a [`Principal`], through a short-lived cache of key
//! records so a busy server reads the database about once per key per [`CACHE_TTL`], and a
//! revocation made anywhere (admin API, `enclave keys revoke` on the same database, another
//! replica) takes effect within that time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{GatewayError, Result};
use crate::keys;
use crate::principal::{Identity, Principal};
use crate::rbac::Roles;
use crate::store::{KeyForAuth, Store};

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

/// Authenticates API keys against the [`Store`].
pub struct Authenticator {
    store: Store,
    roles: Roles,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Authenticator {
    pub fn new(store: Store, roles: Roles) -> Self {
        Self {
            store,
            roles,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn roles(&self) -> &Roles {
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
            .roles
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
            record.tenant_models.clone(),
            info.models.clone(),
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

/// Seconds since the Unix epoch.
pub fn unix_time() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
