//! `enclave keys …`, `enclave tenants …` and `enclave roles …`: manage API keys, tenants and roles in the database the
//! servers read (a revocation reaches running servers within seconds). `--json` prints one JSON
//! object per command, for scripts.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use enclave_gateway::{unix_time, KeyInfo, Limits, NewKey, RoleOrigin};
use enclave_server::admin::{key_json, role_json, roles_json, tenant_json, usage_json};
use serde_json::{json, Value};

use crate::audit::cli_change;
use crate::config::Settings;

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an API key; the key is printed once and only its hash is kept.
    Create(KeysCreateArgs),
    /// List keys (never their secrets).
    List(KeysListArgs),
    /// Revoke a key by its id (running servers refuse it within seconds).
    Revoke(KeysRevokeArgs),
}

#[derive(Args, Debug)]
pub struct KeysCreateArgs {
    /// Tenant the key acts for (`default` exists from the start).
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Role: admin, operator, developer, analyst, auditor, viewer, or one from the
    /// configuration's `[roles]`.
    #[arg(long)]
    pub role: String,
    /// Model name patterns the key may use, within its tenant's (`deepseek-r1-*`); repeat or
    /// separate with commas.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub models: Vec<String>,
    /// A label for people (`ci-runner`).
    #[arg(long, default_value = "")]
    pub name: String,
    /// Lifetime: `90d`, `12h`, `30m` or seconds; default: until revoked.
    #[arg(long, value_name = "DURATION")]
    pub expires_in: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[arg(long)]
    pub json: bool,
}

