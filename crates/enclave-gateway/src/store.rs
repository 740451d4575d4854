//! Where access-control state lives: SQLite in the data directory by default, PostgreSQL
//! when several replicas share it. One schema for both (portable SQL through sqlx's `Any`
//! driver), migrated at connection.

use std::path::Path;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::audit::{append_in, lock_chain, AuditEvent, Transaction};
use crate::error::{GatewayError, Result};
use crate::keys;
use crate::limits::Limits;
use crate::rbac::{check_name, parse_permissions, ModelScope, Permissions, Roles};
use crate::usage::{UsageCounts, UsageRow};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The database of tenants and keys. Cheap to clone (a connection pool).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
}

/// A tenant: the unit of isolation (its models, its keys, its usage).
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub models: ModelScope,
    pub limits: Limits,
    pub created_at: i64,
}

/// What `keys create` asks for.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub tenant: String,
    pub role: String,
    /// Model patterns the key may use, within its tenant's (`["*"]`: all of the tenant's).
    pub models: Vec<String>,
    /// A label for people (`ci-runner`, `alice-laptop`).
    pub name: String,
    pub expires_at: Option<i64>,
    pub limits: Limits,
    /// Who creates it, as audit records name them (`key:<id>`, `cli:<user>`).
    pub created_by: String,
}

/// A stored key, without its secret.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub id: String,
    pub tenant: String,
    pub role: String,
    pub models: ModelScope,
    pub name: String,
    pub limits: Limits,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// Who created it (`key:<id>`, `cli:<user>`); empty for keys older than the record.
    pub created_by: String,
}

/// A key just created: the one time its full value is known.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub info: KeyInfo,
    pub key: String,
}

/// What authentication needs of a key: the key, its hash and its tenant's models.
#[derive(Debug, Clone)]
pub(crate) struct KeyForAuth {
    pub info: KeyInfo,
    pub sha256: String,
    pub tenant_models: ModelScope,
    pub tenant_limits: Limits,
}

