//! The tamper-evident audit log: one record per API call, admin action and security event,
//! appended to the database in batches by one writer task, each record chained to the one
//! before by SHA-256 so that changing, inserting, deleting or reordering records is detected
//! by [`Store::verify_audit`].
//!
//! What each hash covers (fields length-prefixed, so no two field lists hash alike):
//! - `personal = H(salt, subject, source, text)` — the erasable fields, with a random salt so
//!   that the hash left after erasure cannot be matched against guessed values;
//! - `content = H(request id, tenant, method, route, model, status, token counts, latency,
//!   detail, personal)`;
//! - `link = H(previous link, seq, time, kind, content)` — stored as the record's `sha256`.
//!
//! Erasure nulls the personal fields and the salt and keeps `personal`; pruning nulls all of
//! the content and keeps `content`; either way the links still verify, and the records'
//! sequence numbers, times and kinds stay covered. Fully pruned records at the start of the
//! log are deleted, and the chain's anchor (in `audit_chain`) moves to the last one deleted.
//!
//! Blanking is only legitimate when the log says so: every pruned record must be older than
//! the cutoff of a later `audit.prune` record, and every erased record must be listed by a
//! later `audit.erase` record (which also holds the subject's salted hash). Both are written
//! in the transaction that prunes or erases, and are themselves never pruned — only deleted
//! with the start of the log — so `verify` can hold every blanked record to one.
//! A writer with full database access can still rewrite the whole chain from some record on;
//! `verify` prints the newest hash so it can be kept elsewhere and compared later.

use std::fmt;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::error::{GatewayError, Result};
use crate::keys::to_hex;
use crate::store::{to_i64, Store};

/// Records verified per database round trip.
const VERIFY_PAGE: i64 = 5_000;
/// Most records one transaction appends.
const MAX_BATCH: usize = 2_048;
/// The routes of the records that pruning and erasure append (the chain's own maintenance):
/// never pruned, since they are what makes blanked records verifiable.
const PRUNE_ACTION: &str = "audit.prune";
const ERASE_ACTION: &str = "audit.erase";

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditKind {
    /// A call on the API listener.
    #[default]
    Api,
    /// A call on the admin listener, or an administrative command (`enclave keys …`).
    Admin,
    /// Something security-relevant that is no call: a source blocked after failed logins.
    Security,
}

impl AuditKind {
    pub fn name(self) -> &'static str {
        match self {
            AuditKind::Api => "api",
            AuditKind::Admin => "admin",
            AuditKind::Security => "security",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [AuditKind::Api, AuditKind::Admin, AuditKind::Security]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One event to append.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEvent {
    /// Unix milliseconds.
    pub at_ms: i64,
    pub kind: AuditKind,
    pub request_id: String,
    pub tenant: String,
    /// Who: `key:<id>`, `token:<sub>`, `cert:<subject>`, `anonymous` (personal).
    pub subject: String,
    /// The client's address (personal).
    pub source: String,
    pub method: String,
    /// The route as registered (`/v1/models/{*id}`), not the raw path.
    pub route: String,
    pub model: String,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: u64,
    /// JSON: for admin actions what changed; for security events what happened.
    pub detail: String,
    /// Prompt and completion text, only when a policy asks for it, and then redacted
    /// (personal).
    pub text: Option<String>,
}

/// A stored record. Personal fields are `None` once erased; every content field is `None`
/// once pruned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: i64,
    pub at_ms: i64,
    pub kind: String,
    pub request_id: Option<String>,
    pub tenant: Option<String>,
    pub subject: Option<String>,
    pub source: Option<String>,
    pub method: Option<String>,
    pub route: Option<String>,
    pub model: Option<String>,
    pub status: Option<i64>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub latency_ms: Option<i64>,
    pub detail: Option<String>,
    pub text: Option<String>,
    pub pruned: bool,
    pub erased: bool,
    pub sha256: String,
}

impl AuditEntry {
    /// The record as `enclave audit export` and the admin API show it (one JSON object).
    pub fn to_json(&self) -> Value {
        let detail = self
            .detail
            .as_deref()
            .filter(|d| !d.is_empty())
            .map(|d| serde_json::from_str(d).unwrap_or_else(|_| json!(d)));
        json!({
            "seq": self.seq,
            "time": rfc3339(self.at_ms),
            "at_ms": self.at_ms,
            "kind": self.kind,
            "request_id": self.request_id,
            "tenant": self.tenant,
            "subject": self.subject,
            "source": self.source,
            "method": self.method,
            "route": self.route,
            "model": self.model,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": self.latency_ms,
            "detail": detail,
            "text": self.text,
            "pruned": self.pruned,
            "erased": self.erased,
            "sha256": self.sha256,
        })
    }
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    /// The first record checked: the anchor's next, or a checkpoint's next.
    pub from_seq: i64,
    /// Records checked.
    pub records: u64,
    pub pruned: u64,
    pub erased: u64,
    /// The newest record's sequence number and hash, as the chain's head records them.
    pub head_seq: i64,
    pub head_sha256: String,
    /// The first record that does not verify, and why.
    pub problem: Option<AuditProblem>,
}

/// Where a clean verification ended, so the next may check only what came after: the record
/// and hash it reached, and the anchor it started from. A later verification from it checks
/// that the record still has that hash and the anchor has not moved (else it walks the whole
/// chain again); a change to a record before it is found only by a whole walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCheckpoint {
    pub seq: i64,
    pub sha256: String,
    anchor_seq: i64,
    anchor_sha256: String,
}

/// The first bad record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditProblem {
    pub seq: i64,
    pub reason: String,
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {}: {}", self.seq, self.reason)
    }
}

