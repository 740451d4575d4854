//! `enclave.toml`: settings every subcommand shares, read from a file (`--config`), then
//! overridden by `ENCLAVE_…` environment variables (one per key, `auth.enabled` →
//! `ENCLAVE_AUTH_ENABLED`), then by flags. Unknown keys and ill-typed values are refused at
//! start, naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use enclave_gateway::{Roles, Store};
use serde::Deserialize;

/// Flags every subcommand takes.
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// Configuration file (TOML; see `enclave.example.toml`).
    #[arg(long, global = true, value_name = "FILE", env = "ENCLAVE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Where Enclave keeps its state (the SQLite database of keys and tenants); default
    /// `$XDG_DATA_HOME/enclave` or `~/.local/share/enclave`.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// The settings file's contents; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub data_dir: Option<PathBuf>,
    /// `postgres://…` to share state between replicas; default: SQLite in the data directory.
    pub database_url: Option<String>,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub tls: TlsFileSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    /// OIDC/JWT bearer tokens; off unless `issuer` is set.
    #[serde(default)]
    pub oidc: OidcFileSettings,
    /// Custom roles: `[roles.support] permissions = ["inference"]`.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleSettings>,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub redaction: RedactionSettings,
    #[serde(default)]
    pub abuse: AbuseSettings,
    #[serde(default)]
    pub connections: ConnectionSettings,
    #[serde(default)]
    pub scheduling: SchedulingSettings,
}

/// `[scheduling]`: how tenants share the engine when they compete for it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulingSettings {
    /// `[scheduling.tenants.acme] weight = 3, priority = 1`: a tenant's share of the running
    /// slots against others of its priority (weight, default 1), and its priority (higher is
    /// admitted first, default 0).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantShareSettings>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantShareSettings {
    pub weight: Option<u32>,
    pub priority: Option<i32>,
}

impl SchedulingSettings {
    pub fn tenant_shares(
        &self,
    ) -> Result<std::collections::HashMap<String, enclave_server::TenantShare>> {
        let default = enclave_server::TenantShare::default();
        self.tenants
            .iter()
            .map(|(name, share)| {
                let weight = share.weight.unwrap_or(default.weight);
                if weight == 0 || weight > 1000 {
                    anyhow::bail!(
                        "scheduling.tenants.{name}.weight must be 1 to 1000, got {weight}"
                    );
                }
                let priority = share.priority.unwrap_or(default.priority);
                Ok((
                    name.clone(),
                    enclave_server::TenantShare { weight, priority },
                ))
            })
            .collect()
    }
}

/// `[connections]`: what each listener allows its clients.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Connections open at once per listener (default 4096, and never more than the open-file
    /// limit allows).
    pub max_connections: Option<usize>,
    /// Connections open at once from one client address (default 512).
    pub max_connections_per_address: Option<usize>,
    /// TLS handshakes in progress at once (default 256).
    pub max_handshakes: Option<usize>,
    /// Seconds to wait for a request's headers, new or on a kept-alive connection (default 10).
    pub header_read_timeout_seconds: Option<u64>,
    /// Seconds a request body may take to arrive (default 60).
    pub body_read_timeout_seconds: Option<u64>,
    /// Seconds a write may wait for a client that stopped reading before its connection is
    /// closed and its stream's generations cancelled (default 30).
    pub send_timeout_seconds: Option<u64>,
}

impl ConnectionSettings {
    pub fn limits(&self) -> Result<enclave_server::ConnectionLimits> {
        let default = enclave_server::ConnectionLimits::default();
        let seconds = std::time::Duration::from_secs;
        let limits = enclave_server::ConnectionLimits {
            max_connections: self.max_connections.unwrap_or(default.max_connections),
            max_connections_per_address: self
                .max_connections_per_address
                .unwrap_or(default.max_connections_per_address),
            max_handshakes: self.max_handshakes.unwrap_or(default.max_handshakes),
            header_read_timeout: self
                .header_read_timeout_seconds
                .map_or(default.header_read_timeout, seconds),
            body_read_timeout: self
                .body_read_timeout_seconds
                .map_or(default.body_read_timeout, seconds),
            send_timeout: self
                .send_timeout_seconds
                .map_or(default.send_timeout, seconds),
        };
        if limits.max_connections == 0
            || limits.max_connections_per_address == 0
            || limits.max_handshakes == 0
            || limits.header_read_timeout.is_zero()
            || limits.body_read_timeout.is_zero()
            || limits.send_timeout.is_zero()
        {
            anyhow::bail!("every [connections] limit must be at least 1");
        }
        Ok(limits)
    }
}