impl Store {
    /// The default database: `enclave.db` in `data_dir` (created if missing).
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("enclave.db").display()
        )
    }

    /// Connects to `url` (`sqlite://…` or `postgres://…`) and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 4 } else { 8 })
            .connect(url)
            .await?;
        if is_sqlite {
            // Readers (a running server) and a writer (`enclave keys revoke`) at once; the mode
            // is kept in the file.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Begins an admin change; when it is to be audited, the audit chain's lock is taken
    /// first, so its record follows the chain's head and commits with it.
    async fn begin_change(&self, audited: bool) -> Result<Transaction<'static>> {
        let mut tx = self.pool.begin().await?;
        if audited {
            lock_chain(&mut tx).await?;
        }
        Ok(tx)
    }

    pub async fn create_tenant(
        &self,
        name: &str,
        models: &[String],
        limits: Limits,
        now: i64,
    ) -> Result<Tenant> {
        self.create_tenant_audited(name, models, limits, now, None)
            .await
    }

    /// [`Self::create_tenant`] with its audit record in the same transaction.
    pub async fn create_tenant_audited(
        &self,
        name: &str,
        models: &[String],
        limits: Limits,
        now: i64,
        record: ChangeRecord<'_, Tenant>,
    ) -> Result<Tenant> {
        check_name("tenant", name)?;
        let models = ModelScope::new(models)?;
        check_limits(&limits)?;
        if self.tenant(name).await?.is_some() {
            return Err(GatewayError::Exists(format!("tenant `{name}`")));
        }
        let mut tx = self.begin_change(record.is_some()).await?;
        sqlx::query(
            "INSERT INTO tenants (name, models, created_at, requests_per_minute, \
             tokens_per_minute, concurrent_requests) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(name)
        .bind(models.stored())
        .bind(now)
        .bind(limits.requests_per_minute.map(to_i64))
        .bind(limits.tokens_per_minute.map(to_i64))
        .bind(limits.concurrent_requests.map(to_i64))
        .execute(&mut *tx)
        .await?;
        let tenant = Tenant {
            name: name.to_string(),
            models,
            limits,
            created_at: now,
        };
        end_change(tx, record, &tenant).await?;
        Ok(tenant)
    }

    pub async fn tenant(&self, name: &str) -> Result<Option<Tenant>> {
        sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| tenant_from(&row))
        .transpose()
    }

    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(tenant_from)
        .collect()
    }

    /// Creates a key for an existing tenant with a role `roles` knows; returns it with its
    /// secret, which is not kept.
    pub async fn create_key(&self, new: NewKey, roles: &Roles, now: i64) -> Result<CreatedKey> {
        self.create_key_audited(new, roles, now, None).await
    }

    /// [`Self::create_key`] with its audit record (made from the new key's information, never
    /// its secret) in the same transaction.
    pub async fn create_key_audited(
        &self,
        new: NewKey,
        roles: &Roles,
        now: i64,
        record: ChangeRecord<'_, KeyInfo>,
    ) -> Result<CreatedKey> {
        check_name("tenant", &new.tenant)?;
        roles.require(&new.role)?;
        let models = ModelScope::new(&new.models)?;
        if new.name.len() > 128 || new.name.chars().any(char::is_control) {
            return Err(GatewayError::invalid(
                "name",
                "a key's name is at most 128 characters, without control characters",
            ));
        }
        check_limits(&new.limits)?;
        if new.expires_at.is_some_and(|at| at <= now) {
            return Err(GatewayError::invalid(
                "expires",
                "the expiry is in the past",
            ));
        }
        if self.tenant(&new.tenant).await?.is_none() {
            return Err(GatewayError::NotFound(format!(
                "tenant `{}` (create it first: `enclave tenants create {}`)",
                new.tenant, new.tenant
            )));
        }
        let secret = keys::generate();
        let mut tx = self.begin_change(record.is_some()).await?;
        sqlx::query(
            "INSERT INTO api_keys (id, secret_sha256, tenant, role, models, name, created_at, \
             expires_at, requests_per_minute, tokens_per_minute, concurrent_requests, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&secret.id)
        .bind(&secret.sha256)
        .bind(&new.tenant)
        .bind(&new.role)
        .bind(models.stored())
        .bind(&new.name)
        .bind(now)
        .bind(new.expires_at)
        .bind(new.limits.requests_per_minute.map(to_i64))
        .bind(new.limits.tokens_per_minute.map(to_i64))
        .bind(new.limits.concurrent_requests.map(to_i64))
        .bind(&new.created_by)
        .execute(&mut *tx)
        .await?;
        let created = CreatedKey {
            info: KeyInfo {
                id: secret.id,
                tenant: new.tenant,
                role: new.role,
                models,
                name: new.name,
                limits: new.limits,
                created_at: now,
                expires_at: new.expires_at,
                revoked_at: None,
                last_used_at: None,
                created_by: new.created_by,
            },
            key: secret.key,
        };
        end_change(tx, record, &created.info).await?;
        Ok(created)
    }

    /// Stores a new role with `permissions` (names); `configured` (the built-in and
    /// configured roles) may not hold a role of that name.
    pub async fn create_role(
        &self,
        name: &str,
        permissions: &[String],
        description: &str,
        configured: &Roles,
        now: i64,
    ) -> Result<Permissions> {
        self.create_role_audited(name, permissions, description, configured, now, None)
            .await
    }

    /// [`Self::create_role`] with its audit record in the same transaction.
    pub async fn create_role_audited(
        &self,
        name: &str,
        permissions: &[String],
        description: &str,
        configured: &Roles,
        now: i64,
        record: ChangeRecord<'_, Permissions>,
    ) -> Result<Permissions> {
        check_name("name", name)?;
        if let Some(origin) = configured.origin(name) {
            return Err(GatewayError::Exists(format!(
                "role `{name}` ({} role)",
                origin.name()
            )));
        }
        let parsed = parse_permissions(name, permissions)?;
        if description.len() > 256 || description.chars().any(char::is_control) {
            return Err(GatewayError::invalid(
                "description",
                "a role's description is at most 256 characters, without control characters",
            ));
        }
        // Keys left holding this name (from a role deleted while they were expired, or one the
        // configuration dropped) would otherwise wake up with the new role's permissions.
        let holders = self.role_holders(name, None).await?;
        if holders > 0 {
            return Err(GatewayError::invalid(
                "name",
                format!("{holders} unrevoked key(s) still name role `{name}`; revoke them or pick another name"),
            ));
        }
        let stored: Vec<&str> = parsed.iter().map(|p| p.name()).collect();
        let mut tx = self.begin_change(record.is_some()).await?;
        let inserted = sqlx::query(
            "INSERT INTO roles (name, permissions, description, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(stored.join(","))
        .bind(description)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(GatewayError::Exists(format!("role `{name}`")));
        }
        end_change(tx, record, &parsed).await?;
        Ok(parsed)
    }

    /// Deletes stored role `name`; refused while a key that is neither revoked nor expired
    /// holds it (revoke those first), so no working key silently loses its permissions.
    pub async fn delete_role(&self, name: &str, now: i64) -> Result<()> {
        self.delete_role_audited(name, now, None).await
    }

    /// [`Self::delete_role`] with its audit record in the same transaction.
    pub async fn delete_role_audited(
        &self,
        name: &str,
        now: i64,
        record: ChangeRecord<'_, ()>,
    ) -> Result<()> {
        let mut tx = self.begin_change(record.is_some()).await?;
        // One statement, so no key can be given the role between the check and the delete.
        let deleted = sqlx::query(
            "DELETE FROM roles WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM api_keys \
             WHERE role = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2))",
        )
        .bind(name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if deleted.rows_affected() == 1 {
            return end_change(tx, record, &()).await;
        }
        drop(tx);
        let holders = self.role_holders(name, Some(now)).await?;
        if holders > 0 {
            return Err(GatewayError::invalid(
                "role",
                format!("{holders} active key(s) hold role `{name}`; revoke them first"),
            ));
        }
        Err(GatewayError::NotFound(format!("role `{name}`")))
    }

    /// Unrevoked keys naming `role` (only those not expired at `now`, when given).
    async fn role_holders(&self, role: &str, now: Option<i64>) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM api_keys WHERE role = $1 AND revoked_at IS NULL \
             AND ($2 < 0 OR expires_at IS NULL OR expires_at > $2)",
        )
        .bind(role)
        .bind(now.unwrap_or(-1))
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?)
    }

    /// `configured` (built-in and configured roles) with the roles stored in the database.
    pub async fn roles(&self, configured: &Roles) -> Result<Roles> {
        let rows = sqlx::query("SELECT name, permissions, description FROM roles ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        let mut stored = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: String = row.try_get("name")?;
            let names: String = row.try_get("permissions")?;
            let names: Vec<String> = names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect();
            // A permission this version does not know (a newer replica's) grants nothing here.
            let permissions = Permissions::of(
                &names
                    .iter()
                    .filter_map(|n| crate::rbac::Permission::parse(n).ok())
                    .collect::<Vec<_>>(),
            );
            stored.push((name, permissions, row.try_get("description")?));
        }
        Ok(configured.with_stored(stored))
    }

    /// Keys, oldest first; only `tenant`'s when given.
    pub async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE ($1 = '' OR k.tenant = $1) \
             ORDER BY k.created_at, k.id"
        ))
        .bind(tenant.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from).collect()
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyInfo>> {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| key_from(&row))
        .transpose()
    }

    /// Revokes key `id` (from now on, and on running servers within the authenticator's
    /// cache lifetime); revoking a revoked key keeps its first revocation time.
    pub async fn revoke_key(&self, id: &str, now: i64) -> Result<KeyInfo> {
        self.revoke_key_audited(id, now, None).await
    }

    /// [`Self::revoke_key`] with its audit record in the same transaction.
    pub async fn revoke_key_audited(
        &self,
        id: &str,
        now: i64,
        record: ChangeRecord<'_, KeyInfo>,
    ) -> Result<KeyInfo> {
        let mut tx = self.begin_change(record.is_some()).await?;
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let key = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| key_from(&row))
        .transpose()?
        .ok_or_else(|| GatewayError::NotFound(format!("key `{id}`")))?;
        end_change(tx, record, &key).await?;
        Ok(key)
    }

    pub(crate) async fn key_for_auth(&self, id: &str) -> Result<Option<KeyForAuth>> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS}, k.secret_sha256, t.models AS tenant_models, \
             t.requests_per_minute AS tenant_rpm, t.tokens_per_minute AS tenant_tpm, \
             t.concurrent_requests AS tenant_concurrent FROM api_keys k \
             JOIN tenants t ON t.name = k.tenant WHERE k.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(KeyForAuth {
            info: key_from(&row)?,
            sha256: row.try_get("secret_sha256")?,
            tenant_models: ModelScope::parse_stored(&row.try_get::<String, _>("tenant_models")?)?,
            tenant_limits: limits_from(&row, ["tenant_rpm", "tenant_tpm", "tenant_concurrent"])?,
        }))
    }

    pub(crate) async fn touch_key(&self, id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Adds `counts` to the usage of `tenant`'s key `key_id` on the UTC day starting at `day`.
    pub(crate) async fn add_usage(
        &self,
        tenant: &str,
        key_id: &str,
        day: i64,
        counts: UsageCounts,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO usage (tenant, key_id, day, requests, prompt_tokens, completion_tokens) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, key_id, day) DO UPDATE SET \
             requests = usage.requests + excluded.requests, \
             prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens, \
             completion_tokens = usage.completion_tokens + excluded.completion_tokens",
        )
        .bind(tenant)
        .bind(key_id)
        .bind(day)
        .bind(to_i64(counts.requests))
        .bind(to_i64(counts.prompt_tokens))
        .bind(to_i64(counts.completion_tokens))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Usage rows since `since` (Unix time), by day, tenant and key; only `tenant`'s and only
    /// `key_id`'s when given.
    pub async fn usage(
        &self,
        tenant: Option<&str>,
        key_id: Option<&str>,
        since: i64,
    ) -> Result<Vec<UsageRow>> {
        let rows = sqlx::query(
            "SELECT tenant, key_id, day, requests, prompt_tokens, completion_tokens FROM usage \
             WHERE day >= $1 AND ($2 = '' OR tenant = $2) AND ($3 = '' OR key_id = $3) \
             ORDER BY day, tenant, key_id",
        )
        .bind(since - since.rem_euclid(86_400))
        .bind(tenant.unwrap_or(""))
        .bind(key_id.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let count = |name: &str| -> Result<u64> {
                    Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0))
                };
                Ok(UsageRow {
                    tenant: row.try_get("tenant")?,
                    key_id: row.try_get("key_id")?,
                    day: row.try_get("day")?,
                    counts: UsageCounts {
                        requests: count("requests")?,
                        prompt_tokens: count("prompt_tokens")?,
                        completion_tokens: count("completion_tokens")?,
                    },
                })
            })
            .collect()
    }
}