/// Which records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only records at or after this time (Unix milliseconds).
    pub since_ms: Option<i64>,
    /// Only records after this sequence number (for paging and following).
    pub after_seq: Option<i64>,
    /// Only this tenant's.
    pub tenant: Option<String>,
    /// At most this many, oldest first; with `newest`, the newest this many (still oldest
    /// first).
    pub limit: u32,
    pub newest: bool,
}

/// What `prune` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Records whose content was removed.
    pub pruned: u64,
    /// Fully pruned records removed from the start of the log.
    pub deleted: u64,
}

/// `at_ms` as RFC 3339 in UTC, with milliseconds.
pub fn rfc3339(at_ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A point in time as people write it, in Unix milliseconds: `2026-11-01` (UTC midnight),
/// `2026-11-01T08:00:00Z` (RFC 3339), `7d` / `24h` / `30m` (that long before `now_ms`), or
/// Unix milliseconds.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64> {
    let text = text.trim();
    let invalid = || {
        GatewayError::invalid(
            "since",
            format!(
                "`{}` is not a time: use 2026-11-01, 2026-11-01T08:00:00Z, 7d, 24h, 30m or Unix milliseconds",
                text.escape_debug()
            ),
        )
    };
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    for (suffix, unit_ms) in [("d", 86_400_000i64), ("h", 3_600_000), ("m", 60_000)] {
        if let Some(n) = text
            .strip_suffix(suffix)
            .and_then(|n| n.parse::<i64>().ok())
        {
            return n
                .checked_mul(unit_ms)
                .map(|ago| now_ms.saturating_sub(ago))
                .ok_or_else(invalid);
        }
    }
    if let Ok(at) =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| invalid());
    }
    let date = time::Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .map_err(|_| invalid())?;
    Ok(date.midnight().assume_utc().unix_timestamp() * 1000)
}

struct Hasher(Sha256);

impl Hasher {
    fn new(domain: &str) -> Self {
        let mut h = Self(Sha256::new());
        h.bytes(Some(domain.as_bytes()));
        h
    }

    fn bytes(&mut self, value: Option<&[u8]>) -> &mut Self {
        match value {
            Some(v) => {
                self.0.update((v.len() as u64).to_le_bytes());
                self.0.update(v);
            }
            None => self.0.update(u64::MAX.to_le_bytes()),
        }
        self
    }

    fn text(&mut self, value: Option<&str>) -> &mut Self {
        self.bytes(value.map(str::as_bytes))
    }

    fn int(&mut self, value: Option<i64>) -> &mut Self {
        self.bytes(value.map(|v| v.to_le_bytes()).as_ref().map(|b| &b[..]))
    }

    fn finish(self) -> String {
        to_hex(&self.0.finalize())
    }
}

fn personal_hash(
    salt: Option<&str>,
    subject: Option<&str>,
    source: Option<&str>,
    text: Option<&str>,
) -> String {
    let mut h = Hasher::new("enclave-audit-personal-v1");
    h.text(salt).text(subject).text(source).text(text);
    h.finish()
}

/// The hash an `audit.erase` record keeps of the subject it erased, with its `subject_salt`:
/// whoever knows the subject can show it was erased; the hash alone does not name it.
pub fn erased_subject_sha256(salt: &str, subject: &str) -> String {
    let mut h = Hasher::new("enclave-audit-erased-subject-v1");
    h.text(Some(salt)).text(Some(subject));
    h.finish()
}

fn content_hash(entry: &AuditEntry, personal: &str) -> String {
    let mut h = Hasher::new("enclave-audit-content-v1");
    h.text(entry.request_id.as_deref())
        .text(entry.tenant.as_deref())
        .text(entry.method.as_deref())
        .text(entry.route.as_deref())
        .text(entry.model.as_deref())
        .int(entry.status)
        .int(entry.prompt_tokens)
        .int(entry.completion_tokens)
        .int(entry.latency_ms)
        .text(entry.detail.as_deref())
        .text(Some(personal));
    h.finish()
}

fn link_hash(prev: &str, seq: i64, at_ms: i64, kind: &str, content: &str) -> String {
    let mut h = Hasher::new("enclave-audit-link-v1");
    h.text(Some(prev))
        .int(Some(seq))
        .int(Some(at_ms))
        .text(Some(kind))
        .text(Some(content));
    h.finish()
}

impl AuditEvent {
    fn entry(&self, seq: i64) -> AuditEntry {
        AuditEntry {
            seq,
            at_ms: self.at_ms,
            kind: self.kind.name().to_string(),
            request_id: Some(self.request_id.clone()),
            tenant: Some(self.tenant.clone()),
            subject: Some(self.subject.clone()),
            source: Some(self.source.clone()),
            method: Some(self.method.clone()),
            route: Some(self.route.clone()),
            model: Some(self.model.clone()),
            status: Some(i64::from(self.status)),
            prompt_tokens: Some(to_i64(self.prompt_tokens)),
            completion_tokens: Some(to_i64(self.completion_tokens)),
            latency_ms: Some(to_i64(self.latency_ms)),
            detail: Some(self.detail.clone()),
            text: self.text.clone(),
            pruned: false,
            erased: false,
            sha256: String::new(),
        }
    }
}

const ENTRY_COLUMNS: &str = "seq, at_ms, kind, request_id, tenant, method, route, model, status, \
     prompt_tokens, completion_tokens, latency_ms, detail, subject, source, text, salt, \
     personal_sha256, content_sha256, prev_sha256, sha256, pruned, erased";

/// A row with what verification needs beside the entry.
struct Row2 {
    entry: AuditEntry,
    salt: Option<String>,
    personal: Option<String>,
    content: String,
    prev: String,
}

