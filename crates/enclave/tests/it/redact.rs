//! `enclave redact`: stdin to stdout with typed placeholders; `--json` with the findings'
//! categories and byte spans; custom patterns from the configuration; bad input refused.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

fn redact(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .args(args)
        .env_remove("ENCLAVE_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn redacts_stdin_and_lists_findings() {
    let text = "张三，身份证11010519491231002X，手机13812345678，邮箱 zs@example.cn。\n";
    let out = redact(&["redact"], text.as_bytes());
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "张三，身份证[ID_CARD]，手机[MOBILE]，邮箱 [EMAIL]。\n"
    );

    let out = redact(&["redact", "--json"], text.as_bytes());
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = json["findings"].as_array().unwrap();
    let spans: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| {
            let (start, end) = (
                f["start"].as_u64().unwrap() as usize,
                f["end"].as_u64().unwrap() as usize,
            );
            (f["category"].as_str().unwrap(), &text[start..end])
        })
        .collect();
    assert_eq!(
        spans,
        [
            ("id_card", "11010519491231002X"),
            ("mobile", "13812345678"),
            ("email", "zs@example.cn")
        ]
    );

    // Only some categories; a custom pattern from the configuration.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("enclave.toml");
    std::fs::write(
        &config,
        "[[redaction.custom]]\nname = \"employee_id\"\npattern = \"EMP-\\\\d{6}\"\n",
    )
    .unwrap();
    let out = redact(
        &[
            "--config",
            config.to_str().unwrap(),
            "redact",
            "--categories",
            "email",
        ],
        "EMP-004211 zs@example.cn 13812345678".as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "[EMPLOYEE_ID] [EMAIL] 13812345678"
    );
    let out = redact(&["redact", "--list"], b"");
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.lines().count() >= 18, "{listed}");
    assert!(listed.contains("[SOCIAL_CREDIT_CODE]"));
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = redact(&["redact"], &[b'a', 0xff, b'b']);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not UTF-8"));
    let out = redact(&["redact", "--categories", "phone"], b"x");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown category `phone`"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("enclave.toml");
    std::fs::write(
        &config,
        "[[redaction.custom]]\nname = \"x\"\npattern = \"(\"\n",
    )
    .unwrap();
    let out = redact(&["--config", config.to_str().unwrap(), "redact"], b"x");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("custom pattern `x`"));
}