const TENANT_COLUMNS: &str =
    "name, models, created_at, requests_per_minute, tokens_per_minute, concurrent_requests";

pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Limits of at least 1 (0 would refuse everything: revoke the key instead).
fn check_limits(limits: &Limits) -> Result<()> {
    for (name, value) in [
        ("requests_per_minute", limits.requests_per_minute),
        ("tokens_per_minute", limits.tokens_per_minute),
        ("concurrent_requests", limits.concurrent_requests),
    ] {
        if value == Some(0) {
            return Err(GatewayError::invalid(
                "limits",
                format!("`{name}` must be at least 1 (leave it out for no limit)"),
            ));
        }
    }
    Ok(())
}

fn limits_from(row: &AnyRow, [rpm, tpm, concurrent]: [&str; 3]) -> Result<Limits> {
    let get = |name: &str| -> Result<Option<u64>> {
        Ok(row
            .try_get::<Option<i64>, _>(name)?
            .map(|v| u64::try_from(v).unwrap_or(0)))
    };
    Ok(Limits {
        requests_per_minute: get(rpm)?,
        tokens_per_minute: get(tpm)?,
        concurrent_requests: get(concurrent)?,
    })
}

// Qualified with `k.` so the join with `tenants` can share the list: every query names the
// table `api_keys k`.
const KEY_COLUMNS: &str = "k.id, k.tenant, k.role, k.models, k.name, k.created_at, \
                           k.expires_at, k.revoked_at, k.last_used_at, k.requests_per_minute, \
                           k.tokens_per_minute, k.concurrent_requests, k.created_by";