fn row_from(row: &AnyRow) -> Result<Row2> {
    let pruned: i64 = row.try_get("pruned")?;
    let erased: i64 = row.try_get("erased")?;
    Ok(Row2 {
        entry: AuditEntry {
            seq: row.try_get("seq")?,
            at_ms: row.try_get("at_ms")?,
            kind: row.try_get("kind")?,
            request_id: row.try_get("request_id")?,
            tenant: row.try_get("tenant")?,
            subject: row.try_get("subject")?,
            source: row.try_get("source")?,
            method: row.try_get("method")?,
            route: row.try_get("route")?,
            model: row.try_get("model")?,
            status: row.try_get("status")?,
            prompt_tokens: row.try_get("prompt_tokens")?,
            completion_tokens: row.try_get("completion_tokens")?,
            latency_ms: row.try_get("latency_ms")?,
            detail: row.try_get("detail")?,
            text: row.try_get("text")?,
            pruned: pruned != 0,
            erased: erased != 0,
            sha256: row.try_get("sha256")?,
        },
        salt: row.try_get("salt")?,
        personal: row.try_get("personal_sha256")?,
        content: row.try_get("content_sha256")?,
        prev: row.try_get("prev_sha256")?,
    })
}

/// Why `row` does not verify as the successor of (`expected_seq - 1`, `prev`); `None` if it
/// does.
fn check(row: &Row2, expected_seq: i64, prev: &str) -> Option<String> {
    let e = &row.entry;
    if e.seq != expected_seq {
        return Some(if e.seq > expected_seq {
            format!(
                "records {expected_seq}..{} are missing (deleted), or this one was renumbered",
                e.seq - 1
            )
        } else {
            format!("out of order: expected record {expected_seq}")
        });
    }
    if row.prev != prev {
        return Some("does not follow the record before it (its previous hash differs)".into());
    }
    if AuditKind::parse(&e.kind).is_none() {
        return Some(format!("unknown kind `{}`", e.kind));
    }
    let content = if e.pruned {
        let holds_content = e.request_id.is_some()
            || e.tenant.is_some()
            || e.method.is_some()
            || e.route.is_some()
            || e.model.is_some()
            || e.status.is_some()
            || e.prompt_tokens.is_some()
            || e.completion_tokens.is_some()
            || e.latency_ms.is_some()
            || e.detail.is_some()
            || e.subject.is_some()
            || e.source.is_some()
            || e.text.is_some()
            || row.salt.is_some()
            || row.personal.is_some();
        if holds_content {
            return Some(
                "marked pruned but still holds content (its fields cannot be verified)".into(),
            );
        }
        row.content.clone()
    } else {
        let personal = if e.erased {
            if e.subject.is_some() || e.source.is_some() || e.text.is_some() || row.salt.is_some() {
                return Some("marked erased but still holds personal fields".into());
            }
            row.personal.clone().unwrap_or_default()
        } else {
            let computed = personal_hash(
                row.salt.as_deref(),
                e.subject.as_deref(),
                e.source.as_deref(),
                e.text.as_deref(),
            );
            if row.personal.as_deref() != Some(computed.as_str()) {
                return Some("its subject, source or text was changed".into());
            }
            computed
        };
        let computed = content_hash(e, &personal);
        if computed != row.content {
            return Some("its content was changed".into());
        }
        computed
    };
    if link_hash(prev, e.seq, e.at_ms, &e.kind, &content) != e.sha256 {
        return Some("its hash does not match (its time, kind or hash was changed)".into());
    }
    None
}