/// Rate limits of a key or tenant (a tenant's apply to all its keys together); unlimited when
/// left out. Enforced by each server process on its own traffic.
#[derive(Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Requests per minute.
    #[arg(long, value_name = "N")]
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt and completion, charged as they are produced).
    #[arg(long, value_name = "N")]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            requests_per_minute: self.rpm,
            tokens_per_minute: self.tpm,
            concurrent_requests: self.max_concurrent,
        }
    }
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// Only this tenant's usage.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this key's usage (its id).
    #[arg(long)]
    pub key: Option<String>,
    /// Days back from today (UTC) to include.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KeysListArgs {
    /// Only this tenant's keys.
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KeysRevokeArgs {
    /// The key's id (as `keys list` shows it), or the whole key.
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum RolesCommand {
    /// List the roles keys may be given (built-in, from the configuration's `[roles]`, and
    /// created with `roles create`) with their permissions.
    List(RolesListArgs),
    /// Create a role in the database (running servers see it within 2 seconds).
    Create(RolesCreateArgs),
    /// Delete a role created with `roles create` (refused while an active key holds it).
    Delete(RolesDeleteArgs),
}

#[derive(Args, Debug)]
pub struct RolesListArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RolesCreateArgs {
    /// The role's name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Permissions it grants, comma-separated (`inference,models:read`); `enclave roles list`
    /// shows them all.
    #[arg(long, value_delimiter = ',', required = true)]
    pub permissions: Vec<String>,
    /// What the role is for.
    #[arg(long, default_value = "")]
    pub description: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RolesDeleteArgs {
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

pub fn roles(settings: &Settings, command: RolesCommand) -> Result<()> {
    let configured = settings.roles()?;
    runtime()?.block_on(async {
        let store = settings.store().await?;
        match command {
            RolesCommand::List(args) => {
                let listed = roles_json(&store.roles(&configured).await?);
                if args.json {
                    println!("{listed}");
                } else {
                    println!("{:<16}  {:<13}  PERMISSIONS", "ROLE", "DEFINED IN");
                    for role in listed["roles"].as_array().into_iter().flatten() {
                        let permissions: Vec<&str> = role["permissions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .collect();
                        println!(
                            "{:<16}  {:<13}  {}",
                            role["name"].as_str().unwrap_or_default(),
                            role["origin"].as_str().unwrap_or_default(),
                            permissions.join(", ")
                        );
                    }
                }
            }
            RolesCommand::Create(args) => {
                let describe = |permissions: &enclave_gateway::Permissions| {
                    role_json(
                        &args.name,
                        *permissions,
                        RoleOrigin::Stored,
                        &args.description,
                    )
                };
                let record = cli_change("role.create", describe);
                let permissions = store
                    .create_role_audited(
                        &args.name,
                        &args.permissions,
                        &args.description,
                        &configured,
                        unix_time(),
                        Some(record.as_ref()),
                    )
                    .await?;
                let created = describe(&permissions);
                if args.json {
                    println!("{created}");
                } else {
                    eprintln!("created role {}", args.name);
                }
            }
            RolesCommand::Delete(args) => {
                if let Some(origin) = configured.origin(&args.name) {
                    anyhow::bail!(
                        "`{}` is a {} role; only roles created with `enclave roles create` can be deleted",
                        args.name,
                        origin.name()
                    );
                }
                let record = cli_change("role.delete", |_: &()| json!({ "name": args.name }));
                store
                    .delete_role_audited(&args.name, unix_time(), Some(record.as_ref()))
                    .await?;
                if args.json {
                    println!("{}", json!({"name": args.name, "deleted": true}));
                } else {
                    eprintln!("deleted role {}", args.name);
                }
            }
        }
        Ok(())
    })
}

#[derive(Subcommand, Debug)]
pub enum TenantsCommand {
    /// Create a tenant with the models it may use.
    Create(TenantsCreateArgs),
    /// List tenants.
    List(TenantsListArgs),
}

#[derive(Args, Debug)]
pub struct TenantsCreateArgs {
    pub name: String,
    /// Model name patterns the tenant may use; repeat or separate with commas.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub models: Vec<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TenantsListArgs {
    #[arg(long)]
    pub json: bool,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn keys(settings: &Settings, command: KeysCommand) -> Result<()> {
    runtime()?.block_on(async {
        let store = settings.store().await?;
        match command {
            KeysCommand::Create(args) => {
                let roles = store.roles(&settings.roles()?).await?;
                let now = unix_time();
                let expires_at = args
                    .expires_in
                    .as_deref()
                    .map(|text| parse_duration(text).map(|seconds| now.saturating_add(seconds)))
                    .transpose()
                    .context("--expires-in")?;
                let record = cli_change("key.create", key_json);
                let created = store
                    .create_key_audited(
                        NewKey {
                            tenant: args.tenant,
                            role: args.role,
                            models: args.models,
                            name: args.name,
                            expires_at,
                            limits: args.limits.limits(),
                            created_by: format!("cli:{}", crate::audit::os_user()),
                        },
                        &roles,
                        now,
                        Some(record.as_ref()),
                    )
                    .await?;
                if args.json {
                    let mut object = key_json(&created.info);
                    object["key"] = json!(created.key);
                    println!("{object}");
                } else {
                    println!("{}", created.key);
                    eprintln!(
                        "created key {} (tenant {}, role {}); it is shown only now — store it safely",
                        created.info.id, created.info.tenant, created.info.role
                    );
                }
            }
            KeysCommand::List(args) => {
                let keys = store.keys(args.tenant.as_deref()).await?;
                if args.json {
                    println!("{}", json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()}));
                } else {
                    println!(
                        "{:<16}  {:<12}  {:<10}  {:<8}  {:<20}  NAME",
                        "ID", "TENANT", "ROLE", "STATE", "MODELS"
                    );
                    let now = unix_time();
                    for key in &keys {
                        println!(
                            "{:<16}  {:<12}  {:<10}  {:<8}  {:<20}  {}",
                            key.id,
                            key.tenant,
                            key.role,
                            key_state(key, now),
                            key.models.patterns().join(","),
                            key.name
                        );
                    }
                }
            }
            KeysCommand::Revoke(args) => {
                // The whole key is accepted too (`enc_<id>_<secret>`), so a leaked key can be
                // revoked as found.
                let id = args
                    .id
                    .strip_prefix(enclave_gateway::KEY_PREFIX)
                    .and_then(|rest| rest.split('_').next())
                    .unwrap_or(&args.id);
                let record = cli_change("key.revoke", key_json);
                let key = store
                    .revoke_key_audited(id, unix_time(), Some(record.as_ref()))
                    .await?;
                if args.json {
                    println!("{}", key_json(&key));
                } else {
                    eprintln!("revoked key {} (tenant {})", key.id, key.tenant);
                }
            }
        }
        Ok(())
    })
}

pub fn tenants(settings: &Settings, command: TenantsCommand) -> Result<()> {
    runtime()?.block_on(async {
        let store = settings.store().await?;
        match command {
            TenantsCommand::Create(args) => {
                let record = cli_change("tenant.create", tenant_json);
                let tenant = store
                    .create_tenant_audited(
                        &args.name,
                        &args.models,
                        args.limits.limits(),
                        unix_time(),
                        Some(record.as_ref()),
                    )
                    .await?;
                if args.json {
                    println!("{}", tenant_json(&tenant));
                } else {
                    eprintln!(
                        "created tenant {} (models {})",
                        tenant.name,
                        tenant.models.patterns().join(",")
                    );
                }
            }
            TenantsCommand::List(args) => {
                let tenants = store.tenants().await?;
                if args.json {
                    println!(
                        "{}",
                        json!({"tenants": tenants.iter().map(tenant_json).collect::<Vec<_>>()})
                    );
                } else {
                    println!("{:<24}  MODELS", "TENANT");
                    for tenant in &tenants {
                        println!(
                            "{:<24}  {}",
                            tenant.name,
                            tenant.models.patterns().join(",")
                        );
                    }
                }
            }
        }
        Ok(())
    })
}

pub fn usage(settings: &Settings, args: UsageArgs) -> Result<()> {
    runtime()?.block_on(async {
        let store = settings.store().await?;
        let since = unix_time() - i64::from(args.days) * 86_400;
        let rows = store
            .usage(args.tenant.as_deref(), args.key.as_deref(), since)
            .await?;
        if args.json {
            let rows: Vec<Value> = rows.iter().map(usage_json).collect();
            println!("{}", json!({ "usage": rows }));
        } else {
            println!(
                "{:<10}  {:<16}  {:<16}  {:>9}  {:>13}  {:>17}",
                "DAY", "TENANT", "KEY", "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS"
            );
            for r in &rows {
                println!(
                    "{:<10}  {:<16}  {:<16}  {:>9}  {:>13}  {:>17}",
                    day_text(r.day),
                    r.tenant,
                    r.key_id,
                    r.counts.requests,
                    r.counts.prompt_tokens,
                    r.counts.completion_tokens
                );
            }
        }
        Ok(())
    })
}

/// `YYYY-MM-DD` of a UTC day's start (civil-from-days, H. Hinnant).
fn day_text(day_start: i64) -> String {
    let z = day_start.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `90d`, `12h`, `30m`, `45s` or a number of seconds.
fn parse_duration(text: &str) -> Result<i64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => (&text[..at], c),
        _ => (text, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => anyhow::bail!("{text:?}: the unit must be s, m, h or d"),
    };
    let number: i64 = number
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("{text:?} is not a positive duration such as 90d"))?;
    number
        .checked_mul(scale)
        .with_context(|| format!("{text:?} is too long"))
}

fn key_state(key: &KeyInfo, now: i64) -> &'static str {
    if key.revoked_at.is_some() {
        "revoked"
    } else if key.expires_at.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_print_as_dates() {
        assert_eq!(day_text(0), "1970-01-01");
        assert_eq!(day_text(1_764_547_200), "2025-12-01");
        assert_eq!(day_text(951_782_400), "2000-02-29");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_duration("12h").unwrap(), 12 * 3600);
        assert_eq!(parse_duration("45").unwrap(), 45);
        for bad in ["", "0d", "-1h", "3w", "d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