fn tenant_from(row: &AnyRow) -> Result<Tenant> {
    Ok(Tenant {
        name: row.try_get("name")?,
        models: ModelScope::parse_stored(&row.try_get::<String, _>("models")?)?,
        limits: limits_from(
            row,
            [
                "requests_per_minute",
                "tokens_per_minute",
                "concurrent_requests",
            ],
        )?,
        created_at: row.try_get("created_at")?,
    })
}

fn key_from(row: &AnyRow) -> Result<KeyInfo> {
    Ok(KeyInfo {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        role: row.try_get("role")?,
        models: ModelScope::parse_stored(&row.try_get::<String, _>("models")?)?,
        name: row.try_get("name")?,
        limits: limits_from(
            row,
            [
                "requests_per_minute",
                "tokens_per_minute",
                "concurrent_requests",
            ],
        )?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
        created_by: row.try_get("created_by")?,
    })
}

/// The audit record of an admin change, made from what the change did; appended in the
/// change's transaction, so neither commits without the other and no answer comes before both.
pub type ChangeRecord<'a, T> = Option<&'a (dyn Fn(&T) -> AuditEvent + Send + Sync)>;

/// Appends `record` (made from `done`) and commits the change.
async fn end_change<T>(
    mut tx: Transaction<'static>,
    record: ChangeRecord<'_, T>,
    done: &T,
) -> Result<()> {
    if let Some(record) = record {
        append_in(&mut tx, &[record(done)]).await?;
    }
    tx.commit().await?;
    Ok(())
}