pub(crate) type Transaction<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// Takes the write lock before the head is read (SQLite: the database's; PostgreSQL: the head
/// row's), so two writers cannot both continue from the same record.
pub(crate) async fn lock_chain(tx: &mut Transaction<'_>) -> Result<()> {
    sqlx::query("UPDATE audit_chain SET last_seq = last_seq WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Appends `events` after the chain's head, inside `tx` (which holds [`lock_chain`]).
pub(crate) async fn append_in(tx: &mut Transaction<'_>, events: &[AuditEvent]) -> Result<()> {
    let head = sqlx::query("SELECT last_seq, last_sha256 FROM audit_chain WHERE id = 1")
        .fetch_one(&mut **tx)
        .await?;
    let mut seq: i64 = head.try_get("last_seq")?;
    let mut prev: String = head.try_get("last_sha256")?;
    for event in events {
        seq += 1;
        let salt = to_hex(&rand::random::<[u8; 16]>());
        let entry = event.entry(seq);
        let personal = personal_hash(
            Some(&salt),
            entry.subject.as_deref(),
            entry.source.as_deref(),
            entry.text.as_deref(),
        );
        let content = content_hash(&entry, &personal);
        let link = link_hash(&prev, seq, entry.at_ms, &entry.kind, &content);
        sqlx::query(&format!(
            "INSERT INTO audit_log ({ENTRY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
             $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, 0, 0)"
        ))
        .bind(seq)
        .bind(entry.at_ms)
        .bind(&entry.kind)
        .bind(&entry.request_id)
        .bind(&entry.tenant)
        .bind(&entry.method)
        .bind(&entry.route)
        .bind(&entry.model)
        .bind(entry.status)
        .bind(entry.prompt_tokens)
        .bind(entry.completion_tokens)
        .bind(entry.latency_ms)
        .bind(&entry.detail)
        .bind(&entry.subject)
        .bind(&entry.source)
        .bind(&entry.text)
        .bind(&salt)
        .bind(&personal)
        .bind(&content)
        .bind(&prev)
        .bind(&link)
        .execute(&mut **tx)
        .await?;
        prev = link;
    }
    sqlx::query("UPDATE audit_chain SET last_seq = $1, last_sha256 = $2 WHERE id = 1")
        .bind(seq)
        .bind(&prev)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What a maintenance record (`audit.prune`, `audit.erase`) states about the records before it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    /// Content older than these cutoffs was removed; the log now starts after the anchor.
    Prune {
        anchor_seq: i64,
        anchor_sha256: String,
        before_ms: i64,
        admin_before_ms: i64,
    },
    /// These records' personal fields were removed (inclusive ranges of sequence numbers).
    Erase { ranges: Vec<(i64, i64)> },
}

/// The claim `entry` makes, if it is a maintenance record; `Err` when it is one whose detail
/// does not say what it must.
fn claim(entry: &AuditEntry) -> std::result::Result<Option<Claim>, String> {
    let action = match entry.route.as_deref() {
        Some(route @ (PRUNE_ACTION | ERASE_ACTION)) if entry.kind == "admin" => route,
        _ => return Ok(None),
    };
    let detail: Value = entry
        .detail
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(Value::Null);
    let int = |key: &str| {
        detail[key]
            .as_i64()
            .ok_or_else(|| format!("its `{action}` detail has no `{key}`"))
    };
    if action == PRUNE_ACTION {
        let claim = Claim::Prune {
            anchor_seq: int("anchor_seq")?,
            anchor_sha256: detail["anchor_sha256"]
                .as_str()
                .ok_or("its `audit.prune` detail has no `anchor_sha256`")?
                .to_string(),
            before_ms: int("before_ms")?,
            admin_before_ms: int("admin_before_ms")?,
        };
        if let Claim::Prune {
            before_ms,
            admin_before_ms,
            ..
        } = claim
        {
            if before_ms.max(admin_before_ms) > entry.at_ms {
                return Err("its `audit.prune` cutoff is later than the pruning itself".into());
            }
        }
        return Ok(Some(claim));
    }
    let ranges = detail["seqs"]
        .as_array()
        .ok_or("its `audit.erase` detail has no `seqs`")?
        .iter()
        .map(|range| match range.as_array().map(Vec::as_slice) {
            Some([lo, hi]) => match (lo.as_i64(), hi.as_i64()) {
                (Some(lo), Some(hi)) if lo <= hi && hi < entry.seq => Ok((lo, hi)),
                _ => Err(()),
            },
            _ => Err(()),
        })
        .collect::<std::result::Result<Vec<_>, ()>>()
        .map_err(|()| "its `audit.erase` ranges are not ranges of earlier records".to_string())?;
    Ok(Some(Claim::Erase { ranges }))
}

/// Blanked records seen so far that no later maintenance record has accounted for yet.
#[derive(Default)]
struct Blanked {
    /// Per class (API and security records, admin records): the newest time among the pruned
    /// records not yet covered, and that record's sequence number. A later pruning whose
    /// cutoff passes that time covers every one of them (each is older); one that does not
    /// covers none that a still later pruning would not.
    pruned: [Option<(i64, i64)>; 2],
    /// Erased records not yet listed by a later erasure.
    erased: std::collections::BTreeSet<i64>,
}

impl Blanked {
    fn see(&mut self, entry: &AuditEntry) {
        if entry.pruned {
            let class = &mut self.pruned[usize::from(entry.kind == "admin")];
            if class.is_none_or(|(at, _)| entry.at_ms >= at) {
                *class = Some((entry.at_ms, entry.seq));
            }
        } else if entry.erased {
            self.erased.insert(entry.seq);
        }
    }

    fn account(&mut self, claim: &Claim) {
        match claim {
            Claim::Prune {
                before_ms,
                admin_before_ms,
                ..
            } => {
                for (class, cutoff) in self.pruned.iter_mut().zip([before_ms, admin_before_ms]) {
                    if class.is_some_and(|(at, _)| at < *cutoff) {
                        *class = None;
                    }
                }
            }
            Claim::Erase { ranges } => {
                for &(lo, hi) in ranges {
                    let listed: Vec<i64> = self.erased.range(lo..=hi).copied().collect();
                    for seq in listed {
                        self.erased.remove(&seq);
                    }
                }
            }
        }
    }

    /// The first blanked record left unaccounted for, and why.
    fn unaccounted(&self) -> Option<AuditProblem> {
        let pruned = self.pruned.iter().flatten().map(|&(_, seq)| AuditProblem {
            seq,
            reason: "marked pruned, but no later `audit.prune` record's cutoff covers its time \
                     (its content was blanked)"
                .into(),
        });
        let erased = self.erased.first().map(|&seq| AuditProblem {
            seq,
            reason: "marked erased, but no later `audit.erase` record lists it (its subject, \
                     source or text was blanked)"
                .into(),
        });
        pruned.chain(erased).min_by_key(|p| p.seq)
    }
}

/// Sequence numbers as inclusive ranges of consecutive ones (`seqs` ascending).
fn ranges_of(seqs: &[i64]) -> Vec<(i64, i64)> {
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for &seq in seqs {
        match ranges.last_mut() {
            Some((_, hi)) if *hi + 1 == seq => *hi = seq,
            _ => ranges.push((seq, seq)),
        }
    }
    ranges
}

impl Store {
    /// Appends `events` in one transaction, continuing the chain from its head. Writers on
    /// other connections or replicas queue on the head row's lock, so the chain stays one line.
    pub async fn append_audit(&self, events: &[AuditEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool().begin().await?;
        lock_chain(&mut tx).await?;
        append_in(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Walks the whole chain from its anchor to its head and reports the first record that
    /// does not verify.
    pub async fn verify_audit(&self) -> Result<AuditVerification> {
        Ok(self.verify_audit_since(None).await?.0)
    }

    /// [`Self::verify_audit`] from `checkpoint` (a clean verification's end) when it still
    /// holds, else from the anchor; with the checkpoint for the next, when this one is clean.
    pub async fn verify_audit_since(
        &self,
        checkpoint: Option<&AuditCheckpoint>,
    ) -> Result<(AuditVerification, Option<AuditCheckpoint>)> {
        let chain = sqlx::query(
            "SELECT last_seq, last_sha256, anchor_seq, anchor_sha256 FROM audit_chain WHERE id = 1",
        )
        .fetch_one(self.pool())
        .await?;
        let head_seq: i64 = chain.try_get("last_seq")?;
        let head_sha256: String = chain.try_get("last_sha256")?;
        let anchor_seq: i64 = chain.try_get("anchor_seq")?;
        let anchor_sha256: String = chain.try_get("anchor_sha256")?;
        // A checkpoint from the same anchor, not past the head.
        let checkpoint = checkpoint.filter(|c| {
            c.anchor_seq == anchor_seq && c.anchor_sha256 == anchor_sha256 && c.seq <= head_seq
        });
        let (mut expected_seq, mut prev) = match checkpoint {
            Some(c) => (c.seq + 1, c.sha256.clone()),
            None => (anchor_seq + 1, anchor_sha256.clone()),
        };
        let mut anchor_claim: Option<(i64, String)> = None;
        let mut blanked = Blanked::default();
        let mut report = AuditVerification {
            from_seq: expected_seq,
            records: 0,
            pruned: 0,
            erased: 0,
            head_seq,
            head_sha256: head_sha256.clone(),
            problem: None,
        };
        if let Some(c) = checkpoint.filter(|c| c.seq > anchor_seq) {
            let kept: Option<String> = sqlx::query("SELECT sha256 FROM audit_log WHERE seq = $1")
                .bind(c.seq)
                .fetch_optional(self.pool())
                .await?
                .map(|row| row.try_get("sha256"))
                .transpose()?;
            if kept.as_deref() != Some(c.sha256.as_str()) {
                report.problem = Some(AuditProblem {
                    seq: c.seq,
                    reason: "it no longer has the hash it was verified with (changed or deleted \
                             since the last verification)"
                        .into(),
                });
                return Ok((report, None));
            }
        }
        // Rows before the anchor should not exist: pruning deleted them.
        let before: i64 = sqlx::query("SELECT COUNT(*) AS n FROM audit_log WHERE seq <= $1")
            .bind(anchor_seq)
            .fetch_one(self.pool())
            .await?
            .try_get("n")?;
        if before > 0 {
            report.problem = Some(AuditProblem {
                seq: anchor_seq,
                reason: format!("{before} record(s) before the chain's anchor were inserted"),
            });
            return Ok((report, None));
        }
        loop {
            let rows = sqlx::query(&format!(
                "SELECT {ENTRY_COLUMNS} FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT $2"
            ))
            .bind(expected_seq)
            .bind(VERIFY_PAGE)
            .fetch_all(self.pool())
            .await?;
            let page = rows.len();
            for row in &rows {
                let row = row_from(row)?;
                let checked = match check(&row, expected_seq, &prev) {
                    Some(reason) => Err(reason),
                    None if row.entry.pruned => Ok(None),
                    None => claim(&row.entry),
                };
                let claimed = match checked {
                    Ok(claimed) => claimed,
                    Err(reason) => {
                        report.problem = Some(AuditProblem {
                            seq: row.entry.seq,
                            reason,
                        });
                        return Ok((report, None));
                    }
                };
                blanked.see(&row.entry);
                if let Some(claimed) = claimed {
                    blanked.account(&claimed);
                    if let Claim::Prune {
                        anchor_seq,
                        anchor_sha256,
                        ..
                    } = claimed
                    {
                        anchor_claim = Some((anchor_seq, anchor_sha256));
                    }
                }
                report.records += 1;
                report.pruned += u64::from(row.entry.pruned);
                report.erased += u64::from(row.entry.erased);
                expected_seq += 1;
                prev = row.entry.sha256;
            }
            if (page as i64) < VERIFY_PAGE {
                break;
            }
        }
        // The anchor only moves by pruning, which records where it put it (a checkpoint from
        // the same anchor was checked for that when it was made).
        if checkpoint.is_none()
            && anchor_seq > 0
            && anchor_claim.as_ref() != Some(&(anchor_seq, anchor_sha256.clone()))
        {
            report.problem = Some(AuditProblem {
                seq: anchor_seq + 1,
                reason: format!(
                    "the log starts after record {anchor_seq}, but no pruning recorded that: records before it were deleted"
                ),
            });
            return Ok((report, None));
        }
        if let Some(problem) = blanked.unaccounted() {
            report.problem = Some(problem);
            return Ok((report, None));
        }
        if expected_seq - 1 != head_seq || prev != head_sha256 {
            report.problem = Some(AuditProblem {
                seq: expected_seq,
                reason: if expected_seq - 1 < head_seq {
                    format!(
                        "records {expected_seq}..{head_seq} are missing (the newest were deleted)"
                    )
                } else {
                    "the chain's recorded head does not match its newest record".into()
                },
            });
            return Ok((report, None));
        }
        let reached = AuditCheckpoint {
            seq: expected_seq - 1,
            sha256: prev,
            anchor_seq,
            anchor_sha256,
        };
        Ok((report, Some(reached)))
    }

    /// Records as `query` asks, oldest first.
    pub async fn audit_entries(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>> {
        let order = if query.newest { "DESC" } else { "ASC" };
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM audit_log WHERE at_ms >= $1 AND seq > $2 \
             AND ($3 = '' OR tenant = $3) ORDER BY seq {order} LIMIT $4"
        ))
        .bind(query.since_ms.unwrap_or(i64::MIN))
        .bind(query.after_seq.unwrap_or(i64::MIN))
        .bind(query.tenant.as_deref().unwrap_or(""))
        .bind(i64::from(query.limit))
        .fetch_all(self.pool())
        .await?;
        let mut entries = rows
            .iter()
            .map(|r| row_from(r).map(|r| r.entry))
            .collect::<Result<Vec<_>>>()?;
        if query.newest {
            entries.reverse();
        }
        Ok(entries)
    }

    /// Removes the content of API and security records older than `before_ms` and of admin
    /// records older than `admin_before_ms`, then deletes the fully pruned records at the
    /// start of the log, moving the chain's anchor past them.
    /// The pruning itself is appended as an admin record stating the new anchor, so `verify`
    /// can tell pruning from deletion.
    pub async fn prune_audit(
        &self,
        before_ms: i64,
        admin_before_ms: i64,
        now_ms: i64,
        by: &str,
    ) -> Result<PruneReport> {
        // The pruning's record states its cutoffs, and `verify` holds every pruned record to
        // one: a cutoff in the future would let it vouch for records not yet old.
        if before_ms.max(admin_before_ms) > now_ms {
            return Err(GatewayError::invalid(
                "retention",
                "the pruning cutoff is in the future",
            ));
        }
        let mut tx = self.pool().begin().await?;
        lock_chain(&mut tx).await?;
        // Maintenance records keep their content: they account for the blanked records.
        let pruned = sqlx::query(
            "UPDATE audit_log SET request_id = NULL, tenant = NULL, method = NULL, route = NULL, \
             model = NULL, status = NULL, prompt_tokens = NULL, completion_tokens = NULL, \
             latency_ms = NULL, detail = NULL, subject = NULL, source = NULL, text = NULL, \
             salt = NULL, personal_sha256 = NULL, pruned = 1 \
             WHERE pruned = 0 AND ((kind <> 'admin' AND at_ms < $1) OR (kind = 'admin' AND at_ms < $2 \
             AND COALESCE(route, '') NOT IN ($3, $4)))",
        )
        .bind(before_ms)
        .bind(admin_before_ms)
        .bind(PRUNE_ACTION)
        .bind(ERASE_ACTION)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // The leading run of pruned records (and of maintenance records past the admin
        // retention, which only ever vouch for records before them): everything before the
        // oldest kept one.
        let kept: Option<i64> = sqlx::query(
            "SELECT MIN(seq) AS seq FROM audit_log WHERE pruned = 0 AND NOT (kind = 'admin' \
             AND at_ms < $1 AND COALESCE(route, '') IN ($2, $3))",
        )
        .bind(admin_before_ms)
        .bind(PRUNE_ACTION)
        .bind(ERASE_ACTION)
        .fetch_one(&mut *tx)
        .await?
        .try_get("seq")?;
        let last: Option<i64> = sqlx::query("SELECT MAX(seq) AS seq FROM audit_log")
            .fetch_one(&mut *tx)
            .await?
            .try_get("seq")?;
        let cut = match (kept, last) {
            (Some(kept), _) => kept - 1,
            (None, Some(last)) => last,
            (None, None) => 0,
        };
        let mut deleted = 0;
        let anchor = sqlx::query("SELECT sha256 FROM audit_log WHERE seq = $1")
            .bind(cut)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(anchor) = anchor {
            let anchor: String = anchor.try_get("sha256")?;
            deleted = sqlx::query("DELETE FROM audit_log WHERE seq <= $1")
                .bind(cut)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("UPDATE audit_chain SET anchor_seq = $1, anchor_sha256 = $2 WHERE id = 1")
                .bind(cut)
                .bind(&anchor)
                .execute(&mut *tx)
                .await?;
        }
        if pruned > 0 || deleted > 0 {
            let chain =
                sqlx::query("SELECT anchor_seq, anchor_sha256 FROM audit_chain WHERE id = 1")
                    .fetch_one(&mut *tx)
                    .await?;
            let anchor_seq: i64 = chain.try_get("anchor_seq")?;
            let anchor_sha256: String = chain.try_get("anchor_sha256")?;
            let detail = json!({
                "action": "audit.prune",
                "anchor_seq": anchor_seq,
                "anchor_sha256": anchor_sha256,
                "pruned": pruned,
                "deleted": deleted,
                "before_ms": before_ms,
                "admin_before_ms": admin_before_ms,
            });
            let event = AuditEvent {
                at_ms: now_ms,
                kind: AuditKind::Admin,
                subject: by.to_string(),
                route: PRUNE_ACTION.into(),
                detail: detail.to_string(),
                ..AuditEvent::default()
            };
            append_in(&mut tx, &[event]).await?;
        }
        tx.commit().await?;
        Ok(PruneReport { pruned, deleted })
    }

    /// Erases the personal fields (subject, source, text) of every record of `subject`
    /// (`key:…`, `token:…`, `cert:…`, or the bare id, which matches any of them) and, in the
    /// same transaction, appends an `audit.erase` record by `by` listing the records erased and
    /// the subject's salted hash (so the erasure can be shown for that subject later, and
    /// `verify` can tell it from blanking). Returns how many records were erased.
    pub async fn erase_audit_subject(&self, subject: &str, now_ms: i64, by: &str) -> Result<u64> {
        if subject.is_empty() {
            return Err(GatewayError::invalid("user", "name the subject to erase"));
        }
        let forms = [
            subject.to_string(),
            format!("key:{subject}"),
            format!("token:{subject}"),
            format!("cert:{subject}"),
        ];
        let mut tx = self.pool().begin().await?;
        lock_chain(&mut tx).await?;
        let mut seqs = Vec::new();
        for row in sqlx::query(
            "SELECT seq FROM audit_log WHERE pruned = 0 AND subject IN ($1, $2, $3, $4) ORDER BY seq",
        )
        .bind(&forms[0])
        .bind(&forms[1])
        .bind(&forms[2])
        .bind(&forms[3])
        .fetch_all(&mut *tx)
        .await?
        {
            seqs.push(row.try_get::<i64, _>("seq")?);
        }
        let erased = sqlx::query(
            "UPDATE audit_log SET subject = NULL, source = NULL, text = NULL, salt = NULL, \
             erased = 1 WHERE pruned = 0 AND subject IN ($1, $2, $3, $4)",
        )
        .bind(&forms[0])
        .bind(&forms[1])
        .bind(&forms[2])
        .bind(&forms[3])
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let salt = to_hex(&rand::random::<[u8; 16]>());
        let detail = json!({
            "action": ERASE_ACTION,
            "records": erased,
            "seqs": ranges_of(&seqs).iter().map(|(lo, hi)| json!([lo, hi])).collect::<Vec<_>>(),
            "subject_salt": salt,
            "subject_sha256": erased_subject_sha256(&salt, subject),
        });
        let event = AuditEvent {
            at_ms: now_ms,
            kind: AuditKind::Admin,
            subject: by.to_string(),
            route: ERASE_ACTION.into(),
            detail: detail.to_string(),
            ..AuditEvent::default()
        };
        append_in(&mut tx, &[event]).await?;
        tx.commit().await?;
        Ok(erased)
    }
}

enum Command {
    Record(Box<AuditEvent>),
    Flush(oneshot::Sender<()>),
}

/// What the server does with an authenticated request when the audit queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backpressure {
    /// Wait for room before serving it (requests slow down to the database's pace).
    #[default]
    Block,
    /// Refuse it (the server answers 503 with `Retry-After`), so no request is served
    /// without its record and none waits.
    Reject,
}

impl Backpressure {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "block" => Some(Self::Block),
            "reject" => Some(Self::Reject),
            _ => None,
        }
    }
}

