//! Tenants and API keys through the store and the authenticator.

use std::time::{Duration, Instant};

use enclave_gateway::{
    unix_time, Authenticator, GatewayError, Identity, Limits, NewKey, Permission, Roles, Store,
    CACHE_TTL,
};

use crate::databases;

fn new_key(tenant: &str, role: &str, models: &[&str]) -> NewKey {
    NewKey {
        tenant: tenant.into(),
        role: role.into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        name: "test".into(),
        expires_at: None,
        limits: Limits::default(),
        created_by: "test".into(),
    }
}

fn unauthenticated(result: enclave_gateway::Result<enclave_gateway::Principal>) -> bool {
    matches!(result, Err(GatewayError::Unauthenticated(_)))
}

#[tokio::test]
async fn tenants_are_created_once_and_names_are_checked() {
    for url in databases().await.urls {
        let store = Store::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        // Migrations run again on a second connection without harm.
        let again = Store::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let now = unix_time();
        let acme = store
            .create_tenant("acme", &["deepseek-r1-*".into()], Limits::default(), now)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(acme.models.patterns(), ["deepseek-r1-*"]);
        assert!(matches!(
            again
                .create_tenant("acme", &["*".into()], Limits::default(), now)
                .await,
            Err(GatewayError::Exists(_))
        ));
        for bad in ["acme'; DROP TABLE tenants; --", "", "a b"] {
            assert!(matches!(
                store
                    .create_tenant(bad, &["*".into()], Limits::default(), now)
                    .await,
                Err(GatewayError::Invalid {
                    field: "tenant",
                    ..
                })
            ));
        }
        assert!(matches!(
            store
                .create_tenant("beta", &["a[".into()], Limits::default(), now)
                .await,
            Err(GatewayError::Invalid {
                field: "models",
                ..
            })
        ));
        let names: Vec<String> = again
            .tenants()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["acme", "default"], "{url}");
    }
}

