//! Which KV-cache blocks each sequence owns: allocation, reference counts, prefix caching and
//! LRU eviction. Pure bookkeeping: no tensors (the model reads and writes the blocks through
//! the block tables this hands out).
//!
//! A full block is found by a hash of its tokens chained with the hash of the block before it;
//! a hit is taken only once the block's own tokens, its cache partition and the block before it
//! (the one just matched, in the same life) are compared equal, so even a 64-bit collision
//! never hands a prompt another prefix's KV. A new prompt reuses the cached blocks of its
//! longest cached prefix. A block whose last user is gone stays cached (and reusable) until a fresh block
//! is needed and none is free; then the least recently used one is evicted.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

/// Block id: an index into the paged cache's pools.
pub type BlockId = u32;

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    /// Prefix hash of the block's content, once full and registered.
    hash: Option<u64>,
    /// What a registered block holds, compared on every hit: its tokens, its cache partition,
    /// and the block before it (with that block's life, so a block evicted and reused since
    /// never vouches for it); `None` for the first block of a prompt.
    content: Option<Box<Registered>>,
    /// Bumped each time the block is evicted and handed out again.
    life: u64,
    /// Last time it was released, for LRU among cached free blocks.
    released_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Registered {
    tokens: Box<[u32]>,
    salt: u64,
    parent: Option<(BlockId, u64)>,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub total: usize,
    /// Blocks referenced by at least one sequence.
    pub used: usize,
    /// Unreferenced blocks that still hold a cached prefix (reusable, evictable).
    pub cached_free: usize,
    /// Unreferenced blocks with nothing worth keeping.
    pub free: usize,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub evictions: u64,
}

/// How far a sequence's full blocks went into the prefix cache: their prefix hashes so far,
/// and how many of its table's blocks were offered for registration.
#[derive(Debug, Clone, Default)]
pub struct PrefixProgress {
    hashes: Vec<u64>,
    registered: usize,
}

impl PrefixProgress {
    /// The sequence got a new block table (preempted, to be recomputed): its hashes still hold
    /// (same tokens), but every block must be offered again.
    pub fn new_table(&mut self) {
        self.registered = 0;
    }
}

