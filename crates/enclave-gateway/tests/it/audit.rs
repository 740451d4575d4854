//! The audit chain on real databases: appended in batches, verified, and every kind of
//! tampering — a changed field, a deleted, inserted or reordered record, a truncated tail —
//! detected and named; pruning and erasure keep it verifying.

use enclave_gateway::{AuditEvent, AuditKind, AuditLog, AuditQuery, Store};
use sqlx::Connection;

use crate::databases;

const DAY_MS: i64 = 86_400_000;

fn event(i: i64, at_ms: i64, kind: AuditKind) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind,
        request_id: format!("req-{i}"),
        tenant: if i % 2 == 0 { "default" } else { "acme" }.into(),
        subject: format!("key:{:016x}", i % 3),
        source: format!("10.0.0.{i}"),
        method: "POST".into(),
        route: "/v1/chat/completions".into(),
        model: "tiny".into(),
        status: 200,
        prompt_tokens: 10 + i as u64,
        completion_tokens: 5,
        latency_ms: 40,
        detail: String::new(),
        text: (i == 3).then(|| "my id is [ID_CARD]".into()),
    }
}

/// A database with `n` records, one a day, ending now-ish.
async fn filled(url: &str, n: i64) -> Store {
    let store = Store::connect(url).await.unwrap();
    let log = AuditLog::start(store.clone());
    let now = 1_800_000_000_000;
    for i in 1..=n {
        let kind = if i % 4 == 0 {
            AuditKind::Admin
        } else {
            AuditKind::Api
        };
        log.record_waiting(event(i, now - (n - i) * DAY_MS, kind))
            .await;
    }
    log.flush().await.unwrap();
    store
}

/// A fresh database of the kind `url` is (one per tampering case), kept alive by `dirs`.
async fn fresh_like(url: &str, dirs: &mut Vec<tempfile::TempDir>) -> String {
    if url.starts_with("sqlite:") {
        let dir = tempfile::tempdir().unwrap();
        let url = Store::sqlite_url(dir.path());
        dirs.push(dir);
        url
    } else {
        crate::fresh_postgres(&std::env::var("ENCLAVE_TEST_POSTGRES_URL").unwrap()).await
    }
}

