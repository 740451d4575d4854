//! The serving loop end to end on real (tiny) models: batching is exact, prefixes are reused,
//! preemption and cancellation lose nothing, and nothing starves.

use std::path::PathBuf;

use enclave_engine::{
    DTypeChoice, Engine, EngineConfig, EngineHandle, Event, FinishReason, GenerateRequest, Prompt,
    RequestStream, SamplingParams, ServingConfig, ServingStats,
};

use crate::{fixtures, shared_fixtures};

/// A model folder ready for `Engine::load`: the DeepSeek-V3 fixture has no tokenizer of its
/// own (it uses the real one from the shared fixtures).
fn model_dir(name: &str) -> (PathBuf, Option<tempfile::TempDir>) {
    let dir = fixtures().join("models").join(name);
    if dir.join("tokenizer.json").is_file() {
        return (dir, None);
    }
    let tmp = tempfile::tempdir().unwrap();
    for file in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(dir.join(file), tmp.path().join(file)).unwrap();
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            shared_fixtures().join("deepseek-v3-tokenizer").join(file),
            tmp.path().join(file),
        )
        .unwrap();
    }
    (tmp.path().to_path_buf(), Some(tmp))
}

fn load(name: &str) -> (Engine, Option<tempfile::TempDir>) {
    let (dir, keep) = model_dir(name);
    let engine = Engine::load(
        &dir,
        &EngineConfig {
            dtype: DTypeChoice::F32,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    (engine, keep)
}

fn greedy(ids: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        sampling: Some(SamplingParams::greedy()),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..GenerateRequest::new(Prompt::TokenIds(ids))
    }
}

/// Deterministic pseudo-random prompt of `len` ids in `1..vocab`.
fn prompt(len: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (1 + (x >> 33) % (vocab as u64 - 1)) as u32
        })
        .collect()
}

/// Drains a stream: the generated ids and how it finished.
fn collect(mut stream: RequestStream) -> (Vec<u32>, FinishReason, enclave_engine::Usage) {
    let mut ids = Vec::new();
    loop {
        match stream.blocking_next() {
            Some(Event::Token { id, .. }) => ids.push(id),
            Some(Event::Finished { reason, usage, .. }) => return (ids, reason, usage),
            Some(Event::Failed(message)) => panic!("request failed: {message}"),
            Some(Event::PromptLogprobs(_)) => {}
            None => panic!("stream ended without a finish event"),
        }
    }
}

/// Counters once the engine is idle (they are published after each step, so a stream's last
/// event can arrive just before the step that sent it is counted).
fn settled(handle: &EngineHandle) -> ServingStats {
    for _ in 0..500 {
        let stats = handle.stats();
        if stats.scheduler.running == 0 && stats.scheduler.waiting == 0 {
            return stats;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("the engine did not become idle: {:?}", handle.stats());
}

fn alone(engine: &Engine, request: GenerateRequest) -> Vec<u32> {
    let valid = engine.validate(request).unwrap();
    engine.generate(&valid, |_| {}).unwrap().ids
}

fn serving(blocks_of_16: usize, engine: &Engine) -> ServingConfig {
    ServingConfig {
        block_size: 16,
        kv_cache_bytes: blocks_of_16 * 16 * engine.model().kv_layout().bytes_per_token(),
        max_num_seqs: 64,
        max_num_batched_tokens: 256,
        prefix_caching: true,
        max_waiting_requests: 4096,
        max_outstanding_per_flow: None,
    }
}

/// 32 concurrent greedy requests, prompts of 1 to 300 tokens and outputs of 1 to 24, give
/// exactly the tokens each gives alone.
#[test]
fn concurrent_requests_give_exactly_what_each_gives_alone() {
    for name in ["qwen2", "llama-llama3-rope", "deepseek-v3"] {
        let (engine, _keep) = load(name);
        let vocab = engine.model().info().vocab_size.min(100_000);
        let context = engine.max_model_len();
        let requests: Vec<GenerateRequest> = (0..32u64)
            .map(|i| {
                let len = (1 + (i as usize * 97) % 300).min(context - 30);
                greedy(prompt(len, i, vocab), 1 + (i as usize * 7) % 24)
            })
            .collect();
        let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&engine, r.clone())).collect();
        let config = serving(1024, &engine);
        let handle = EngineHandle::start(engine, config).unwrap();
        let streams: Vec<RequestStream> = requests
            .into_iter()
            .map(|r| handle.submit(r).unwrap())
            .collect();
        for (i, (stream, want)) in streams.into_iter().zip(&expected).enumerate() {
            let (got, reason, usage) = collect(stream);
            assert_eq!(&got, want, "{name} request {i}");
            assert_eq!(reason, FinishReason::Length);
            assert_eq!(usage.completion_tokens, want.len());
        }
        let stats = handle.stats();
        assert!(
            stats.steps < 32 * 24,
            "{name}: requests were batched ({} steps)",
            stats.steps
        );
        handle.shutdown();
    }
}