/// How the audit log's queue behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditQueueConfig {
    /// Records queued for the writer at most; a record's place is reserved before its
    /// request is served.
    pub capacity: usize,
    pub on_backpressure: Backpressure,
    /// How often refusals before authentication are written as per-source summaries.
    pub summary_interval: Duration,
    /// Sources summarised separately at most between two summaries; the rest are counted
    /// together under source `*`.
    pub max_summary_sources: usize,
}

impl Default for AuditQueueConfig {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            on_backpressure: Backpressure::Block,
            summary_interval: Duration::from_secs(60),
            max_summary_sources: 4_096,
        }
    }
}

/// The queue's state, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditQueueStats {
    /// Records (and reservations) waiting for the writer now.
    pub depth: u64,
    pub capacity: u64,
    /// Records lost because the writer had stopped (the process ending under a database
    /// that never came back); never for want of room.
    pub dropped: u64,
    /// Authenticated requests refused because the queue was full (`reject`).
    pub rejected: u64,
    /// Refusals before authentication folded into summaries.
    pub summarised: u64,
}

/// Refusals before authentication from one source since the last summary.
#[derive(Debug, Default)]
struct RefusedFrom {
    count: u64,
    first_ms: i64,
    last_ms: i64,
    /// By route and status, at most [`SUMMARY_ROUTES`] distinct (the rest under `other`).
    routes: std::collections::BTreeMap<String, u64>,
}

