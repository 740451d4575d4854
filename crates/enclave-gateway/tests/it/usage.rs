//! Limits stored with tenants and keys reach the principal; usage flushes add up per day.

use enclave_gateway::{
    unix_time, Authenticator, Limits, NewKey, Roles, Store, Subject, UsageCounts, UsageLedger,
};

use crate::databases;

#[tokio::test]
async fn limits_travel_from_the_database_to_the_principal() {
    for url in databases().await.urls {
        let store = Store::connect(&url).await.unwrap();
        let now = unix_time();
        let tenant_limits = Limits {
            requests_per_minute: Some(100),
            tokens_per_minute: None,
            concurrent_requests: Some(4),
        };
        store
            .create_tenant("acme", &["*".into()], tenant_limits, now)
            .await
            .unwrap();
        let key_limits = Limits {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(2000),
            concurrent_requests: None,
        };
        let created = store
            .create_key(
                NewKey {
                    tenant: "acme".into(),
                    role: "developer".into(),
                    models: vec!["*".into()],
                    name: String::new(),
                    expires_at: None,
                    limits: key_limits,
                    created_by: "test".into(),
                },
                &Roles::default(),
                now,
            )
            .await
            .unwrap();
        assert_eq!(created.info.limits, key_limits);
        assert_eq!(
            store.key(&created.info.id).await.unwrap().unwrap().limits,
            key_limits
        );
        let principal = Authenticator::new(store.clone(), Roles::default())
            .authenticate_key(&created.key)
            .await
            .unwrap();
        assert_eq!(
            principal.rate_subjects(),
            vec![
                (Subject::Key(created.info.id.clone()), key_limits),
                (Subject::Tenant("acme".into()), tenant_limits),
            ]
        );
        let zero = Limits {
            requests_per_minute: Some(0),
            ..Limits::default()
        };
        assert!(store
            .create_tenant("zero", &["*".into()], zero, now)
            .await
            .is_err());
    }
}

#[tokio::test]
async fn usage_flushes_add_up_per_tenant_key_and_day() {
    for url in databases().await.urls {
        let store = Store::connect(&url).await.unwrap();
        let ledger = UsageLedger::default();
        let day = 20_000 * 86_400;
        let one = UsageCounts {
            requests: 1,
            prompt_tokens: 10,
            completion_tokens: 5,
        };
        ledger.record("acme", "k1", day + 100, one);
        ledger.record("acme", "k1", day + 200, one);
        ledger.record("acme", "k2", day + 300, one);
        ledger.flush(&store).await.unwrap();
        // A second flush adds to the same rows; the next day gets its own.
        ledger.record("acme", "k1", day + 400, one);
        ledger.record("beta", "k3", day + 86_400, one);
        ledger.flush(&store).await.unwrap();
        ledger.flush(&store).await.unwrap(); // nothing pending: no change

        let all = store.usage(None, None, day).await.unwrap();
        let k1 = all.iter().find(|r| r.key_id == "k1").unwrap();
        assert_eq!(
            k1.counts,
            UsageCounts {
                requests: 3,
                prompt_tokens: 30,
                completion_tokens: 15,
            }
        );
        assert_eq!(k1.day, day);
        assert_eq!(all.len(), 3, "{all:?}");
        let acme = store.usage(Some("acme"), None, day).await.unwrap();
        assert_eq!(acme.len(), 2);
        let k3 = store.usage(None, Some("k3"), day).await.unwrap();
        assert_eq!(k3.len(), 1);
        assert_eq!(k3[0].day, day + 86_400);
        assert!(store
            .usage(None, None, day + 2 * 86_400)
            .await
            .unwrap()
            .is_empty());
    }
}