/// A second request sharing a 256-token prefix recomputes at most one block of it, and its
/// output is the same with prefix caching on or off.
#[test]
fn a_shared_prefix_is_computed_once() {
    let (engine, _) = load("qwen2");
    let vocab = engine.model().info().vocab_size;
    let prefix = prompt(256, 1, vocab);
    let request = |tail_seed: u64| {
        let mut ids = prefix.clone();
        ids.extend(prompt(20, tail_seed, vocab));
        greedy(ids, 8)
    };
    let mut outputs = Vec::new();
    for caching in [true, false] {
        let (engine, _) = load("qwen2");
        let config = ServingConfig {
            prefix_caching: caching,
            ..serving(256, &engine)
        };
        let handle = EngineHandle::start(engine, config).unwrap();
        let (first, _, _) = collect(handle.submit(request(2)).unwrap());
        let before = settled(&handle).scheduler.tokens_computed;
        let (second, _, usage) = collect(handle.submit(request(3)).unwrap());
        let after = settled(&handle).scheduler;
        let computed = after.tokens_computed - before;
        let blocks = after.blocks;
        if caching {
            // 276 prompt tokens + 7 decode steps; of the 256 shared, at most 16 again.
            assert!(computed <= (276 - 256 + 16) + 7, "computed {computed}");
            assert_eq!(usage.cached_prompt_tokens, 256);
            assert!(blocks.prefix_hits >= 256);
        } else {
            assert_eq!(computed, 276 + 7);
            assert_eq!(usage.cached_prompt_tokens, 0);
        }
        outputs.push((first, second));
        handle.shutdown();
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0].1, alone(&engine, request(3)));
}

/// With a cache too small for every request at once, sequences are preempted and recomputed,
/// and every request still gives exactly its own tokens.
#[test]
fn preempted_requests_still_give_exact_tokens() {
    for name in ["qwen2", "deepseek-v3"] {
        let (engine, _keep) = load(name);
        let vocab = engine.model().info().vocab_size.min(100_000);
        let requests: Vec<GenerateRequest> = (0..8u64)
            .map(|i| greedy(prompt(40 + i as usize * 3, 100 + i, vocab), 40))
            .collect();
        let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&engine, r.clone())).collect();
        // 12 blocks of 16 = 192 tokens; each request grows to ~80-100 tokens.
        let config = serving(12, &engine);
        let handle = EngineHandle::start(engine, config).unwrap();
        let streams: Vec<RequestStream> = requests
            .into_iter()
            .map(|r| handle.submit(r).unwrap())
            .collect();
        for (i, (stream, want)) in streams.into_iter().zip(&expected).enumerate() {
            assert_eq!(&collect(stream).0, want, "{name} request {i}");
        }
        let stats = settled(&handle).scheduler;
        assert!(stats.preemptions > 0, "{name}: no preemption happened");
        assert_eq!(stats.blocks.used, 0);
        handle.shutdown();
    }
}

/// Dropping half of 64 in-flight streams cancels them; once the rest finish, every block is
/// back (used returns to zero).
#[test]
fn cancelled_requests_free_their_blocks() {
    let (engine, _) = load("qwen2");
    let vocab = engine.model().info().vocab_size;
    let config = serving(512, &engine);
    let handle = EngineHandle::start(engine, config).unwrap();
    assert_eq!(handle.stats().scheduler.blocks.used, 0);
    let mut streams: Vec<Option<RequestStream>> = (0..64u64)
        .map(|i| {
            Some(
                handle
                    .submit(greedy(prompt(30, 500 + i, vocab), 60))
                    .unwrap(),
            )
        })
        .collect();
    // Let every request start, then cancel the odd ones mid-generation.
    for stream in streams.iter_mut().flatten() {
        assert!(matches!(stream.blocking_next(), Some(Event::Token { .. })));
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        if i % 2 == 1 {
            *stream = None;
        }
    }
    for stream in streams.into_iter().flatten() {
        let (ids, reason, _) = collect(stream);
        assert_eq!((ids.len(), reason), (59, FinishReason::Length));
    }
    let stats = settled(&handle);
    assert_eq!(stats.scheduler.blocks.used, 0, "blocks leaked");
    assert!(
        handle.stats().cancelled > 0,
        "no request was cancelled mid-flight"
    );
    handle.shutdown();
}