/// Distinct route-and-status keys one summary lists.
const SUMMARY_ROUTES: usize = 16;

#[derive(Debug, Default)]
struct Counters {
    dropped: std::sync::atomic::AtomicU64,
    rejected: std::sync::atomic::AtomicU64,
    summarised: std::sync::atomic::AtomicU64,
}

/// The handle through which the server records events. Each served request first reserves a
/// place in the bounded queue ([`AuditLog::reserve`]: waiting for room, or refused, as
/// [`Backpressure`] says) and records into it when it ends, so a served request's record is
/// never dropped; the writer task appends whatever is queued in one transaction (group
/// commit). Requests refused before authentication are not one record each but per-source
/// summaries ([`AuditLog::summarise`]), so a flood without credentials costs a map update,
/// not a row. [`AuditLog::flush`] (at shutdown) writes the summaries and waits until
/// everything queued is committed.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Command>,
    config: AuditQueueConfig,
    counters: std::sync::Arc<Counters>,
    refused: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, RefusedFrom>>>,
}

/// A reserved place in the audit queue: [`AuditSlot::record`] cannot fail for want of room.
/// Dropped unused, the place is given back.
#[derive(Debug)]
pub struct AuditSlot(mpsc::OwnedPermit<Command>);

impl AuditSlot {
    pub fn record(self, event: AuditEvent) {
        self.0.send(Command::Record(Box::new(event)));
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Record(_) => "Record",
            Command::Flush(_) => "Flush",
        })
    }
}