/// `[abuse]`: repeated authentication failures from one address, or against one key, block it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbuseSettings {
    /// Failures within the window that trigger a block (default 10; 0 turns the rule off).
    pub max_failures: Option<u32>,
    /// The window, in seconds (default 60).
    pub window_seconds: Option<u64>,
    /// How long a block lasts, in seconds (default 300).
    pub block_seconds: Option<u64>,
}

impl AbuseSettings {
    pub fn limits(&self) -> Result<enclave_gateway::AbuseLimits> {
        let default = enclave_gateway::AbuseLimits::default();
        let limits = enclave_gateway::AbuseLimits {
            max_failures: self.max_failures.unwrap_or(default.max_failures),
            window: self
                .window_seconds
                .map_or(default.window, std::time::Duration::from_secs),
            block: self
                .block_seconds
                .map_or(default.block, std::time::Duration::from_secs),
        };
        if limits.max_failures > 0 && (limits.window.is_zero() || limits.block.is_zero()) {
            anyhow::bail!("abuse.window_seconds and abuse.block_seconds must be at least 1");
        }
        Ok(limits)
    }
}

/// `[redaction]`: what the sensitive-data detector looks for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionSettings {
    /// Built-in categories to detect (default: all).
    pub categories: Option<Vec<String>>,
    /// Patterns of your own: `[[redaction.custom]] name = "employee_id", pattern = "EMP-\\d{6}"`.
    #[serde(default)]
    pub custom: Vec<CustomPattern>,
    /// Every tenant's policy (`[redaction.policy]`), unless it has its own
    /// (`[redaction.tenants.acme]`, whose unset keys come from the former).
    #[serde(default)]
    pub policy: PolicySettings,
    #[serde(default)]
    pub tenants: BTreeMap<String, PolicySettings>,
}

/// One tenant's sensitive-data policy.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// `off`, `log_only`, `mask` or `block`.
    pub prompt: Option<String>,
    /// `off`, `log_only`, `mask` or `block`.
    pub completion: Option<String>,
    /// Keep the redacted prompt and completion in the audit log.
    pub store_text: Option<bool>,
    /// The categories this policy looks for (default: `[redaction] categories`, or all).
    pub categories: Option<Vec<String>>,
}

