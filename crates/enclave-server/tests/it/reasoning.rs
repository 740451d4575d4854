//! DeepSeek-R1 reasoning output through the API, on the DeepSeek-V3 fixture with the R1 chat
//! template. The fixture's weights are rewritten so that greedy decoding follows a known
//! script (see [`scripted_model`]); everything else (MLA, MoE routing, the real tokenizer and
//! template, the serving loop) runs for real.

use std::collections::HashMap;
use std::path::Path;

use enclave_engine::Tokenizer;
use half::bf16;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};

use crate::{fixtures, server_config, serving_config, shared_fixtures, sse_chunks, TestServer};

const REASONING: &str = "Adding the numbers.";
const ANSWER: &str = "The sum is 4.";

/// Writes the DeepSeek-V3 fixture into `dir` with weights that make greedy decoding a fixed
/// walk: every layer's output projections (`o_proj`, all `down_proj`) are zero, so the final
/// hidden state is the normalised embedding of the last token; the embeddings of the script's
/// tokens are one-hot, and an untied `lm_head` maps token k of the script to token k + 1.
fn scripted_model(dir: &Path, script: &[u32]) {
    let source = fixtures().join("models/deepseek-v3");
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["tie_word_embeddings"] = json!(false);
    let hidden = config["hidden_size"].as_u64().unwrap() as usize;
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    assert!(
        script.len() <= hidden,
        "one embedding dimension per scripted token"
    );

    let as_bf16 = |values: &[f32]| -> Vec<u8> {
        values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect()
    };
    let mut out: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
    for (name, view) in tensors.tensors() {
        assert_eq!(view.dtype(), Dtype::BF16, "{name}");
        let shape = view.shape().to_vec();
        let mut data = view.data().to_vec();
        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            data.fill(0);
        } else if name == "model.norm.weight" {
            data = as_bf16(&vec![1.0; hidden]);
        } else if name == "model.embed_tokens.weight" {
            for (k, &token) in script.iter().enumerate() {
                let mut row = vec![0.0; hidden];
                row[k] = 1.0;
                let at = token as usize * hidden * 2;
                data[at..at + hidden * 2].copy_from_slice(&as_bf16(&row));
            }
        }
        out.insert(name.to_string(), (Dtype::BF16, shape, data));
    }
    let mut head = vec![0.0f32; vocab * hidden];
    for k in 0..script.len() - 1 {
        head[script[k + 1] as usize * hidden + k] = 1.0;
    }
    out.insert(
        "lm_head.weight".into(),
        (Dtype::BF16, vec![vocab, hidden], as_bf16(&head)),
    );
    let views: Vec<(String, TensorView)> = out
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        source.join("generation_config.json"),
        dir.join("generation_config.json"),
    )
    .unwrap();
}

/// A DeepSeek-V3 model folder with the R1 template whose greedy answer to any chat is
/// `REASONING</think>ANSWER` and then end-of-sequence.
fn r1_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_fixtures();
    std::fs::copy(
        shared.join("deepseek-v3-tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    for file in ["tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(shared.join("deepseek-r1").join(file), dir.path().join(file)).unwrap();
    }
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let generation_prompt = tokenizer.encode("<｜Assistant｜><think>\n", false).unwrap();
    let mut script = vec![*generation_prompt.last().unwrap()];
    script.extend(
        tokenizer
            .encode(&format!("{REASONING}</think>{ANSWER}"), false)
            .unwrap(),
    );
    script.push(tokenizer.eos_token_id().unwrap());
    let mut seen = std::collections::HashSet::new();
    assert!(
        script.iter().all(|t| seen.insert(*t)),
        "the script must not repeat a token: {script:?}"
    );
    scripted_model(dir.path(), &script);
    dir
}

fn question() -> Value {
    json!({"messages": [{"role": "user", "content": "What is 2 + 2?"}], "temperature": 0, "max_tokens": 40})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r1_reasoning_is_split_from_the_answer() {
    let dir = r1_fixture();
    let server = TestServer::start(dir.path(), server_config(), serving_config()).await;
    let (status, reply) = server.post("/v1/chat/completions", question()).await;
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], REASONING);
    assert_eq!(message["content"], ANSWER);
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");

    let mut body = question();
    body["stream"] = json!(true);
    let (status, raw) = server.post_raw("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    let (mut reasoning, mut content) = (String::new(), String::new());
    for chunk in sse_chunks(&raw) {
        let delta = &chunk["choices"][0]["delta"];
        if let Some(r) = delta["reasoning_content"].as_str() {
            assert!(content.is_empty(), "all reasoning comes before the answer");
            reasoning += r;
        }
        if let Some(c) = delta["content"].as_str() {
            content += c;
        }
    }
    assert_eq!(reasoning, REASONING);
    assert_eq!(content, ANSWER);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_split_can_be_turned_off() {
    let dir = r1_fixture();
    let config = enclave_server::ServerConfig {
        reasoning_split: false,
        ..server_config()
    };
    let server = TestServer::start(dir.path(), config, serving_config()).await;
    let (status, reply) = server.post("/v1/chat/completions", question()).await;
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none());
    assert_eq!(message["content"], format!("{REASONING}</think>{ANSWER}"));
    server.shutdown().await.unwrap();
}