impl AuditLog {
    /// Starts the writer task on the current Tokio runtime with the default queue.
    pub fn start(store: Store) -> Self {
        Self::start_with(store, AuditQueueConfig::default())
    }

    /// Starts the writer task (and the summary task) on the current Tokio runtime. The writer
    /// retries a failed commit (the database away) with backoff, keeping the records, and
    /// ends when every handle is gone and all is written.
    pub fn start_with(store: Store, config: AuditQueueConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        tokio::spawn(write_loop(store, rx));
        let log = Self {
            tx,
            config,
            counters: std::sync::Arc::default(),
            refused: std::sync::Arc::default(),
        };
        // The summary task holds a weak handle, so it ends with the last real one.
        let weak = log.tx.downgrade();
        let refused = log.refused.clone();
        let counters = log.counters.clone();
        tokio::spawn(async move {
            let period = config.summary_interval.max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tick.tick().await;
                let Some(tx) = weak.upgrade() else { return };
                let log = Self {
                    tx,
                    config,
                    counters: counters.clone(),
                    refused: refused.clone(),
                };
                log.write_summaries().await;
            }
        });
        log
    }

    /// Reserves a place for one record, waiting for room or refused as the configuration
    /// says; `Err` names the queue full (`reject`) or the writer gone.
    pub async fn reserve(&self) -> Result<AuditSlot> {
        let permit = match self.config.on_backpressure {
            Backpressure::Block => self
                .tx
                .clone()
                .reserve_owned()
                .await
                .map_err(|_| GatewayError::Stopped("the audit writer"))?,
            Backpressure::Reject => match self.tx.clone().try_reserve_owned() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.counters
                        .rejected
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(GatewayError::Busy("the audit log's queue is full"));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(GatewayError::Stopped("the audit writer"))
                }
            },
        };
        Ok(AuditSlot(permit))
    }

    /// Queues `event`, waiting for room however the queue is configured (security events,
    /// which no request waits on).
    pub async fn record_waiting(&self, event: AuditEvent) {
        if self
            .tx
            .send(Command::Record(Box::new(event)))
            .await
            .is_err()
        {
            self.counters
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!("the audit writer has stopped; an audit record is lost");
        }
    }

    /// Counts a request refused before authentication (no or malformed credentials, a
    /// blocked source, an unknown route) into `source`'s summary.
    pub fn summarise(&self, source: &str, route: &str, status: u16, at_ms: i64) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let key = if refused.contains_key(source) || refused.len() < self.config.max_summary_sources
        {
            source
        } else {
            "*"
        };
        let from = refused
            .entry(key.to_string())
            .or_insert_with(|| RefusedFrom {
                first_ms: at_ms,
                ..RefusedFrom::default()
            });
        from.count += 1;
        from.last_ms = at_ms;
        let label = format!("{route} {status}");
        if from.routes.contains_key(&label) || from.routes.len() < SUMMARY_ROUTES {
            *from.routes.entry(label).or_default() += 1;
        } else {
            *from.routes.entry("other".into()).or_default() += 1;
        }
        drop(refused);
        self.counters
            .summarised
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues one `security` record per source refused since the last summary (waiting for
    /// room: summaries are never dropped).
    async fn write_summaries(&self) {
        let refused = std::mem::take(&mut *self.refused.lock().unwrap_or_else(|p| p.into_inner()));
        let at_ms = crate::authenticator::unix_millis();
        for (source, from) in refused {
            let event = AuditEvent {
                at_ms,
                kind: AuditKind::Security,
                subject: "anonymous".into(),
                source,
                route: "refused.summary".into(),
                detail: json!({
                    "event": "refused_before_authentication",
                    "count": from.count,
                    "first_ms": from.first_ms,
                    "last_ms": from.last_ms,
                    "routes": from.routes,
                })
                .to_string(),
                ..AuditEvent::default()
            };
            self.record_waiting(event).await;
        }
    }

    /// Queues `event` and waits until it is committed.
    pub async fn record_and_wait(&self, event: AuditEvent) -> Result<()> {
        self.tx
            .send(Command::Record(Box::new(event)))
            .await
            .map_err(|_| GatewayError::Stopped("the audit writer"))?;
        self.flush_queued().await
    }

    /// Writes the pending summaries and waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<()> {
        self.write_summaries().await;
        self.flush_queued().await
    }

    /// Waits until everything queued so far (not the summaries still being counted) is
    /// committed.
    pub async fn flush_queued(&self) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .await
            .map_err(|_| GatewayError::Stopped("the audit writer"))?;
        wait.await
            .map_err(|_| GatewayError::Stopped("the audit writer"))
    }

    /// The queue's depth and what it dropped, refused and summarised so far.
    pub fn stats(&self) -> AuditQueueStats {
        use std::sync::atomic::Ordering::Relaxed;
        let capacity = self.tx.max_capacity() as u64;
        AuditQueueStats {
            depth: capacity.saturating_sub(self.tx.capacity() as u64),
            capacity,
            dropped: self.counters.dropped.load(Relaxed),
            rejected: self.counters.rejected.load(Relaxed),
            summarised: self.counters.summarised.load(Relaxed),
        }
    }
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<Command>) {
    let mut batch = Vec::new();
    let mut waiting = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Record(event) => batch.push(*event),
                Command::Flush(done) => waiting.push(done),
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        let mut backoff = Duration::from_millis(50);
        while let Err(e) = store.append_audit(&batch).await {
            tracing::error!(error = %e, records = batch.len(), "cannot write the audit log; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        batch.clear();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_write_them() -> Result<()> {
        let now = 1_800_000_000_000;
        assert_eq!(parse_since("2026-11-01", now)?, 1_793_491_200_000);
        assert_eq!(parse_since("2026-11-01T08:00:00Z", now)?, 1_793_520_000_000);
        assert_eq!(
            parse_since("2026-11-01T10:00:00+02:00", now)?,
            1_793_520_000_000
        );
        assert_eq!(parse_since("7d", now)?, now - 7 * 86_400_000);
        assert_eq!(parse_since("30m", now)?, now - 1_800_000);
        assert_eq!(parse_since("1234", now)?, 1234);
        for bad in ["", "yesterday", "2026-13-01", "7w", "99999999999999999999d"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
        assert_eq!(rfc3339(1_793_520_000_123), "2026-11-01T08:00:00.123Z");
        Ok(())
    }

    #[test]
    fn fields_are_length_prefixed() {
        let a = personal_hash(Some("s"), Some("ab"), Some("c"), None);
        let b = personal_hash(Some("s"), Some("a"), Some("bc"), None);
        let c = personal_hash(Some("s"), Some("ab"), Some("c"), Some(""));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 64);
    }
}
