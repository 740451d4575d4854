//! The gateway against real databases: a SQLite file always, and PostgreSQL when
//! `ENCLAVE_TEST_POSTGRES_URL` names a server where the user may create databases (`.ci/run`
//! starts one); each test gets a fresh database of each kind.

// Test helpers may panic: a failed setup is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod audit;
mod keys;
mod oidc;
mod usage;

use enclave_gateway::Store;

/// Fresh databases to run a test against, with what to keep alive while it runs.
pub struct TestDatabases {
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

pub async fn databases() -> TestDatabases {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut urls = vec![Store::sqlite_url(dir.path())];
    if let Ok(admin) = std::env::var("ENCLAVE_TEST_POSTGRES_URL") {
        urls.push(fresh_postgres(&admin).await);
    } else {
        eprintln!("PostgreSQL: SKIPPED (set ENCLAVE_TEST_POSTGRES_URL to run against it)");
    }
    TestDatabases { urls, _dir: dir }
}

/// A new, empty database on the server at `admin` (whose path names an existing database).
pub async fn fresh_postgres(admin: &str) -> String {
    use sqlx::Connection;
    let name = format!("enclave_test_{:016x}", rand::random::<u64>());
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE: {e}"));
    let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
    format!("{base}/{name}")
}