/// A prompt's blocks: the table, and how many leading tokens are already in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptBlocks {
    pub table: Vec<BlockId>,
    pub cached_tokens: usize,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    prefix_caching: bool,
    blocks: Vec<Block>,
    /// Unreferenced, unhashed blocks.
    free: Vec<BlockId>,
    /// Unreferenced, hashed blocks by release time (oldest first).
    evictable: BTreeMap<(u64, BlockId), ()>,
    /// Full blocks by prefix hash.
    cached: HashMap<u64, BlockId>,
    /// Keys of the prefix hash, random per process: a 64-bit hash is the cache key, so a
    /// prompt crafted to collide with another's prefix would be served that prefix's KV; with
    /// secret keys no collision can be computed in advance.
    hash_keys: RandomState,
    clock: u64,
    stats: BlockStats,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size: block_size.max(1),
            prefix_caching,
            blocks: vec![Block::default(); num_blocks],
            // Popped from the back: hand out low ids first.
            free: (0..num_blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            cached: HashMap::new(),
            hash_keys: RandomState::new(),
            clock: 0,
            stats: BlockStats {
                total: num_blocks,
                ..BlockStats::default()
            },
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks a sequence of `tokens` tokens occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Blocks that could be handed out now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn stats(&self) -> BlockStats {
        BlockStats {
            used: self.blocks.iter().filter(|b| b.refs > 0).count(),
            cached_free: self.evictable.len(),
            free: self.free.len(),
            ..self.stats
        }
    }

    /// Prefix hashes of the full blocks of `tokens`, in the cache partition `salt` (one per
    /// tenant: blocks are shared only between prompts of the same salt, so no tenant can time
    /// another's cache hits).
    pub fn prefix_hashes(&self, tokens: &[u32], salt: u64) -> Vec<u64> {
        let mut hashes = Vec::new();
        self.extend_prefix_hashes(&mut hashes, tokens, salt);
        hashes
    }

    /// Appends to `hashes` (the prefix hashes of the first `hashes.len()` full blocks of
    /// `tokens`) those of the full blocks after them.
    fn extend_prefix_hashes(&self, hashes: &mut Vec<u64>, tokens: &[u32], salt: u64) {
        let mut parent = hashes.last().copied().unwrap_or(salt);
        let done = hashes.len() * self.block_size;
        for chunk in tokens
            .get(done..)
            .unwrap_or(&[])
            .chunks_exact(self.block_size)
        {
            let mut h = self.hash_keys.build_hasher();
            parent.hash(&mut h);
            chunk.hash(&mut h);
            parent = h.finish();
            hashes.push(parent);
        }
    }

    /// Blocks for a new prompt: the cached blocks of its longest cached prefix (never the block
    /// holding the last prompt token, which must be computed for its logits), then fresh ones
    /// up to `ceil(len / block_size)`. `None`, with nothing changed, when they do not fit.
    /// `reuse: false` takes no cached block (the caller needs every position computed).
    pub fn allocate_prompt(
        &mut self,
        tokens: &[u32],
        reuse: bool,
        salt: u64,
    ) -> Option<PromptBlocks> {
        let needed = self.blocks_for(tokens.len());
        let mut reused = Vec::new();
        if self.prefix_caching && reuse && !tokens.is_empty() {
            let reusable_blocks = (tokens.len() - 1) / self.block_size;
            let mut parent = None;
            for (hash, chunk) in self
                .prefix_hashes(tokens, salt)
                .into_iter()
                .zip(tokens.chunks_exact(self.block_size))
                .take(reusable_blocks)
            {
                let Some(&id) = self.cached.get(&hash) else {
                    break;
                };
                let block = &self.blocks[id as usize];
                let same = block.content.as_deref().is_some_and(|held| {
                    *held.tokens == *chunk && held.salt == salt && held.parent == parent
                });
                if !same {
                    break;
                }
                reused.push(id);
                parent = Some((id, block.life));
            }
        }
        // Reused blocks that sit in the evictable set stop being available once taken.
        let reused_evictable = reused
            .iter()
            .filter(|&&id| self.blocks[id as usize].refs == 0)
            .count();
        if needed - reused.len() > self.available() - reused_evictable {
            return None;
        }
        if self.prefix_caching && reuse {
            self.stats.prefix_queries += tokens.len() as u64;
            self.stats.prefix_hits += (reused.len() * self.block_size) as u64;
        }
        for &id in &reused {
            self.acquire(id);
        }
        let cached_tokens = reused.len() * self.block_size;
        let mut table = reused;
        while table.len() < needed {
            let Some(id) = self.take_fresh() else {
                // Checked above; unreachable unless the counts are wrong. Undo and refuse.
                self.release(&table);
                return None;
            };
            table.push(id);
        }
        Some(PromptBlocks {
            table,
            cached_tokens,
        })
    }

    /// Grows `table` so it covers `tokens` tokens; `false`, with nothing changed, when no block
    /// is available.
    pub fn grow(&mut self, table: &mut Vec<BlockId>, tokens: usize) -> bool {
        let needed = self.blocks_for(tokens);
        if needed.saturating_sub(table.len()) > self.available() {
            return false;
        }
        while table.len() < needed {
            match self.take_fresh() {
                Some(id) => table.push(id),
                None => return false,
            }
        }
        true
    }

    /// Registers the full blocks of a sequence (whose first `tokens.len()` tokens are now
    /// computed) in the prefix cache, so later prompts can reuse them. `progress` is the
    /// sequence's own, kept across calls: each call hashes and registers only the blocks filled
    /// since the last (re-hashing every token each step would cost O(length²) per sequence).
    pub fn register_full_blocks(
        &mut self,
        table: &[BlockId],
        tokens: &[u32],
        salt: u64,
        progress: &mut PrefixProgress,
    ) {
        if !self.prefix_caching {
            return;
        }
        self.extend_prefix_hashes(&mut progress.hashes, tokens, salt);
        // Only blocks full of computed tokens: after a preemption the hashes still cover blocks
        // computed before it, whose new blocks hold nothing yet.
        let full = (tokens.len() / self.block_size)
            .min(progress.hashes.len())
            .min(table.len());
        let from = progress.registered;
        if full <= from {
            return;
        }
        progress.registered = full;
        for i in from..full {
            let (hash, id) = (progress.hashes[i], table[i]);
            if self.blocks[id as usize].hash.is_some() {
                continue;
            }
            // A block is cached only after the one before it, which it names: if that one is
            // not the cached copy of its prefix (another block computed it concurrently), this
            // one stays private too.
            let parent = match i.checked_sub(1) {
                None => None,
                Some(before) => {
                    let prev = table[before];
                    if self.cached.get(&progress.hashes[before]) != Some(&prev) {
                        continue;
                    }
                    Some((prev, self.blocks[prev as usize].life))
                }
            };
            // Another block may already hold this prefix (computed concurrently): keep that one
            // as the cached copy; this block stays private and is freed normally.
            if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
                e.insert(id);
                let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
                let block = &mut self.blocks[id as usize];
                block.hash = Some(hash);
                block.content = Some(Box::new(Registered {
                    tokens: chunk.into(),
                    salt,
                    parent,
                }));
            }
        }
    }

    /// Drops a sequence's references; blocks nobody uses become free (or stay cached).
    /// Last block first: a prefix is found only from its first block on, so its later blocks
    /// must be the older, evicted before the blocks they depend on (as vLLM frees them).
    pub fn release(&mut self, table: &[BlockId]) {
        for &id in table.iter().rev() {
            self.clock += 1;
            let block = &mut self.blocks[id as usize];
            if block.refs == 0 {
                continue; // not held: releasing twice must not list it twice
            }
            block.refs -= 1;
            if block.refs > 0 {
                continue;
            }
            block.released_at = self.clock;
            if block.hash.is_some() {
                self.evictable.insert((self.clock, id), ());
            } else {
                self.free.push(id);
            }
        }
    }

    fn acquire(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        if block.refs == 0 {
            self.evictable.remove(&(block.released_at, id));
        }
        block.refs += 1;
    }

    /// A block with no content anyone needs: a free one, else the least recently released
    /// cached one (evicted from the prefix cache).
    fn take_fresh(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (&(at, id), _) = self.evictable.iter().next()?;
                self.evictable.remove(&(at, id));
                let block = &mut self.blocks[id as usize];
                if let Some(hash) = block.hash.take() {
                    self.cached.remove(&hash);
                }
                block.content = None;
                block.life += 1;
                self.stats.evictions += 1;
                id
            }
        };
        self.blocks[id as usize].refs = 1;
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn allocation_counts_and_release_return_blocks() {
        let mut m = BlockManager::new(8, 4, false);
        let a = m.allocate_prompt(&tokens(9, 0), true, 0).unwrap();
        assert_eq!(a.table.len(), 3);
        assert_eq!(a.cached_tokens, 0);
        assert_eq!(m.stats().used, 3);
        let mut table = a.table.clone();
        assert!(m.grow(&mut table, 12));
        assert_eq!(table.len(), 3);
        assert!(m.grow(&mut table, 13));
        assert_eq!(table.len(), 4);
        m.release(&table);
        let s = m.stats();
        assert_eq!((s.used, s.free, s.cached_free), (0, 8, 0));
    }

    #[test]
    fn a_prompt_that_does_not_fit_changes_nothing() {
        let mut m = BlockManager::new(4, 4, true);
        let a = m.allocate_prompt(&tokens(12, 0), true, 0).unwrap();
        let before = m.stats();
        assert_eq!(m.allocate_prompt(&tokens(8, 1), true, 0), None);
        assert_eq!(m.stats(), before);
        let mut t = a.table.clone();
        assert!(m.grow(&mut t, 16));
        assert!(!m.grow(&mut t, 17));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn cached_blocks_serve_only_prompts_of_the_same_salt() {
        let mut m = BlockManager::new(16, 4, true);
        let prompt = tokens(10, 0);
        let a = m.allocate_prompt(&prompt, true, 7).unwrap();
        m.register_full_blocks(&a.table, &prompt, 7, &mut PrefixProgress::default());
        for salt in [0, 8] {
            assert_eq!(
                m.allocate_prompt(&prompt, true, salt)
                    .unwrap()
                    .cached_tokens,
                0
            );
        }
        assert_eq!(
            m.allocate_prompt(&prompt, true, 7).unwrap().cached_tokens,
            8
        );
        assert_ne!(m.prefix_hashes(&prompt, 7), m.prefix_hashes(&prompt, 8));
    }

    #[test]
    fn cached_prefix_is_reused_but_never_the_last_tokens_block() {
        let mut m = BlockManager::new(16, 4, true);
        let prompt = tokens(10, 0);
        let a = m.allocate_prompt(&prompt, true, 0).unwrap();
        m.register_full_blocks(&a.table, &prompt, 0, &mut PrefixProgress::default());
        // Same first 8 tokens, then different: reuses 2 blocks.
        let mut other = prompt[..8].to_vec();
        other.extend([1000, 1001, 1002]);
        let b = m.allocate_prompt(&other, true, 0).unwrap();
        assert_eq!(b.cached_tokens, 8);
        assert_eq!(b.table[..2], a.table[..2]);
        assert_ne!(b.table[2], a.table[2]);
        // Exactly 8 tokens: the second block holds the last token, so only one is reused.
        let c = m.allocate_prompt(&prompt[..8], true, 0).unwrap();
        assert_eq!(c.cached_tokens, 4);
        let s = m.stats();
        assert_eq!(s.prefix_hits, 8 + 4);
        assert_eq!(s.prefix_queries, 10 + 11 + 8);
        // A caller that needs every position computed gets fresh blocks only.
        let d = m.allocate_prompt(&other, false, 0).unwrap();
        assert_eq!(d.cached_tokens, 0);
        assert!(d.table.iter().all(|id| !a.table.contains(id)));
    }

    /// A 64-bit hash collision (forged here by pointing a prompt's hash at another prompt's
    /// block) is no hit: the block's tokens, or the block before it, differ.
    #[test]
    fn a_hash_collision_is_never_a_hit() {
        let mut m = BlockManager::new(16, 2, true);
        // A = [1 2 | 3 4 | 5], W = [9 9 | 3 4 | 5]: equal second blocks, different first ones.
        let a_prompt = vec![1, 2, 3, 4, 5];
        let w_prompt = vec![9, 9, 3, 4, 5];
        let a = m.allocate_prompt(&a_prompt, true, 0).unwrap();
        m.register_full_blocks(&a.table, &a_prompt[..4], 0, &mut PrefixProgress::default());
        let w = m.allocate_prompt(&w_prompt[..3], true, 0).unwrap();
        m.register_full_blocks(&w.table, &w_prompt[..2], 0, &mut PrefixProgress::default());
        // Another prompt's first block hashing like A's: its tokens differ.
        let other = vec![7, 7, 7];
        let forged = m.prefix_hashes(&other, 0)[0];
        m.cached.insert(forged, a.table[0]);
        assert_eq!(m.allocate_prompt(&other, true, 0).unwrap().cached_tokens, 0);
        // W's second block hashing like A's: same tokens, but A's follows another block.
        let w_hashes = m.prefix_hashes(&w_prompt, 0);
        m.cached.insert(w_hashes[1], a.table[1]);
        let hit = m.allocate_prompt(&w_prompt, true, 0).unwrap();
        assert_eq!(hit.cached_tokens, 2, "W's own first block only");
        assert_eq!(hit.table[0], w.table[0]);
        // And the real prefix still hits in full.
        assert_eq!(
            m.allocate_prompt(&a_prompt, true, 0).unwrap().cached_tokens,
            4
        );
        // Another partition's salt never matches, even at the same hash.
        let salted = m.prefix_hashes(&a_prompt, 5)[0];
        m.cached.insert(salted, a.table[0]);
        assert_eq!(
            m.allocate_prompt(&a_prompt, true, 5).unwrap().cached_tokens,
            0
        );
    }

    #[test]
    fn released_cached_blocks_stay_reusable_until_evicted_lru() {
        let mut m = BlockManager::new(4, 2, true);
        let p1 = tokens(5, 0);
        let a = m.allocate_prompt(&p1, true, 0).unwrap();
        m.register_full_blocks(&a.table, &p1[..4], 0, &mut PrefixProgress::default());
        m.release(&a.table);
        assert_eq!(m.stats().cached_free, 2);
        // Reuse after release.
        let b = m.allocate_prompt(&p1, true, 0).unwrap();
        assert_eq!(b.cached_tokens, 4);
        m.release(&b.table);
        // A different prompt needing all 4 blocks evicts the cached ones (oldest first).
        let p2 = tokens(8, 500);
        let c = m.allocate_prompt(&p2, true, 0).unwrap();
        assert_eq!(c.cached_tokens, 0);
        assert_eq!(m.stats().evictions, 2);
        m.release(&c.table);
        let d = m.allocate_prompt(&p1, true, 0).unwrap();
        assert_eq!(d.cached_tokens, 0, "evicted prefixes are gone");
    }

    #[test]
    fn a_cached_prefix_loses_its_last_blocks_first() {
        let mut m = BlockManager::new(4, 2, true);
        let p = tokens(7, 0);
        let a = m.allocate_prompt(&p, true, 0).unwrap();
        m.register_full_blocks(&a.table, &p, 0, &mut PrefixProgress::default());
        m.release(&a.table);
        assert_eq!((m.stats().cached_free, m.stats().free), (3, 1));
        // Two blocks for another prompt: the free one and one evicted.
        let b = m.allocate_prompt(&tokens(4, 900), true, 0).unwrap();
        assert_eq!(m.stats().evictions, 1);
        m.release(&b.table);
        // The evicted block was the prefix's last: its first two blocks are still found.
        assert_eq!(m.allocate_prompt(&p, true, 0).unwrap().cached_tokens, 4);
    }

    #[test]
    fn blocks_registered_step_by_step_are_those_registered_at_once() {
        let mut m = BlockManager::new(16, 4, true);
        let p = tokens(23, 1);
        let a = m.allocate_prompt(&p, true, 0).unwrap();
        let mut progress = PrefixProgress::default();
        for computed in [3, 4, 9, 9, 17, 23] {
            m.register_full_blocks(&a.table, &p[..computed], 0, &mut progress);
        }
        assert_eq!(progress.hashes, m.prefix_hashes(&p, 0));
        assert_eq!(progress.registered, 5);
        let mut longer = p.clone();
        longer.push(5);
        assert_eq!(
            m.allocate_prompt(&longer, true, 0).unwrap().cached_tokens,
            20
        );
    }

    #[test]
    fn a_recomputed_sequence_offers_only_the_blocks_it_computed_again() {
        let mut m = BlockManager::new(3, 2, true);
        let p = tokens(5, 2);
        let a = m.allocate_prompt(&p, true, 0).unwrap();
        let mut progress = PrefixProgress::default();
        m.register_full_blocks(&a.table, &p[..4], 0, &mut progress);
        m.release(&a.table);
        // Another prompt takes every block, evicting both cached ones.
        let b = m.allocate_prompt(&tokens(6, 700), true, 0).unwrap();
        assert_eq!(m.stats().evictions, 2);
        m.release(&b.table);
        // The first sequence comes back (after a preemption) with a new table, and has computed
        // its first block again: that block is offered, not the second (whose KV is not there).
        let c = m.allocate_prompt(&p, true, 0).unwrap();
        assert_eq!(c.cached_tokens, 0);
        progress.new_table();
        m.register_full_blocks(&c.table, &p[..3], 0, &mut progress);
        m.release(&c.table);
        assert_eq!(m.allocate_prompt(&p, true, 0).unwrap().cached_tokens, 2);
    }

    #[test]
    fn shared_blocks_are_freed_only_when_the_last_user_leaves() {
        let mut m = BlockManager::new(8, 2, true);
        let p = tokens(7, 3);
        let a = m.allocate_prompt(&p, true, 0).unwrap();
        m.register_full_blocks(&a.table, &p, 0, &mut PrefixProgress::default());
        let b = m.allocate_prompt(&p, true, 0).unwrap();
        assert_eq!(b.cached_tokens, 6);
        assert_eq!(m.stats().used, 5); // 4 of a + 1 fresh of b
        m.release(&a.table);
        assert_eq!(m.stats().used, 4); // b still holds the three shared ones and its own
        m.release(&b.table);
        let s = m.stats();
        assert_eq!((s.used, s.cached_free + s.free), (0, 8));
    }

    #[test]
    fn without_prefix_caching_nothing_is_shared_or_counted() {
        let mut m = BlockManager::new(8, 2, false);
        let p = tokens(7, 3);
        let a = m.allocate_prompt(&p, true, 0).unwrap();
        m.register_full_blocks(&a.table, &p, 0, &mut PrefixProgress::default());
        let b = m.allocate_prompt(&p, true, 0).unwrap();
        assert_eq!(b.cached_tokens, 0);
        assert_eq!(m.stats().prefix_queries, 0);
    }
}