impl PolicySettings {
    fn resolve(
        &self,
        base: enclave_server::redaction::TenantPolicy,
        at: &str,
    ) -> Result<enclave_server::redaction::TenantPolicy> {
        use enclave_server::redaction::{CompletionAction, PromptAction, TenantPolicy};
        let prompt = match self.prompt.as_deref() {
            None => base.prompt,
            Some(name) => PromptAction::parse(name).with_context(|| {
                format!("{at}.prompt: `{name}` is not one of off, log_only, mask, block")
            })?,
        };
        let completion = match self.completion.as_deref() {
            None => base.completion,
            Some(name) => CompletionAction::parse(name).with_context(|| {
                format!("{at}.completion: `{name}` is not one of off, log_only, mask, block")
            })?,
        };
        Ok(TenantPolicy {
            prompt,
            completion,
            store_text: self.store_text.unwrap_or(base.store_text),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomPattern {
    pub name: String,
    pub pattern: String,
}

impl RedactionSettings {
    /// The policies, or `None` when every tenant's is off (nothing to check).
    pub fn policies(&self) -> Result<Option<enclave_server::redaction::RedactionPolicies>> {
        let default = self
            .policy
            .resolve(Default::default(), "redaction.policy")?;
        let mut tenants = std::collections::HashMap::new();
        let mut scoped = std::collections::HashMap::new();
        let default_categories = self.policy.categories.as_ref().or(self.categories.as_ref());
        for (name, settings) in &self.tenants {
            let at = format!("redaction.tenants.{name}");
            tenants.insert(name.clone(), settings.resolve(default, &at)?);
            if let Some(categories) = &settings.categories {
                scoped.insert(
                    name.clone(),
                    std::sync::Arc::new(self.detector(Some(categories), &at)?),
                );
            }
        }
        let off = enclave_server::redaction::TenantPolicy::default();
        if default == off && tenants.values().all(|p| *p == off) {
            return Ok(None);
        }
        Ok(Some(enclave_server::redaction::RedactionPolicies {
            redactor: std::sync::Arc::new(self.detector(default_categories, "redaction.policy")?),
            default,
            tenants,
            scoped,
        }))
    }

    /// A detector of `categories` (default: all) and the custom patterns; errors say `at`.
    pub fn detector(
        &self,
        categories: Option<&Vec<String>>,
        at: &str,
    ) -> Result<enclave_redact::Redactor> {
        let custom: Vec<(String, String)> = self
            .custom
            .iter()
            .map(|c| (c.name.clone(), c.pattern.clone()))
            .collect();
        enclave_redact::Redactor::new(categories.map(Vec::as_slice), &custom)
            .map_err(|e| anyhow::anyhow!("{at}: {e}"))
    }

    /// The detector these settings describe (`[redaction] categories`).
    pub fn redactor(&self) -> Result<enclave_redact::Redactor> {
        self.detector(self.categories.as_ref(), "redaction")
    }
}

/// `[audit]`: how long the audit log keeps records.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Days API calls and security events are kept (default 184: MLPS 2.0 (等保 2.0) asks for
    /// at least six months, and six calendar months can be 184 days).
    pub retention_days: Option<u32>,
    /// Days admin actions are kept (default 365).
    pub admin_retention_days: Option<u32>,
    /// Records the queue to the database holds (default 65536); each served request's place
    /// is reserved before it is served.
    pub queue_capacity: Option<usize>,
    /// With the queue full: `block` (default: requests wait for room) or `reject` (503 with
    /// `Retry-After`).
    pub on_backpressure: Option<String>,
    /// Seconds between the per-source summaries of requests refused before authentication
    /// (default 60).
    pub summary_interval_seconds: Option<u64>,
}

impl AuditSettings {
    pub fn queue(&self) -> Result<enclave_gateway::AuditQueueConfig> {
        let default = enclave_gateway::AuditQueueConfig::default();
        let on_backpressure = match self.on_backpressure.as_deref() {
            None => default.on_backpressure,
            Some(name) => enclave_gateway::Backpressure::parse(name).with_context(|| {
                format!("audit.on_backpressure is `block` or `reject`, not `{name}`")
            })?,
        };
        let config = enclave_gateway::AuditQueueConfig {
            capacity: self.queue_capacity.unwrap_or(default.capacity),
            on_backpressure,
            summary_interval: self
                .summary_interval_seconds
                .map_or(default.summary_interval, std::time::Duration::from_secs),
            ..default
        };
        if config.capacity == 0 || config.summary_interval.is_zero() {
            anyhow::bail!(
                "audit.queue_capacity and audit.summary_interval_seconds must be at least 1"
            );
        }
        Ok(config)
    }

    /// (API and security records, admin records), in days.
    pub fn retention(&self) -> Result<(u32, u32)> {
        let days = self.retention_days.unwrap_or(184);
        let admin_days = self.admin_retention_days.unwrap_or(365.max(days));
        if days == 0 || admin_days == 0 {
            anyhow::bail!("audit.retention_days and audit.admin_retention_days must be at least 1");
        }
        Ok((days, admin_days))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// `false` turns authentication off (loopback addresses only); default on.
    pub enabled: Option<bool>,
}

/// `[oidc]`: tokens from an identity provider.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFileSettings {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<PathBuf>,
    /// Claim naming the tenant (default `tenant`).
    pub tenant_claim: Option<String>,
    /// Claim with the role or roles (default `roles`).
    pub roles_claim: Option<String>,
    /// Seconds of clock skew tolerated (default 60).
    pub leeway_seconds: Option<u64>,
    /// Re-read the key set at least this often (default 600).
    pub refresh_seconds: Option<u64>,
}

impl OidcFileSettings {
    /// The verifier's settings, `None` when OIDC is not configured.
    pub fn settings(&self) -> Result<Option<enclave_gateway::OidcSettings>> {
        let Some(issuer) = &self.issuer else {
            if self.audience.is_some() || self.jwks_url.is_some() || self.jwks_file.is_some() {
                anyhow::bail!("oidc.issuer: required when any other `oidc` key is set");
            }
            return Ok(None);
        };
        let audience = self
            .audience
            .clone()
            .context("oidc.audience: required with oidc.issuer")?;
        let jwks = match (&self.jwks_url, &self.jwks_file) {
            (Some(url), None) => enclave_gateway::JwksSource::Url(url.clone()),
            (None, Some(path)) => enclave_gateway::JwksSource::File(path.clone()),
            _ => anyhow::bail!("oidc: set exactly one of oidc.jwks_url and oidc.jwks_file"),
        };
        Ok(Some(enclave_gateway::OidcSettings {
            issuer: issuer.clone(),
            audience,
            jwks,
            tenant_claim: self.tenant_claim.clone().unwrap_or_else(|| "tenant".into()),
            roles_claim: self.roles_claim.clone().unwrap_or_else(|| "roles".into()),
            leeway: self.leeway_seconds.unwrap_or(60),
            refresh: std::time::Duration::from_secs(self.refresh_seconds.unwrap_or(600)),
            min_refresh: enclave_gateway::MIN_REFRESH,
        }))
    }
}

/// `[admin]`: the management listener (tenants, keys, usage), off unless a port is given.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub host: Option<String>,
    pub port: Option<u16>,
    /// With a client CA: `required` or `optional` client certificates on this listener
    /// (default: as `tls.client_auth`).
    pub client_auth: Option<String>,
}

/// `[tls]`: the API listener's certificate, and client certificates (mTLS).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFileSettings {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// PEM certificate revocation lists for client certificates (read again on SIGHUP).
    pub client_crl: Option<PathBuf>,
    /// `required` (the default with a client CA) or `optional`.
    pub client_auth: Option<String>,
    /// Accept TLS 1.2 as well (ECDHE + AEAD suites only); default TLS 1.3 only.
    pub allow_tls12: Option<bool>,
    /// Client certificates bound to a tenant and role.
    #[serde(default)]
    pub client_identities: Vec<ClientIdentity>,
}

/// `[[tls.client_identities]]`: the certificates whose every named field matches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIdentity {
    /// As the certificate's subject reads, RFC 4514-escaped: `CN=app1, O=Acme`.
    pub subject: Option<String>,
    /// The issuing CA's subject, written the same way (default: any CA of `tls.client_ca`).
    pub issuer: Option<String>,
    /// SHA-256 fingerprint of the certificate (hex; colons and a `sha256:` prefix allowed).
    pub sha256: Option<String>,
    /// SHA-256 of the certificate's public key (SubjectPublicKeyInfo), as `sha256`.
    pub public_key_sha256: Option<String>,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub role: String,
    #[serde(default = "every_model")]
    pub models: Vec<String>,
}

