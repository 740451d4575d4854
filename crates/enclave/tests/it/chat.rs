//! `enclave chat` driven through its standard input, as a person at a terminal would.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::model_dir;

#[test]
fn chat_answers_each_turn_and_exits_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .args(["chat", "--model", model_dir("qwen2").to_str().unwrap()])
        .args(["--temperature", "0", "--max-tokens", "6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("Hello\n\n你好\n/reset\nHi again\n/exit\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    // A prompt for each of the five input lines but the last, and three answers.
    assert_eq!(stdout.matches("> ").count(), 6, "{stdout:?}");
    let answers: Vec<&str> = stdout
        .split("> ")
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('\n'))
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(answers.len(), 3, "{stdout:?}");
    // Greedy answers equal one-shot `generate --chat`; after /reset the context is fresh again.
    assert_eq!(answers[0], one_shot("Hello"));
    assert_eq!(answers[2], one_shot("Hi again"));
}

fn one_shot(message: &str) -> String {
    let out = crate::enclave(&[
        "generate",
        "--model",
        model_dir("qwen2").to_str().unwrap(),
        "--chat",
        message,
        "--temperature",
        "0",
        "--max-tokens",
        "6",
    ]);
    assert!(out.status.success());
    crate::stdout(&out).trim_end_matches('\n').to_string()
}