/// 1,000 queued requests against a small cache all finish.
#[test]
fn a_thousand_queued_requests_all_finish() {
    let (engine, _) = load("qwen2");
    let vocab = engine.model().info().vocab_size;
    let config = ServingConfig {
        max_num_seqs: 16,
        ..serving(8, &engine)
    };
    let handle = EngineHandle::start(engine, config).unwrap();
    let streams: Vec<RequestStream> = (0..1000u64)
        .map(|i| {
            handle
                .submit(greedy(
                    prompt(3 + (i % 20) as usize, i, vocab),
                    1 + (i % 3) as usize,
                ))
                .unwrap()
        })
        .collect();
    for stream in streams {
        let (_, reason, _) = collect(stream);
        assert_eq!(reason, FinishReason::Length);
    }
    handle.shutdown();
}

/// Requests that can never run are refused at submission, with the limit in the message.
#[test]
fn prompts_past_the_context_or_the_whole_cache_are_refused_up_front() {
    let (engine, _) = load("qwen2");
    let context = engine.max_model_len();
    let config = serving(4, &engine); // 64 tokens of cache
    let handle = EngineHandle::start(engine, config).unwrap();
    let err = handle
        .submit(greedy(vec![5; 100], 4))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("does not fit in the KV cache, which holds 64 tokens"),
        "{err}"
    );
    let err = handle
        .submit(greedy(vec![5; context + 1], 4))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("maximum context length"), "{err}");
    assert_eq!(handle.stats().scheduler.waiting, 0);
    // The engine still serves.
    let (ids, _, _) = collect(handle.submit(greedy(vec![5; 10], 3)).unwrap());
    assert_eq!(ids.len(), 3);
    handle.shutdown();
}

/// Prompt log-probabilities (for `echo` + `logprobs` and evaluation harnesses) equal those of
/// one full forward, even when the prompt's prefix is in the cache and other requests share the
/// step; generated tokens carry their top alternatives.
#[test]
fn prompt_logprobs_match_a_full_forward() {
    let (engine, _keep) = load("qwen2");
    let vocab = engine.model().info().vocab_size;
    let ids = prompt(70, 11, vocab);
    let expected: Vec<f32> = {
        let mut cache = engine.model().new_cache();
        let logits = engine
            .model()
            .forward(&ids, &mut cache, enclave_models::Logits::All)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        (1..ids.len())
            .map(|k| enclave_engine::sampler::log_softmax(&logits[k - 1])[ids[k] as usize])
            .collect()
    };
    let config = ServingConfig {
        max_num_batched_tokens: 32, // the prompt comes in chunks
        ..serving(64, &engine)
    };
    let handle = EngineHandle::start(engine, config).unwrap();
    // The same prompt once without prompt logprobs, so its prefix blocks are cached.
    collect(handle.submit(greedy(ids.clone(), 2)).unwrap());
    let other = handle.submit(greedy(prompt(50, 12, vocab), 6)).unwrap();
    let mut request = greedy(ids.clone(), 3);
    request.prompt_logprobs = Some(3);
    request.logprobs = Some(2);
    let mut stream = handle.submit(request).unwrap();
    let Some(Event::PromptLogprobs(got)) = stream.blocking_next() else {
        panic!("the first event must carry the prompt logprobs");
    };
    assert_eq!(got.len(), ids.len());
    assert!(got[0].is_none());
    for (k, (lp, want)) in got[1..].iter().zip(&expected).enumerate() {
        let lp = lp.as_ref().unwrap();
        assert_eq!(lp.id, ids[k + 1]);
        assert!(
            (lp.logprob - want).abs() < 1e-4,
            "position {}: {} vs {want}",
            k + 1,
            lp.logprob
        );
        assert_eq!(lp.top.len(), 3);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lp.top[0].1 >= lp.logprob - 1e-6);
    }
    let mut tokens = 0;
    loop {
        match stream.blocking_next() {
            Some(Event::Token {
                logprob,
                top_logprobs,
                ..
            }) => {
                tokens += 1;
                assert_eq!(top_logprobs.len(), 2);
                // Greedy: the chosen token is the most likely one.
                assert!((top_logprobs[0].1 - logprob).abs() < 1e-6);
            }
            Some(Event::Finished { .. }) => break,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(tokens, 3);
    collect(other);
}
