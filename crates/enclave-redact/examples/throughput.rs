//! Redactor throughput on mixed Chinese/English text, for BENCHMARKS.md:
//! `cargo run --release -p enclave-redact --example throughput`.
//! Prints median MB/s over 7 runs for: text with values (one per ~150 bytes), clean text of
//! the same words, and the streaming redactor fed 8-byte chunks (as a model emits tokens);
//! then whole-text MB/s on inputs dense with findings (e-mail addresses and mobile numbers
//! back to back, one every ~16 bytes) of 1 KB, 1 MB and 8 MB, where overlap resolution
//! dominates.

use std::sync::Arc;
use std::time::Instant;

use enclave_redact::Redactor;

const VALUES: &[&str] = &[
    "11010519491231002X",
    "13812345678",
    "zhang.san@example.com.cn",
    "4111 1111 1111 1111",
    "192.168.1.10",
    "粤B·D12345",
    "GB82 WEST 1234 5698 7654 32",
    "出生日期：1990年3月7日",
];
const WORDS: &[&str] = &[
    "客户",
    "的",
    "申请",
    "已经",
    "受理，",
    "please ",
    "review ",
    "the ",
    "contract ",
    "合同",
    "编号 ",
    "2024",
    "年度",
    "报告。",
    "order 20240101123456 ",
    "amount 1,234.56 ",
    "v1.2.3 ",
    "status: ok\n",
];

fn text(bytes: usize, with_values: bool) -> String {
    let mut out = String::with_capacity(bytes + 64);
    let mut i = 0usize;
    while out.len() < bytes {
        out.push_str(WORDS[i % WORDS.len()]);
        if with_values && i % 12 == 11 {
            out.push_str(VALUES[(i / 12) % VALUES.len()]);
            out.push(' ');
        }
        i += 1;
    }
    out
}

/// Values back to back: `u123@x.cn 13812345678 …`.
fn dense(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 64);
    let mut i = 0u64;
    while out.len() < bytes {
        if i.is_multiple_of(2) {
            out.push_str(&format!("u{i}@x.cn "));
        } else {
            out.push_str(&format!("138{:08} ", i % 100_000_000));
        }
        i += 1;
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let redactor = Arc::new(Redactor::default());
    let size = 4 << 20;
    for (name, input) in [("mixed", text(size, true)), ("clean", text(size, false))] {
        let mut whole = Vec::new();
        let mut streamed = Vec::new();
        let mut findings = 0;
        for _ in 0..7 {
            let start = Instant::now();
            let redacted = redactor.redact(&input);
            whole.push(input.len() as f64 / start.elapsed().as_secs_f64() / 1e6);
            findings = redacted.findings.len();

            let start = Instant::now();
            let mut stream = redactor.stream();
            let mut out = 0;
            let mut at = 0;
            while at < input.len() {
                let mut end = (at + 8).min(input.len());
                while !input.is_char_boundary(end) {
                    end += 1;
                }
                out += stream.push(&input[at..end]).len();
                at = end;
            }
            out += stream.finish().len();
            std::hint::black_box(out);
            streamed.push(input.len() as f64 / start.elapsed().as_secs_f64() / 1e6);
        }
        println!(
            "{name}: {:.1} MB of text, {findings} findings; whole {:.1} MB/s, streamed in 8-byte chunks {:.1} MB/s (medians of 7)",
            input.len() as f64 / 1e6,
            median(whole),
            median(streamed)
        );
    }
    for size in [1 << 10, 1 << 20, 8 << 20] {
        let input = dense(size);
        let runs = if size > 1 << 20 { 1 } else { 7 };
        let mut whole = Vec::new();
        let mut findings = 0;
        for _ in 0..runs {
            let start = Instant::now();
            let redacted = redactor.redact(&input);
            whole.push(input.len() as f64 / start.elapsed().as_secs_f64() / 1e6);
            findings = redacted.findings.len();
        }
        println!(
            "dense: {} bytes, {findings} findings; whole {:.2} MB/s (median of {runs})",
            input.len(),
            median(whole)
        );
    }
}
