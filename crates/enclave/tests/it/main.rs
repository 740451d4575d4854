//! End-to-end tests of the `enclave` binary: real processes, real files.

// Test helpers may panic: a failed fixture read is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bad_input;
mod chat;
mod generate;
mod redact;
mod serve;

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

pub fn enclave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_enclave"))
        .args(args)
        .env_remove("ENCLAVE_LOG")
        .output()
        .unwrap()
}

/// `enclave` run with `$USER` and `$LOGNAME` claiming someone else.
pub fn enclave_as_mallory(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_enclave"))
        .args(args)
        .env_remove("ENCLAVE_LOG")
        .env("USER", "mallory")
        .env("LOGNAME", "mallory")
        .output()
        .unwrap()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

pub fn goldens(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("goldens.json")).unwrap())
        .unwrap()
}

/// A new, empty database on the PostgreSQL server at `admin` (whose path names an existing
/// database).
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
