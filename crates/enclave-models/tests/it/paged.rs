//! Batched forwards over a shared paged cache: sequences at different positions, with
//! scattered blocks, in one forward, give exactly the logits each gives alone; sequences that
//! share prefix blocks reuse them without recomputing.

use enclave_models::{DType, Device, Logits, Model, PagedKvCache, SeqSlice};

use crate::numerics::{goldens, load_model, max_abs_diff};

const BLOCK: usize = 4;

/// Hands out blocks in a scrambled order so no sequence's blocks are contiguous.
struct Blocks {
    next: usize,
    total: usize,
}

impl Blocks {
    fn take(&mut self) -> u32 {
        let b = (self.next * 37) % self.total;
        self.next += 1;
        b as u32
    }
}

fn cache_for(model: &Model, blocks: usize) -> PagedKvCache {
    PagedKvCache::new(model.kv_layout(), BLOCK, blocks, &Device::Cpu).unwrap()
}

fn rows(t: enclave_models::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

#[test]
fn a_mixed_batch_gives_each_sequence_its_own_logits() {
    for name in [
        "qwen2",
        "llama-llama3-rope",
        "deepseek-v2-lite",
        "deepseek-v3",
    ] {
        let model = load_model(name, DType::F32);
        let goldens = goldens(name);
        // 37 is coprime with 128, so `Blocks` visits every block once, scrambled.
        let total_blocks = 128;
        let mut blocks = Blocks {
            next: 0,
            total: total_blocks,
        };
        let cache = cache_for(&model, total_blocks);
        let mut tables: Vec<Vec<u32>> = vec![Vec::new(); goldens.len()];
        let mut done = vec![0usize; goldens.len()];
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); goldens.len()];
        let mut step = 0usize;
        while done.iter().zip(&goldens).any(|(d, g)| *d < g.ids.len()) {
            // Chunk sizes vary by sequence and step: a first step of long prefill chunks, then a
            // mix of 1-token decodes and small chunks.
            let plan: Vec<(usize, usize)> = goldens
                .iter()
                .enumerate()
                .filter(|(i, g)| done[*i] < g.ids.len())
                .map(|(i, g)| {
                    let want = if step == 0 {
                        g.ids.len() / 2 + 1
                    } else {
                        1 + (i + step) % 3
                    };
                    (i, want.min(g.ids.len() - done[i]))
                })
                .collect();
            for &(i, n) in &plan {
                while tables[i].len() * BLOCK < done[i] + n {
                    tables[i].push(blocks.take());
                }
            }
            let seqs: Vec<SeqSlice> = plan
                .iter()
                .map(|&(i, n)| SeqSlice {
                    tokens: &goldens[i].ids[done[i]..done[i] + n],
                    start: done[i],
                    block_table: &tables[i],
                    all_logits: false,
                })
                .collect();
            let out = rows(model.forward_batch(&seqs, &cache, Logits::All).unwrap());
            let mut r = 0;
            for &(i, n) in &plan {
                got[i].extend(out[r..r + n].iter().cloned());
                r += n;
                done[i] += n;
            }
            assert_eq!(r, out.len());
            step += 1;
        }
        for (i, golden) in goldens.iter().enumerate() {
            for (pos, (ours, theirs)) in got[i].iter().zip(&golden.logits).enumerate() {
                let diff = max_abs_diff(&golden.columns(ours), theirs);
                assert!(diff <= 1e-4, "{name} prompt {i} position {pos}: {diff}");
            }
        }
    }
}

/// A second sequence whose block table starts with a first sequence's full blocks runs only its
/// own suffix, and gets the logits it gets when computed from scratch.
#[test]
fn shared_prefix_blocks_are_reused_not_recomputed() {
    for name in ["qwen2", "deepseek-v3"] {
        let model = load_model(name, DType::F32);
        let prompt = &goldens(name)[1].ids;
        assert!(prompt.len() > 2 * BLOCK);
        let prefix = 2 * BLOCK;
        let cache = cache_for(&model, 32);
        let a_table: Vec<u32> = (0..prompt.len().div_ceil(BLOCK) as u32).collect();
        model
            .forward_batch(
                &[SeqSlice {
                    tokens: prompt,
                    start: 0,
                    block_table: &a_table,
                    all_logits: false,
                }],
                &cache,
                Logits::Last,
            )
            .unwrap();
        // B = the same two blocks of prefix, then a different continuation.
        let mut b_tokens: Vec<u32> = prompt[..prefix].to_vec();
        b_tokens.extend([5, 6, 7]);
        let mut b_table: Vec<u32> = a_table[..2].to_vec();
        b_table.push(20);
        let shared = rows(
            model
                .forward_batch(
                    &[SeqSlice {
                        tokens: &b_tokens[prefix..],
                        start: prefix,
                        block_table: &b_table,
                        all_logits: false,
                    }],
                    &cache,
                    Logits::All,
                )
                .unwrap(),
        );
        let mut alone = model.new_cache();
        let fresh = rows(model.forward(&b_tokens, &mut alone, Logits::All).unwrap());
        for (pos, row) in shared.iter().enumerate() {
            let diff = max_abs_diff(row, &fresh[prefix + pos]);
            assert!(diff <= 1e-4, "{name} suffix position {pos}: {diff}");
        }
    }
}

#[test]
fn block_tables_too_short_or_outside_the_cache_are_errors() {
    let model = load_model("qwen2", DType::F32);
    let cache = cache_for(&model, 2);
    let tokens = [1u32, 2, 3, 4, 5];
    let short = model.forward_batch(
        &[SeqSlice {
            tokens: &tokens,
            start: 0,
            block_table: &[0],
            all_logits: false,
        }],
        &cache,
        Logits::Last,
    );
    assert!(short
        .unwrap_err()
        .to_string()
        .contains("does not cover position 4"));
    let outside = model.forward_batch(
        &[SeqSlice {
            tokens: &tokens,
            start: 0,
            block_table: &[0, 9],
            all_logits: false,
        }],
        &cache,
        Logits::Last,
    );
    assert!(outside
        .unwrap_err()
        .to_string()
        .contains("block 9 is outside the cache"));
}
