//! `enclave audit …`: verify the audit log's hash chain, read it (`tail`, `export`), prune it
//! to the configured retention, and erase a data subject's personal fields — on the database
//! the servers write.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use enclave_gateway::{parse_since, AuditEntry, AuditEvent, AuditKind, AuditQuery};
use enclave_server::admin::verification_json;
use serde_json::{json, Value};

use crate::access::runtime;
use crate::config::Settings;

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the whole chain; exits 1 naming the first record that does not verify.
    Verify(VerifyArgs),
    /// The newest records.
    Tail(TailArgs),
    /// Records since a time, one JSON object per line.
    Export(ExportArgs),
    /// Remove records older than the retention (`[audit]` in the configuration); the rest
    /// still verifies.
    Prune(JsonArg),
    /// Remove a data subject's personal fields (who, from where, text) from every record; the
    /// chain still verifies.
    Erase(EraseArgs),
}

#[derive(Args, Debug)]
pub struct JsonArg {
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    /// How many records.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub lines: u32,
    /// Only this tenant's.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Keep printing new records as they are written.
    #[arg(short, long)]
    pub follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum ExportFormat {
    Jsonl,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// From when: `2026-11-01`, `2026-11-01T08:00:00Z`, `7d`, `24h`, or Unix milliseconds.
    #[arg(long)]
    pub since: String,
    /// Only this tenant's.
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: ExportFormat,
}

#[derive(Args, Debug)]
pub struct EraseArgs {
    /// The data subject: `key:<id>`, `token:<sub>`, `cert:<subject>`, or the bare id.
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub json: bool,
}

/// Records read per query while exporting or following.
const PAGE: u32 = 1_000;

pub fn audit(settings: &Settings, command: AuditCommand) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let store = settings.store().await?;
        match command {
            AuditCommand::Verify(args) => {
                let report = store.verify_audit().await?;
                if args.json {
                    println!("{}", verification_json(&report));
                } else {
                    println!(
                        "{} records ({} pruned, {} erased); newest {} {}",
                        report.records,
                        report.pruned,
                        report.erased,
                        report.head_seq,
                        report.head_sha256
                    );
                }
                match &report.problem {
                    None => {
                        if !args.json {
                            println!("the audit chain verifies");
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                    Some(problem) => {
                        eprintln!("the audit chain is broken at {problem}");
                        Ok(ExitCode::FAILURE)
                    }
                }
            }
            AuditCommand::Tail(args) => {
                let entries = store
                    .audit_entries(&AuditQuery {
                        tenant: args.tenant.clone(),
                        limit: args.lines,
                        newest: true,
                        ..AuditQuery::default()
                    })
                    .await?;
                let mut last = entries.last().map(|e| e.seq);
                print_entries(&entries, args.json)?;
                if !args.follow {
                    return Ok(ExitCode::SUCCESS);
                }
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    let entries = store
                        .audit_entries(&AuditQuery {
                            tenant: args.tenant.clone(),
                            after_seq: last,
                            limit: PAGE,
                            ..AuditQuery::default()
                        })
                        .await?;
                    if let Some(entry) = entries.last() {
                        last = Some(entry.seq);
                    }
                    print_entries(&entries, args.json)?;
                }
            }
            AuditCommand::Export(args) => {
                let now = enclave_gateway::unix_millis();
                let since_ms = parse_since(&args.since, now).context("--since")?;
                let ExportFormat::Jsonl = args.format;
                let mut after = None;
                loop {
                    let entries = store
                        .audit_entries(&AuditQuery {
                            since_ms: Some(since_ms),
                            after_seq: after,
                            tenant: args.tenant.clone(),
                            limit: PAGE,
                            newest: false,
                        })
                        .await?;
                    print_entries(&entries, true)?;
                    match entries.last() {
                        Some(entry) if entries.len() == PAGE as usize => after = Some(entry.seq),
                        _ => break,
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            AuditCommand::Prune(args) => {
                let (days, admin_days) = settings.audit.retention()?;
                let now = enclave_gateway::unix_millis();
                // The pruning records itself (with the new anchor) in the chain.
                let report = store
                    .prune_audit(
                        now - i64::from(days) * 86_400_000,
                        now - i64::from(admin_days) * 86_400_000,
                        now,
                        &format!("cli:{}", os_user()),
                    )
                    .await?;
                let summary = json!({"pruned": report.pruned, "deleted": report.deleted,
                    "retention_days": days, "admin_retention_days": admin_days});
                if args.json {
                    println!("{summary}");
                } else {
                    eprintln!(
                        "pruned {} records older than {days} days ({admin_days} for admin actions); {} removed",
                        report.pruned, report.deleted
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            AuditCommand::Erase(args) => {
                // The erasure appends its own record (the records erased, the subject's
                // salted hash) in the same transaction.
                let erased = store
                    .erase_audit_subject(
                        &args.user,
                        enclave_gateway::unix_millis(),
                        &format!("cli:{}", os_user()),
                    )
                    .await?;
                if args.json {
                    println!("{}", json!({ "erased": erased }));
                } else {
                    eprintln!("erased the personal fields of {erased} records");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

fn print_entries(entries: &[AuditEntry], json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for entry in entries {
        if json {
            writeln!(out, "{}", entry.to_json())?;
        } else {
            writeln!(out, "{}", line(&entry.to_json()))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// One record on one line, for people.
fn line(entry: &Value) -> String {
    let text = |key: &str| entry[key].as_str().unwrap_or("-").to_string();
    let number = |key: &str| entry[key].as_i64().map_or("-".into(), |n| n.to_string());
    if entry["pruned"] == true {
        return format!(
            "{:>6}  {}  {:<8} (pruned)",
            number("seq"),
            text("time"),
            text("kind")
        );
    }
    format!(
        "{:>6}  {}  {:<8} {:<7} {:<24} {} {:<6} {:<22} {:<28} {:<16} tokens {}+{}  {} ms{}",
        number("seq"),
        text("time"),
        text("kind"),
        text("tenant"),
        text("subject"),
        text("source"),
        text("method"),
        text("route"),
        text("model"),
        number("status"),
        number("prompt_tokens"),
        number("completion_tokens"),
        number("latency_ms"),
        if entry["detail"].is_null() {
            String::new()
        } else {
            format!("  {}", entry["detail"])
        }
    )
}

/// The audit record of a change made from the command line (who: the OS user), made from
/// what the change did; the store writes it in the change's transaction.
pub fn cli_change<'a, T>(
    action: &'static str,
    detail: impl Fn(&T) -> Value + Send + Sync + 'a,
) -> Box<dyn Fn(&T) -> AuditEvent + Send + Sync + 'a> {
    let user = os_user();
    Box::new(move |done: &T| {
        let mut detail = detail(done);
        if let Some(object) = detail.as_object_mut() {
            object.insert("action".into(), json!(action));
        }
        AuditEvent {
            at_ms: enclave_gateway::unix_millis(),
            kind: AuditKind::Admin,
            request_id: String::new(),
            tenant: detail["tenant"].as_str().unwrap_or_default().to_string(),
            subject: format!("cli:{user}"),
            source: "local".into(),
            method: "CLI".into(),
            route: action.to_string(),
            model: String::new(),
            status: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: 0,
            detail: detail.to_string(),
            text: None,
        }
    })
}

/// Who runs this command, as the audit log names them (`cli:<user>`): the account of the
/// process's real user id, never `$USER`, which whoever runs the command sets at will.
pub fn os_user() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => format!("uid:{uid}"),
    }
}