#[tokio::test]
async fn keys_authenticate_to_their_tenant_role_and_models() {
    for url in databases().await.urls {
        let store = Store::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let roles = Roles::default();
        let now = unix_time();
        store
            .create_tenant(
                "acme",
                &["deepseek-r1-*".into(), "gemma-*".into()],
                Limits::default(),
                now,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            store
                .create_key(new_key("nobody", "developer", &["*"]), &roles, now)
                .await,
            Err(GatewayError::NotFound(_))
        ));
        assert!(matches!(
            store
                .create_key(new_key("acme", "root", &["*"]), &roles, now)
                .await,
            Err(GatewayError::Invalid { field: "role", .. })
        ));
        let created = store
            .create_key(new_key("acme", "developer", &["deepseek-*"]), &roles, now)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(created.key.starts_with("enc_"));

        let auth = Authenticator::new(store.clone(), roles.clone());
        let principal = auth
            .authenticate_key(&created.key)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(
            principal.identity,
            Identity::ApiKey {
                id: created.info.id.clone()
            }
        );
        assert_eq!(
            (principal.tenant.as_str(), principal.role.as_str()),
            ("acme", "developer")
        );
        assert!(principal.can(Permission::Inference));
        assert!(!principal.can(Permission::KeysManage));
        // The tenant's patterns and the key's both apply.
        assert!(principal.may_use_model("deepseek-r1-distill-qwen-1.5b"));
        assert!(
            !principal.may_use_model("deepseek-v3"),
            "outside the tenant"
        );
        assert!(!principal.may_use_model("gemma-3-270m"), "outside the key");

        // The secret is not stored, and lookalikes fail.
        let listed = store
            .keys(Some("acme"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(listed.len(), 1);
        assert!(listed[0].last_used_at.is_some(), "last use recorded");
        let mut wrong = created.key.clone();
        let last = wrong
            .pop()
            .map_or('0', |c| if c == '0' { '1' } else { '0' });
        wrong.push(last);
        for bad in [wrong.as_str(), "", "Bearer", "enc_", "sk-1234"] {
            assert!(unauthenticated(auth.authenticate_key(bad).await), "{bad}");
        }
        assert!(store
            .keys(Some("default"))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
    }
}

#[tokio::test]
async fn a_revocation_on_another_connection_takes_effect_within_the_cache_lifetime() {
    for url in databases().await.urls {
        let server_store = Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        let cli_store = Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        let roles = Roles::default();
        let created = cli_store
            .create_key(new_key("default", "viewer", &["*"]), &roles, unix_time())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let auth = Authenticator::new(server_store, roles);
        assert!(auth.authenticate_key(&created.key).await.is_ok());
        let revoked = cli_store
            .revoke_key(&created.info.id, unix_time())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(revoked.revoked_at.is_some());
        let start = Instant::now();
        while auth.authenticate_key(&created.key).await.is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{url}: still accepted"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(start.elapsed() <= CACHE_TTL + Duration::from_secs(1));
        assert!(matches!(
            cli_store.revoke_key("0123456789abcdef", unix_time()).await,
            Err(GatewayError::NotFound(_))
        ));
    }
}

#[tokio::test]
async fn expired_keys_and_keys_of_dropped_roles_do_not_authenticate() {
    for url in databases().await.urls {
        let store = Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        let custom = ["inference".to_string()];
        let with_support =
            Roles::with_custom([("support", &custom[..])]).unwrap_or_else(|e| panic!("{e}"));
        let now = unix_time();
        // Valid when made (an hour ago), expired since.
        let mut expiring = new_key("default", "developer", &["*"]);
        expiring.expires_at = Some(now - 1800);
        let expired = store
            .create_key(expiring, &with_support, now - 3600)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut past = new_key("default", "developer", &["*"]);
        past.expires_at = Some(now - 1);
        assert!(matches!(
            store.create_key(past, &with_support, now).await,
            Err(GatewayError::Invalid {
                field: "expires",
                ..
            })
        ));
        let support = store
            .create_key(new_key("default", "support", &["*"]), &with_support, now)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let auth = Authenticator::new(store.clone(), with_support);
        assert!(unauthenticated(auth.authenticate_key(&expired.key).await));
        assert!(auth.authenticate_key(&support.key).await.is_ok());
        // The same database under a configuration without the custom role.
        let without = Authenticator::new(store, Roles::default());
        assert!(unauthenticated(
            without.authenticate_key(&support.key).await
        ));
    }
}

/// A role created in the database (by another process) reaches a running authenticator within
/// its cache lifetime, grants exactly its permissions, and cannot be deleted while a key holds
/// it.
#[tokio::test]
async fn roles_created_in_the_database() {
    for url in databases().await.urls {
        let server_store = Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        let cli_store = Store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        let auth = Authenticator::new(server_store, Roles::default());
        assert!(auth.roles().await.unwrap().permissions("bot").is_none());
        let now = unix_time();
        let permissions = cli_store
            .create_role(
                "bot",
                &["inference".into()],
                "a bot",
                &Roles::default(),
                now,
            )
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(permissions.contains(Permission::Inference));
        assert!(matches!(
            cli_store
                .create_role("bot", &[], "", &Roles::default(), now)
                .await,
            Err(GatewayError::Exists(_))
        ));
        assert!(matches!(
            cli_store
                .create_role("viewer", &[], "", &Roles::default(), now)
                .await,
            Err(GatewayError::Exists(_))
        ));
        assert!(matches!(
            cli_store
                .create_role("x", &["fly".into()], "", &Roles::default(), now)
                .await,
            Err(GatewayError::Invalid { .. })
        ));
        let start = Instant::now();
        while auth.roles().await.unwrap().permissions("bot").is_none() {
            assert!(
                start.elapsed() < CACHE_TTL + Duration::from_secs(1),
                "{url}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let roles = cli_store.roles(&Roles::default()).await.unwrap();
        assert_eq!(roles.description("bot"), Some("a bot"));
        let key = cli_store
            .create_key(new_key("default", "bot", &["*"]), &roles, now)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let principal = auth.authenticate_key(&key.key).await.unwrap();
        assert!(principal.can(Permission::Inference));
        assert!(!principal.can(Permission::ModelsRead));
        assert!(matches!(
            cli_store.delete_role("bot", now).await,
            Err(GatewayError::Invalid { .. })
        ));
        cli_store.revoke_key(&key.info.id, now).await.unwrap();
        cli_store.delete_role("bot", now).await.unwrap();
        assert!(matches!(
            cli_store.delete_role("bot", now).await,
            Err(GatewayError::NotFound(_))
        ));
        auth.forget_roles();
        assert!(auth.roles().await.unwrap().permissions("bot").is_none());
    }
}
