//! `enclave generate` end to end.

use std::path::PathBuf;

use crate::{enclave, goldens, model_dir, stderr, stdout};

fn json_out(args: &[&str]) -> serde_json::Value {
    let out = enclave(args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "exactly one JSON object: {text}");
    serde_json::from_str(&text).unwrap()
}

fn as_ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn json_output_has_the_greedy_tokens_of_transformers() {
    for name in ["qwen2", "llama-llama3-rope"] {
        let dir = model_dir(name);
        let golden = &goldens(name)["prompts"][1];
        let text = golden["text"].as_str().unwrap();
        let out = json_out(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            text,
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ]);
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["prompt_ids", "ids", "text", "logprobs", "finish_reason"]
        );
        assert_eq!(as_ids(&out["prompt_ids"]), as_ids(&golden["ids"]));
        assert_eq!(as_ids(&out["ids"]), as_ids(&golden["greedy"])[..24]);
        assert_eq!(out["finish_reason"], "length");
        let logprobs = out["logprobs"].as_array().unwrap();
        assert_eq!(logprobs.len(), 24);
        assert!(logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0));
    }
}

#[test]
fn prompt_ids_and_chat_inputs_work() {
    let dir = model_dir("qwen2");
    let golden = &goldens("qwen2")["prompts"];
    let ids: Vec<String> = as_ids(&golden[0]["ids"])
        .iter()
        .map(u64::to_string)
        .collect();
    let out = json_out(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(as_ids(&out["ids"]), as_ids(&golden[0]["greedy"])[..5]);

    let chat = golden[4]["chat"][0]["content"].as_str().unwrap();
    let out = json_out(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--chat",
        chat,
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(as_ids(&out["prompt_ids"]), as_ids(&golden[4]["ids"]));
    assert_eq!(as_ids(&out["ids"]), as_ids(&golden[4]["greedy"])[..5]);
}

#[test]
fn seeded_sampling_is_reproducible_from_the_command_line() {
    let dir = model_dir("qwen2");
    let run = |seed: &str| {
        json_out(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ])["ids"]
            .clone()
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(run("3"), run("4"));
}

#[test]
fn plain_output_streams_the_same_text_as_json() {
    let dir = model_dir("qwen2");
    let common = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
    ];
    let json = json_out(&[&common[..], &["--json"]].concat());
    let out = enclave(&common);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        format!("{}\n", json["text"].as_str().unwrap())
    );
}

#[test]
fn help_explains_every_flag() {
    let out = enclave(&["generate", "--help"]);
    let help = stdout(&out);
    for flag in [
        "--model",
        "--prompt",
        "--prompt-ids",
        "--chat",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--min-p",
        "--seed",
        "--ignore-eos",
        "--dtype",
        "--json",
        "--stop",
        "--max-model-len",
        "--repetition-penalty",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(stdout(&enclave(&["chat", "--help"])).contains("--system"));
}

/// The tiny DeepSeek-V3 fixture (real 129280-token vocabulary) served with the real DeepSeek-V3
/// tokenizer and the DeepSeek-R1 chat template: prompt ids and greedy tokens are those of
/// `transformers` with the same tokenizer and template.
#[test]
fn deepseek_v3_chat_with_the_real_tokenizer_and_r1_template() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    let fixture = model_dir("deepseek-v3");
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
    }
    std::fs::copy(
        shared.join("deepseek-v3-tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    for file in ["tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(shared.join("deepseek-r1").join(file), dir.path().join(file)).unwrap();
    }
    let golden = &goldens("deepseek-v3")["prompts"][3];
    assert_eq!(golden["chat"][0]["content"], "你好");
    let run = enclave(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--chat",
        "你好",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--stats",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    // Start-up report: (kv_lora_rank 16 + qk_rope_head_dim 4) x 3 layers x 4 bytes (f32).
    assert!(
        stderr(&run).contains("DeepseekV3ForCausalLM: 3 layers")
            && stderr(&run).contains("KV cache 240 bytes/token"),
        "{}",
        stderr(&run)
    );
    let out: serde_json::Value = serde_json::from_str(&stdout(&run)).unwrap();
    assert_eq!(as_ids(&out["prompt_ids"]), as_ids(&golden["ids"]));
    assert_eq!(as_ids(&out["ids"]), as_ids(&golden["greedy"])[..24]);
    assert_eq!(out["finish_reason"], "length");
    assert!(!out["text"].as_str().unwrap().is_empty());
}

/// `enclave bench` runs concurrent requests through the serving engine and reports each level.
#[test]
fn bench_reports_throughput_and_latency_per_concurrency_level() {
    let out = enclave(&[
        "bench",
        "--model",
        model_dir("qwen2").to_str().unwrap(),
        "--concurrency",
        "1,3",
        "--prompt-len",
        "40",
        "--output-len",
        "5",
        "--shared-prefix",
        "32",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let levels: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(levels.len(), 2);
    assert_eq!(levels[1]["concurrency"], 3);
    assert!(levels[1]["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(levels[1]["ttft_median_s"].as_f64().unwrap() > 0.0);
    // The 32 shared tokens (two blocks) were cached by the first level and reused by the three
    // requests of the second.
    assert_eq!(levels[1]["prefix_hit_tokens"], 3 * 32);
    let bad = enclave(&["bench", "--model", "x", "--kv-cache-memory", "3parsecs"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--kv-cache-memory"),
        "{}",
        stderr(&bad)
    );
}

/// `--model file.gguf` gives what the safetensors folder it was converted from gives.
#[test]
fn a_gguf_file_generates_like_its_folder() {
    let gguf = model_dir("qwen2").join("../../gguf/qwen2-f32.gguf");
    let run = |model: &str| {
        json_out(&[
            "generate",
            "--model",
            model,
            "--chat",
            "Why is the sky blue?",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ])
    };
    let from_gguf = run(gguf.to_str().unwrap());
    let from_dir = run(model_dir("qwen2").to_str().unwrap());
    assert_eq!(from_gguf["prompt_ids"], from_dir["prompt_ids"]);
    assert_eq!(from_gguf["ids"], from_dir["ids"]);
    assert_eq!(from_gguf["text"], from_dir["text"]);
}