/// A fingerprint as the gateway compares it: lowercase hex, without a `sha256:` prefix or the
/// colons `openssl x509 -fingerprint` prints.
fn fingerprint(text: &str) -> String {
    let text = text.trim();
    let text = text
        .strip_prefix("sha256:")
        .or_else(|| text.strip_prefix("SHA256:"))
        .unwrap_or(text);
    text.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn default_tenant() -> String {
    "default".into()
}

fn every_model() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSettings {
    pub permissions: Vec<String>,
}

/// Keys an environment variable may set: (key, variable).
const ENV_KEYS: &[(&str, &str)] = &[
    ("data_dir", "ENCLAVE_DATA_DIR"),
    ("database_url", "ENCLAVE_DATABASE_URL"),
    ("auth.enabled", "ENCLAVE_AUTH_ENABLED"),
    ("admin.host", "ENCLAVE_ADMIN_HOST"),
    ("admin.port", "ENCLAVE_ADMIN_PORT"),
    ("admin.client_auth", "ENCLAVE_ADMIN_CLIENT_AUTH"),
    ("oidc.issuer", "ENCLAVE_OIDC_ISSUER"),
    ("oidc.audience", "ENCLAVE_OIDC_AUDIENCE"),
    ("oidc.jwks_url", "ENCLAVE_OIDC_JWKS_URL"),
    ("oidc.jwks_file", "ENCLAVE_OIDC_JWKS_FILE"),
    ("tls.cert", "ENCLAVE_TLS_CERT"),
    ("tls.key", "ENCLAVE_TLS_KEY"),
    ("tls.client_ca", "ENCLAVE_TLS_CLIENT_CA"),
    ("tls.client_crl", "ENCLAVE_TLS_CLIENT_CRL"),
    ("tls.client_auth", "ENCLAVE_TLS_CLIENT_AUTH"),
    ("tls.allow_tls12", "ENCLAVE_TLS_ALLOW_TLS12"),
    ("audit.retention_days", "ENCLAVE_AUDIT_RETENTION_DAYS"),
    ("audit.on_backpressure", "ENCLAVE_AUDIT_ON_BACKPRESSURE"),
    ("abuse.max_failures", "ENCLAVE_ABUSE_MAX_FAILURES"),
    ("abuse.window_seconds", "ENCLAVE_ABUSE_WINDOW_SECONDS"),
    ("abuse.block_seconds", "ENCLAVE_ABUSE_BLOCK_SECONDS"),
    ("connections.max_connections", "ENCLAVE_MAX_CONNECTIONS"),
    (
        "connections.max_connections_per_address",
        "ENCLAVE_MAX_CONNECTIONS_PER_ADDRESS",
    ),
    (
        "audit.admin_retention_days",
        "ENCLAVE_AUDIT_ADMIN_RETENTION_DAYS",
    ),
];

impl Settings {
    /// The file (if any), the environment over it, the flags over both.
    pub fn load(global: &GlobalArgs) -> Result<Self> {
        let env: Vec<(&str, String)> = ENV_KEYS
            .iter()
            .filter_map(|(key, var)| std::env::var(var).ok().map(|v| (*key, v)))
            .collect();
        let mut settings = Self::from_sources(global.config.as_deref(), &env)?;
        if let Some(dir) = &global.data_dir {
            settings.data_dir = Some(dir.clone());
        }
        Ok(settings)
    }

    fn from_sources(file: Option<&Path>, env: &[(&str, String)]) -> Result<Self> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the configuration {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("{} is not valid TOML", path.display()))?
            }
            None => toml::Table::new(),
        };
        for (key, raw) in env {
            let var = ENV_KEYS.iter().find(|(k, _)| k == key).map_or("", |e| e.1);
            // `true`, `42` and quoted strings keep their TOML type; anything else is a string.
            let value = format!("v = {raw}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.clone()));
            let mut at = &mut table;
            let mut parts: Vec<&str> = key.split('.').collect();
            let leaf = parts.pop().unwrap_or(key);
            for part in parts {
                let entry = at
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                at = entry.as_table_mut().with_context(|| {
                    format!("{var}: `{part}` in the configuration is not a table")
                })?;
            }
            at.insert(leaf.to_string(), value);
        }
        let from = file.map_or_else(
            || "the environment".to_string(),
            |p| format!("{} (with the environment)", p.display()),
        );
        Self::deserialize(table).map_err(|e| anyhow::anyhow!("configuration in {from}: {e}"))
    }

    pub fn data_dir(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.data_dir {
            return Ok(dir.clone());
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .context("no data directory: set --data-dir (or ENCLAVE_DATA_DIR, or HOME)")?;
        Ok(base.join("enclave"))
    }

    /// The built-in roles and the configured ones.
    pub fn roles(&self) -> Result<Roles> {
        Roles::with_custom(
            self.roles
                .iter()
                .map(|(name, role)| (name.as_str(), role.permissions.as_slice())),
        )
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))
    }

    /// The certificate bindings of `[[tls.client_identities]]`.
    pub fn certificate_bindings(&self) -> Result<Vec<enclave_gateway::CertificateBinding>> {
        self.tls
            .client_identities
            .iter()
            .enumerate()
            .map(|(i, identity)| {
                let at = format!("tls.client_identities[{i}]");
                Ok(enclave_gateway::CertificateBinding {
                    subject: identity.subject.clone(),
                    issuer: identity.issuer.clone(),
                    sha256: identity.sha256.as_deref().map(fingerprint),
                    public_key_sha256: identity.public_key_sha256.as_deref().map(fingerprint),
                    tenant: identity.tenant.clone(),
                    role: identity.role.clone(),
                    models: enclave_gateway::ModelScope::new(&identity.models)
                        .map_err(|e| anyhow::anyhow!("{at}: {e}"))?,
                })
            })
            .collect()
    }

    pub fn auth_enabled(&self) -> bool {
        self.auth.enabled.unwrap_or(true)
    }

    /// Connects to the configured database (creating the data directory for SQLite).
    pub async fn store(&self) -> Result<Store> {
        let url = match &self.database_url {
            Some(url) => url.clone(),
            None => {
                let dir = self.data_dir()?;
                std::fs::create_dir_all(&dir).with_context(|| {
                    format!("cannot create the data directory {}", dir.display())
                })?;
                Store::sqlite_url(&dir)
            }
        };
        Store::connect(&url)
            .await
            .with_context(|| format!("cannot open the database {}", redact_url(&url)))
    }
}