/// Runs raw SQL on the database, as an attacker with file or database access would.
async fn tamper(url: &str, statements: &[&str]) {
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    for statement in statements {
        sqlx::query(statement)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

#[tokio::test]
async fn an_untouched_chain_verifies_and_reads_back() {
    for url in databases().await.urls {
        let store = filled(&url, 12).await;
        let report = store.verify_audit().await.unwrap();
        assert_eq!(report.problem, None, "{url}");
        assert_eq!((report.records, report.head_seq), (12, 12));
        let newest = store
            .audit_entries(&AuditQuery {
                limit: 3,
                newest: true,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(
            newest.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [10, 11, 12]
        );
        assert_eq!(newest[2].request_id.as_deref(), Some("req-12"));
        let acme = store
            .audit_entries(&AuditQuery {
                tenant: Some("acme".into()),
                limit: 100,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(acme.len(), 6);
        assert!(acme.iter().all(|e| e.tenant.as_deref() == Some("acme")));
    }
}

#[tokio::test]
async fn every_kind_of_tampering_is_detected_and_named() {
    // (what, statements, the record named, a word of the reason)
    let cases: &[(&str, &[&str], i64, &str)] = &[
        (
            "a changed status",
            &["UPDATE audit_log SET status = 500 WHERE seq = 4"],
            4,
            "content",
        ),
        (
            "a changed token count",
            &["UPDATE audit_log SET completion_tokens = 1 WHERE seq = 7"],
            7,
            "content",
        ),
        (
            "a changed subject",
            &["UPDATE audit_log SET subject = 'key:0000000000000009' WHERE seq = 5"],
            5,
            "subject",
        ),
        (
            "a changed time",
            &["UPDATE audit_log SET at_ms = at_ms + 1 WHERE seq = 6"],
            6,
            "hash",
        ),
        (
            "a deleted record",
            &["DELETE FROM audit_log WHERE seq = 5"],
            6,
            "missing",
        ),
        (
            "the newest record deleted",
            &["DELETE FROM audit_log WHERE seq = 12"],
            12,
            "missing",
        ),
        (
            "a record inserted (the later ones renumbered)",
            &[
                "UPDATE audit_log SET seq = seq + 100 WHERE seq >= 5",
                "UPDATE audit_log SET seq = seq - 99 WHERE seq >= 105",
                "INSERT INTO audit_log SELECT 5, at_ms, kind, request_id, tenant, method, route, \
                 model, status, prompt_tokens, completion_tokens, latency_ms, detail, subject, \
                 source, text, salt, personal_sha256, content_sha256, prev_sha256, sha256, pruned, \
                 erased FROM audit_log WHERE seq = 3",
            ],
            5,
            "follow",
        ),
        (
            "two records swapped",
            &[
                "UPDATE audit_log SET seq = 1000 WHERE seq = 8",
                "UPDATE audit_log SET seq = 8 WHERE seq = 9",
                "UPDATE audit_log SET seq = 9 WHERE seq = 1000",
            ],
            8,
            "follow",
        ),
        (
            "a record marked erased that still holds its subject",
            &["UPDATE audit_log SET erased = 1 WHERE seq = 2"],
            2,
            "erased",
        ),
        (
            "the oldest records deleted and the anchor moved past them",
            &[
                "UPDATE audit_chain SET anchor_seq = 3, anchor_sha256 = \
                 (SELECT sha256 FROM audit_log WHERE seq = 3) WHERE id = 1",
                "DELETE FROM audit_log WHERE seq <= 3",
            ],
            4,
            "no pruning recorded",
        ),
        (
            "a record marked pruned that keeps its (changed) content",
            &["UPDATE audit_log SET pruned = 1, status = 201 WHERE seq = 5"],
            5,
            "pruned",
        ),
        (
            "a record inserted before the anchor",
            &[
                "INSERT INTO audit_log SELECT 0, at_ms, kind, request_id, tenant, method, route, \
               model, status, prompt_tokens, completion_tokens, latency_ms, detail, subject, \
               source, text, salt, personal_sha256, content_sha256, prev_sha256, sha256, pruned, \
               erased FROM audit_log WHERE seq = 3",
            ],
            0,
            "anchor",
        ),
    ];
    let mut dirs = Vec::new();
    for url in databases().await.urls {
        for (what, statements, seq, word) in cases {
            // A fresh database per case: each on its own.
            let url = fresh_like(&url, &mut dirs).await;
            let store = filled(&url, 12).await;
            assert_eq!(store.verify_audit().await.unwrap().problem, None);
            tamper(&url, statements).await;
            let problem = store
                .verify_audit()
                .await
                .unwrap()
                .problem
                .unwrap_or_else(|| panic!("{what}: not detected ({url})"));
            assert_eq!(problem.seq, *seq, "{what}: {problem}");
            assert!(problem.reason.contains(word), "{what}: {problem}");
        }
    }
}

#[tokio::test]
async fn pruning_and_erasure_keep_the_chain_verifying() {
    for url in databases().await.urls {
        // Twelve records a day apart; admin ones (every fourth) kept longer.
        let store = filled(&url, 12).await;
        let newest = 1_800_000_000_000;
        // API records older than 5 days go; admin records older than 9 days.
        let report = store
            .prune_audit(newest - 5 * DAY_MS, newest - 9 * DAY_MS, newest, "test")
            .await
            .unwrap();
        // Records 1..=6 are older than 5 days; of them 4 is admin and only 8 days old: kept.
        assert_eq!(report.pruned, 5, "{url}: {report:?}");
        assert_eq!(report.deleted, 3, "the leading run 1..=3 is deleted");
        let verified = store.verify_audit().await.unwrap();
        assert_eq!(verified.problem, None, "{url}");
        assert_eq!(verified.records, 10, "4..=12 and the pruning's own record");
        assert_eq!(verified.pruned, 2, "5 and 6 stay as pruned links after 4");
        let entries = store
            .audit_entries(&AuditQuery {
                limit: 100,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(entries[0].seq, 4);
        assert_eq!(entries[0].kind, "admin");
        assert!(entries[1].pruned && entries[1].request_id.is_none());

        // Erase one subject: its records keep everything but who, from where, and what.
        let erased = store
            .erase_audit_subject("0000000000000002", newest, "test")
            .await
            .unwrap();
        assert_eq!(erased, 2, "records 8 and 11 (5 is pruned already)");
        let verified = store.verify_audit().await.unwrap();
        assert_eq!(verified.problem, None, "{url}");
        assert_eq!(verified.erased, 2);
        // The erasure's own record (14) lists what it erased and can be shown to be about
        // that subject, without naming it.
        let erasure = &store
            .audit_entries(&AuditQuery {
                after_seq: Some(13),
                limit: 1,
                ..AuditQuery::default()
            })
            .await
            .unwrap()[0];
        assert_eq!(erasure.route.as_deref(), Some("audit.erase"));
        let detail: serde_json::Value =
            serde_json::from_str(erasure.detail.as_deref().unwrap()).unwrap();
        assert_eq!(detail["seqs"], serde_json::json!([[8, 8], [11, 11]]));
        let salt = detail["subject_salt"].as_str().unwrap();
        assert_eq!(
            detail["subject_sha256"],
            enclave_gateway::erased_subject_sha256(salt, "0000000000000002")
        );
        assert!(!erasure
            .detail
            .as_deref()
            .unwrap()
            .contains("0000000000000002"));
        let entries = store
            .audit_entries(&AuditQuery {
                after_seq: Some(7),
                limit: 100,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        let eighth = &entries[0];
        assert_eq!(eighth.seq, 8);
        assert!(eighth.erased);
        assert_eq!(
            (eighth.subject.as_ref(), eighth.source.as_ref()),
            (None, None)
        );
        assert_eq!(eighth.status, Some(200));
        assert!(entries.iter().any(|e| e.subject.is_some()));

        // Appending continues the chain after pruning; pruning everything leaves a verifiable
        // empty log whose anchor is the head.
        let log = AuditLog::start(store.clone());
        log.record_and_wait(event(13, newest + DAY_MS, AuditKind::Api))
            .await
            .unwrap();
        assert_eq!(store.verify_audit().await.unwrap().problem, None);
        let later = newest + 2 * DAY_MS;
        let all = store
            .prune_audit(later, later, later, "test")
            .await
            .unwrap();
        assert_eq!(
            all.deleted, 12,
            "4..=15, the first pruning's and the erasure's records included"
        );
        let empty = store.verify_audit().await.unwrap();
        assert_eq!(
            (empty.problem, empty.records, empty.head_seq),
            (None, 1, 16),
            "only the last pruning's record is left"
        );
        log.record_and_wait(event(16, newest + 3 * DAY_MS, AuditKind::Api))
            .await
            .unwrap();
        let verified = store.verify_audit().await.unwrap();
        assert_eq!((verified.problem, verified.records), (None, 2));
    }
}

/// Content or personal fields blanked by hand, marked as if pruned or erased: each blanked
/// record must be accounted for by a later `audit.prune` (older than its cutoff) or
/// `audit.erase` (listed) record, or `verify` names it.
#[tokio::test]
async fn blanking_records_as_if_pruned_or_erased_is_detected() {
    let prune = |seq: i64| {
        format!(
            "UPDATE audit_log SET request_id = NULL, tenant = NULL, method = NULL, route = NULL, \
             model = NULL, status = NULL, prompt_tokens = NULL, completion_tokens = NULL, \
             latency_ms = NULL, detail = NULL, subject = NULL, source = NULL, text = NULL, \
             salt = NULL, personal_sha256 = NULL, pruned = 1 WHERE seq = {seq}"
        )
    };
    let erase = |seq: i64| {
        format!(
            "UPDATE audit_log SET subject = NULL, source = NULL, text = NULL, salt = NULL, \
             erased = 1 WHERE seq = {seq}"
        )
    };
    // After the setup below: 4 (admin, 8 days old), 5 and 6 pruned, 7..=12, 13 the pruning
    // (API cutoff 5 days, admin 9 days), 8 and 11 erased, 14 the erasure.
    let cases: Vec<(&str, String, i64, &str)> = vec![
        (
            "a two-day-old API record blanked",
            prune(10),
            10,
            "audit.prune",
        ),
        (
            "a newest admin record blanked",
            prune(12),
            12,
            "audit.prune",
        ),
        (
            "an admin record older than the API cutoff but within the admin one",
            prune(4),
            4,
            "audit.prune",
        ),
        // (which also leaves the anchor unexplained: that is found first)
        (
            "the pruning's own record blanked",
            prune(13),
            4,
            "no pruning recorded",
        ),
        (
            "another record's subject blanked",
            erase(9),
            9,
            "audit.erase",
        ),
        (
            "a record before the erasure blanked",
            erase(7),
            7,
            "audit.erase",
        ),
        (
            "the erasure's own record blanked",
            prune(14),
            8,
            "audit.erase",
        ),
    ];
    let mut dirs = Vec::new();
    for url in databases().await.urls {
        for (what, statement, seq, word) in &cases {
            let url = fresh_like(&url, &mut dirs).await;
            let store = filled(&url, 12).await;
            let newest = 1_800_000_000_000;
            store
                .prune_audit(newest - 5 * DAY_MS, newest - 9 * DAY_MS, newest, "test")
                .await
                .unwrap();
            store
                .erase_audit_subject("0000000000000002", newest, "test")
                .await
                .unwrap();
            let before = store.verify_audit().await.unwrap();
            assert_eq!(before.problem, None, "{what} ({url})");
            tamper(&url, &[statement.as_str()]).await;
            let after = store.verify_audit().await.unwrap();
            let problem = after
                .problem
                .unwrap_or_else(|| panic!("{what}: not detected ({url})"));
            assert_eq!(problem.seq, *seq, "{what}: {problem}");
            assert!(problem.reason.contains(word), "{what}: {problem}");
            assert_eq!(
                after.head_sha256, before.head_sha256,
                "the head is unchanged"
            );
        }
    }
}

/// A pruning cannot claim a cutoff in the future (its record would vouch for records that are
/// not old).
#[tokio::test]
async fn a_pruning_cutoff_in_the_future_is_refused() {
    for url in databases().await.urls {
        let store = filled(&url, 3).await;
        let now = 1_800_000_000_000;
        let err = store
            .prune_audit(now + 1, now, now, "test")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("future"), "{err}");
        assert_eq!(store.verify_audit().await.unwrap().records, 3);
    }
}

/// Two writers on separate connections (two replicas) append at once; the chain stays one
/// line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_keep_one_chain() {
    for url in databases().await.urls {
        let a = Store::connect(&url).await.unwrap();
        let b = Store::connect(&url).await.unwrap();
        let write = |store: Store, offset: i64| {
            tokio::spawn(async move {
                for i in 0..20 {
                    let batch: Vec<AuditEvent> = (0..5)
                        .map(|j| event(offset + i * 5 + j, 1_800_000_000_000, AuditKind::Api))
                        .collect();
                    store.append_audit(&batch).await.unwrap();
                }
            })
        };
        let (x, y) = (write(a.clone(), 0), write(b, 1_000));
        x.await.unwrap();
        y.await.unwrap();
        let report = a.verify_audit().await.unwrap();
        assert_eq!(report.problem, None, "{url}");
        assert_eq!(report.records, 200);
    }
}

/// An admin change and its audit record commit together: the record is in the chain once the
/// change returns; a change refused writes no record; and when the record cannot be written
/// (the chain's head row is gone), the change is rolled back, so nothing changes unaudited.
#[tokio::test]
async fn an_admin_change_and_its_record_commit_together() {
    let mut dirs = Vec::new();
    for url in databases().await.urls {
        let url = fresh_like(&url, &mut dirs).await;
        let store = Store::connect(&url).await.unwrap();
        let roles = enclave_gateway::Roles::default();
        let record = |action: &'static str| {
            move |what: &String| AuditEvent {
                kind: AuditKind::Admin,
                route: action.into(),
                detail: format!("{{\"action\":\"{action}\",\"what\":\"{what}\"}}"),
                ..event(1, 1_800_000_000_000, AuditKind::Admin)
            }
        };
        let tenant_record = record("tenant.create");
        let tenant_record = |t: &enclave_gateway::Tenant| tenant_record(&t.name);
        store
            .create_tenant_audited(
                "acme",
                &["*".into()],
                enclave_gateway::Limits::default(),
                1,
                Some(&tenant_record),
            )
            .await
            .unwrap();
        let count = |store: Store| async move {
            store
                .audit_entries(&AuditQuery {
                    limit: 100,
                    ..AuditQuery::default()
                })
                .await
                .unwrap()
                .len()
        };
        assert_eq!(count(store.clone()).await, 1, "{url}");
        // Refused (it exists): no record.
        assert!(store
            .create_tenant_audited(
                "acme",
                &["*".into()],
                enclave_gateway::Limits::default(),
                1,
                Some(&tenant_record),
            )
            .await
            .is_err());
        assert_eq!(count(store.clone()).await, 1, "{url}");
        // The record cannot be written: the key is not created either.
        tamper(&url, &["DELETE FROM audit_chain"]).await;
        let key_record = record("key.create");
        let key_record = |k: &enclave_gateway::KeyInfo| key_record(&k.id);
        let new_key = || enclave_gateway::NewKey {
            tenant: "acme".into(),
            role: "viewer".into(),
            models: vec!["*".into()],
            name: "unaudited".into(),
            expires_at: None,
            limits: enclave_gateway::Limits::default(),
            created_by: "test".into(),
        };
        let failed = store
            .create_key_audited(new_key(), &roles, 2, Some(&key_record))
            .await;
        assert!(failed.is_err(), "{url}");
        assert!(
            store.keys(Some("acme")).await.unwrap().is_empty(),
            "{url}: a key was created without its record"
        );
        let revoke_record = record("key.revoke");
        let revoke_record = |k: &enclave_gateway::KeyInfo| revoke_record(&k.id);
        let unaudited = store.create_key(new_key(), &roles, 2).await.unwrap();
        assert!(store
            .revoke_key_audited(&unaudited.info.id, 3, Some(&revoke_record))
            .await
            .is_err());
        let key = store.key(&unaudited.info.id).await.unwrap().unwrap();
        assert_eq!(key.revoked_at, None, "{url}: revoked without its record");
    }
}

/// A verification can start where the last clean one ended: it checks only the records since,
/// after checking that the checkpoint's record still has its hash; a moved anchor (pruning)
/// makes it walk the whole chain again.
#[tokio::test]
async fn verification_resumes_from_its_last_checkpoint() {
    let mut dirs = Vec::new();
    for url in databases().await.urls {
        let url = fresh_like(&url, &mut dirs).await;
        let now = 1_800_000_000_000;
        let store = filled(&url, 12).await;
        let (whole, checkpoint) = store.verify_audit_since(None).await.unwrap();
        assert_eq!((whole.from_seq, whole.records), (1, 12), "{url}");
        let checkpoint = checkpoint.unwrap();
        assert_eq!(checkpoint.seq, 12);
        store
            .append_audit(&[
                event(13, now, AuditKind::Api),
                event(14, now, AuditKind::Api),
            ])
            .await
            .unwrap();
        let (since, next) = store.verify_audit_since(Some(&checkpoint)).await.unwrap();
        assert_eq!(since.problem, None, "{url}");
        assert_eq!((since.from_seq, since.records), (13, 2), "{url}");
        let next = next.unwrap();
        assert_eq!(next.seq, 14);
        // Nothing new: nothing to check, still clean.
        let (idle, _) = store.verify_audit_since(Some(&next)).await.unwrap();
        assert_eq!((idle.records, idle.problem), (0, None), "{url}");
        // A new record chained onto a rewritten checkpoint record is found at the checkpoint.
        tamper(&url, &["UPDATE audit_log SET sha256 = 'ab' WHERE seq = 14"]).await;
        let (bad, none) = store.verify_audit_since(Some(&next)).await.unwrap();
        assert_eq!(bad.problem.map(|p| p.seq), Some(14), "{url}");
        assert!(none.is_none(), "no checkpoint from a failed verification");
    }
    // Pruning moves the anchor: the old checkpoint no longer applies, the whole chain is walked.
    for url in databases().await.urls {
        let url = fresh_like(&url, &mut dirs).await;
        let newest = 1_800_000_000_000;
        let store = filled(&url, 12).await;
        let (_, checkpoint) = store.verify_audit_since(None).await.unwrap();
        store
            .prune_audit(newest - 5 * DAY_MS, newest - 9 * DAY_MS, newest, "test")
            .await
            .unwrap();
        let (after, _) = store.verify_audit_since(checkpoint.as_ref()).await.unwrap();
        assert_eq!(after.problem, None, "{url}");
        assert_eq!(after.from_seq, 4, "{url}: walked from the new anchor");
    }
}