/// A database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let f = file("data_dir = \"/srv/a\"\n[auth]\nenabled = true\n");
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        assert_eq!(s.data_dir.as_deref(), Some(Path::new("/srv/a")));
        assert!(s.auth_enabled());
        let env = [
            ("auth.enabled", "false".to_string()),
            ("database_url", "postgres://u:p@db/enclave".to_string()),
        ];
        let s = Settings::from_sources(Some(f.path()), &env).unwrap();
        assert!(!s.auth_enabled());
        assert_eq!(s.database_url.as_deref(), Some("postgres://u:p@db/enclave"));
        assert_eq!(s.data_dir.as_deref(), Some(Path::new("/srv/a")));
    }

    #[test]
    fn errors_name_the_key() {
        let f = file("[auth]\nenabeld = false\n");
        let e = Settings::from_sources(Some(f.path()), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("enabeld"), "{e:#}");
        let e = Settings::from_sources(None, &[("auth.enabled", "maybe".into())]).unwrap_err();
        assert!(format!("{e:#}").contains("enabled"), "{e:#}");
        let f = file("[roles.support]\npermissions = [\"inference\", \"launch\"]\n");
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        let e = s.roles().unwrap_err();
        assert!(format!("{e:#}").contains("launch"), "{e:#}");
        let f = file("data_dir = [");
        assert!(Settings::from_sources(Some(f.path()), &[]).is_err());
    }

    #[test]
    fn oidc_needs_an_issuer_an_audience_and_one_key_source() {
        let none = Settings::from_sources(None, &[]).unwrap();
        assert!(none.oidc.settings().unwrap().is_none());
        let env = |pairs: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
            pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
        };
        let good = env(&[
            ("oidc.issuer", "https://idp"),
            ("oidc.audience", "enclave"),
            ("oidc.jwks_url", "https://idp/jwks"),
        ]);
        let s = Settings::from_sources(None, &good).unwrap();
        assert_eq!(s.oidc.settings().unwrap().unwrap().tenant_claim, "tenant");
        for bad in [
            env(&[("oidc.audience", "enclave")]),
            env(&[
                ("oidc.issuer", "https://idp"),
                ("oidc.jwks_url", "https://idp/jwks"),
            ]),
            env(&[("oidc.issuer", "https://idp"), ("oidc.audience", "enclave")]),
        ] {
            let s = Settings::from_sources(None, &bad).unwrap();
            let e = s.oidc.settings().unwrap_err();
            assert!(format!("{e}").contains("oidc."), "{e}");
        }
    }

    #[test]
    fn the_example_file_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../enclave.example.toml");
        let s = Settings::from_sources(Some(&example), &[]).unwrap();
        assert!(s.auth_enabled());
        assert!(s.roles().unwrap().require("support").is_ok());
    }

    #[test]
    fn the_example_file_with_every_section_uncommented_is_valid() {
        // The commented-out sections are documentation: each must parse when switched on.
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../enclave.example.toml"),
        )
        .unwrap();
        let on: String = example
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                // The variable named at the end of a line is documentation too.
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => {
                    rest.split(" ENCLAVE_").next().unwrap_or(rest)
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let f = file(&on);
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        assert_eq!(s.audit.retention().unwrap(), (184, 365));
        assert_eq!(s.abuse.limits().unwrap().max_failures, 10);
        assert_eq!(
            s.connections.limits().unwrap(),
            enclave_server::ConnectionLimits::default()
        );
        assert_eq!(
            s.audit.queue().unwrap(),
            enclave_gateway::AuditQueueConfig::default()
        );
        assert_eq!(
            s.scheduling.tenant_shares().unwrap()["interactive"],
            enclave_server::TenantShare {
                weight: 3,
                priority: 1
            }
        );
        let policies = s.redaction.policies().unwrap().unwrap();
        let hospital = policies.policy("hospital");
        assert_eq!(
            (hospital.prompt, hospital.completion, hospital.store_text),
            (
                enclave_server::redaction::PromptAction::Block,
                enclave_server::redaction::CompletionAction::Mask,
                false
            )
        );
        assert_eq!(
            policies.policy("anyone").prompt,
            enclave_server::redaction::PromptAction::LogOnly
        );
    }

    #[test]
    fn fingerprints_read_as_openssl_prints_them() {
        let colons: Vec<String> = (0..32).map(|i| format!("{:02X}", i * 7)).collect();
        let f = file(&format!(
            "[[tls.client_identities]]\nsha256 = \"SHA256:{}\"\nrole = \"viewer\"\n",
            colons.join(":")
        ));
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        let bindings = s.certificate_bindings().unwrap();
        assert_eq!(
            bindings[0].sha256.as_deref(),
            Some(colons.concat().to_lowercase().as_str())
        );
        assert_eq!(bindings[0].subject, None);
    }

    #[test]
    fn a_tenant_weight_must_be_positive() {
        let f = file("[scheduling.tenants.acme]\nweight = 0\n");
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        let e = s.scheduling.tenant_shares().unwrap_err().to_string();
        assert!(e.contains("scheduling.tenants.acme.weight"), "{e}");
        let f = file("[scheduling.tenants.acme]\npriority = -2\n");
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        let shares = s.scheduling.tenant_shares().unwrap();
        assert_eq!(shares["acme"].weight, 1);
        assert_eq!(shares["acme"].priority, -2);
    }

    #[test]
    fn redaction_policies_name_a_bad_key() {
        let f = file("[redaction.tenants.acme]\nprompt = \"hide\"\n");
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        let e = s.redaction.policies().unwrap_err().to_string();
        assert!(
            e.contains("redaction.tenants.acme.prompt") && e.contains("hide"),
            "{e}"
        );
        let f = file("[redaction.policy]\ncompletion = \"hide\"\n");
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        assert!(s.redaction.policies().is_err());
        let f = file("[redaction.tenants.acme]\nprompt = \"mask\"\ncategories = [\"phone\"]\n");
        let s = Settings::from_sources(Some(f.path()), &[]).unwrap();
        let e = s.redaction.policies().unwrap_err().to_string();
        assert!(
            e.contains("redaction.tenants.acme") && e.contains("phone"),
            "{e}"
        );
        // Nothing configured: nothing to check.
        assert!(Settings::default().redaction.policies().unwrap().is_none());
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact_url("postgres://enclave:s3cret@db:5432/enclave"),
            "postgres://enclave:***@db:5432/enclave"
        );
        assert_eq!(
            redact_url("sqlite:///x/enclave.db?mode=rwc"),
            "sqlite:///x/enclave.db?mode=rwc"
        );
    }
}
