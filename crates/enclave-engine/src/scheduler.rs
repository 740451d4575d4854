//! Continuous batching: which sequences run in the next forward, and how many of their tokens.
//!
//! Each step takes running sequences first (their next decode token, or the next chunk of a
//! prompt still being prefilled), oldest first, then admits waiting requests while the token
//! budget, the sequence limit and the KV-cache blocks allow. Waiting requests belong to flows
//! (tenants): the next admitted is the oldest of the flow with the highest priority and, among
//! equals, the least service so far for its weight — start-time fair queuing, each admission
//! advancing its flow's virtual time by `1 / weight`, and a flow that falls idle rejoining at
//! the current virtual time, so it cannot bank credit. One tenant's burst therefore cannot take
//! every place that frees while others wait: weighted fair shares of admission in strict
//! priority bands, as Triton's priority levels and llm-d's flow control order requests.
//! Within a flow it is first come, first served. A prompt is
//! admitted only with blocks for all of it (reusing cached prefix blocks), and is prefilled in
//! chunks so one long prompt never stalls everyone's decoding. When a running sequence needs a
//! block and none is left, the newest running sequence is preempted: its blocks are freed and it
//! goes back to the front of the queue, to be recomputed from its tokens later.
//!
//! Pure bookkeeping over token ids and block ids: it never touches tensors.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::block_manager::{BlockId, BlockManager, BlockStats, PrefixProgress};

/// Identifies a sequence for the caller (one per request).
pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one forward.
    pub max_num_seqs: usize,
    /// Most tokens in one forward (prefill chunks plus decode tokens).
    pub max_num_batched_tokens: usize,
}

/// Whose share of the engine a sequence draws on (its tenant), and how that share is sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub name: Arc<str>,
    /// Admissions relative to other flows of the same priority when they compete (1 to 1000).
    pub weight: u32,
    /// Higher is admitted first whenever it waits.
    pub priority: i32,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            name: Arc::from(""),
            weight: 1,
            priority: 0,
        }
    }
}

#[derive(Debug)]
struct Seq {
    id: SeqId,
    flow: Flow,
    /// Prompt and generated tokens so far.
    tokens: Vec<u32>,
    /// Leading tokens whose KV is in the cache.
    computed: usize,
    table: Vec<BlockId>,
    /// May start from cached prefix blocks (false when every position must be computed).
    reuse_prefix: bool,
    /// The prefix-cache partition it shares blocks in (its tenant's).
    cache_salt: u64,
    /// Its full blocks hashed and offered to the prefix cache so far.
    prefix: PrefixProgress,
}

/// Longest prefill chunk of a sequence that computes its whole prompt for prompt
/// log-probabilities: the step returns logits for every one of its positions (chunk × vocab
/// floats, 150 MB for 256 tokens of a 152k vocabulary), so its chunks stay short.
pub const ALL_LOGITS_CHUNK: usize = 256;

impl Seq {
    fn max_chunk(&self) -> usize {
        if self.reuse_prefix {
            usize::MAX
        } else {
            ALL_LOGITS_CHUNK
        }
    }
}

/// One sequence's part of a step: run `tokens[start..start + len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the last known token: the forward's logits give the next token.
    pub samples: bool,
}

/// Why a sequence left the scheduler without the caller finishing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Alone in the cache and still out of blocks: it can never grow further.
    OutOfCache,
}

/// A step's plan.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences that cannot continue (the caller finishes them).
    pub dropped: Vec<(SeqId, Dropped)>,
}

impl Schedule {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub preemptions: u64,
    /// Tokens run through the model (prefill chunks and decode tokens).
    pub tokens_computed: u64,
    pub blocks: BlockStats,
}

/// One flow's standing in fair queuing.
#[derive(Debug, Default)]
struct FlowState {
    /// Virtual time of its next admission, in [`VIRTUAL_UNIT`]s.
    virtual_time: u64,
    /// Its sequences waiting or running; the flow is forgotten at zero.
    seqs: usize,
    /// Its sequences waiting: a flow with none that gets one rejoins at its band's clock.
    waiting: usize,
}

/// One admission of a weight-1 flow in virtual time (divisible by every weight up to 16; for
/// larger weights the rounding is under 0.2 % up to the largest allowed, 1000).
const VIRTUAL_UNIT: u64 = 720_720;

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    flows: HashMap<Arc<str>, FlowState>,
    /// Per priority band, the latest virtual finish time admitted (never moving back): where a
    /// flow of that band that had nothing waiting starts again, so it cannot bank credit.
    virtual_clocks: HashMap<i32, u64>,
    waiting: VecDeque<Seq>,
    /// Admission order: the last is the newest, the first to be preempted.
    running: Vec<Seq>,
    preemptions: u64,
    tokens_computed: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            config,
            blocks,
            flows: HashMap::new(),
            virtual_clocks: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            tokens_computed: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.blocks.block_size()
    }

    /// Whether a sequence of `tokens` tokens could ever fit in the cache alone.
    pub fn fits_alone(&self, tokens: usize) -> bool {
        self.blocks.blocks_for(tokens) <= self.blocks.stats().total
    }

    /// Queues a new sequence (its prompt) behind those already waiting. With `reuse_prefix`
    /// false its prompt is computed in full even where the prefix cache holds it.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, reuse_prefix: bool) {
        self.add_salted(id, prompt, reuse_prefix, 0, Flow::default());
    }

    /// [`Self::add`] in the prefix-cache partition `cache_salt` (it reuses, and its blocks
    /// serve, only sequences of the same salt) and in `flow`.
    pub fn add_salted(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        reuse_prefix: bool,
        cache_salt: u64,
        flow: Flow,
    ) {
        self.flows.entry(flow.name.clone()).or_default().seqs += 1;
        self.now_waiting(&flow);
        self.waiting.push_back(Seq {
            id,
            flow,
            tokens: prompt,
            computed: 0,
            table: Vec::new(),
            reuse_prefix,
            cache_salt,
            prefix: PrefixProgress::default(),
        });
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            preemptions: self.preemptions,
            tokens_computed: self.tokens_computed,
            blocks: self.blocks.stats(),
        }
    }

    /// The tokens and block table of a sequence, for building the forward.
    pub fn seq(&self, id: SeqId) -> Option<(&[u32], &[BlockId])> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
            .map(|s| (s.tokens.as_slice(), s.table.as_slice()))
    }

    /// Plans the next forward.
    pub fn schedule(&mut self) -> Schedule {
        let mut plan = Schedule::default();
        let mut budget = self.config.max_num_batched_tokens;
        let preemptions_before = self.preemptions;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let remaining = self.running[i].tokens.len() - self.running[i].computed;
            let len = remaining.min(budget).min(self.running[i].max_chunk());
            if len == 0 {
                i += 1;
                continue;
            }
            let target = self.running[i].computed + len;
            let mut table = std::mem::take(&mut self.running[i].table);
            let grown = loop {
                if self.blocks.grow(&mut table, target) {
                    break true;
                }
                // Out of blocks: free the newest sequence other than this one, if any.
                if self.running.len() - 1 > i {
                    self.preempt_newest();
                } else {
                    break false;
                }
            };
            self.running[i].table = table;
            if !grown {
                if i == 0 && self.running.len() == 1 {
                    // Alone and still out of blocks: it can never continue.
                    let seq = self.running.remove(i);
                    self.blocks.release(&seq.table);
                    self.forget(&seq.flow.name, false);
                    plan.dropped.push((seq.id, Dropped::OutOfCache));
                } else {
                    // This one is the newest: preempt it too.
                    self.preempt_newest();
                }
                continue;
            }
            let seq = &self.running[i];
            plan.seqs.push(ScheduledSeq {
                id: seq.id,
                start: seq.computed,
                len,
                samples: target == seq.tokens.len(),
            });
            budget -= len;
            i += 1;
        }
        // After a preemption the cache is full: admitting now would only preempt again.
        let admit = self.preemptions == preemptions_before;
        while admit && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(next) = self.next_waiting() else {
                break;
            };
            let front = &self.waiting[next];
            let Some(blocks) =
                self.blocks
                    .allocate_prompt(&front.tokens, front.reuse_prefix, front.cache_salt)
            else {
                break; // its turn: nobody jumps it while it waits for blocks
            };
            let Some(mut seq) = self.waiting.remove(next) else {
                break;
            };
            if let Some(state) = self.flows.get_mut(&seq.flow.name) {
                state.waiting = state.waiting.saturating_sub(1);
                state.virtual_time += VIRTUAL_UNIT / u64::from(seq.flow.weight.clamp(1, 1000));
                // The clock is the last admission's finish: a flow forgotten between its
                // requests (none left) restarts there, not at zero.
                let clock = self.virtual_clocks.entry(seq.flow.priority).or_default();
                *clock = (*clock).max(state.virtual_time);
            }
            seq.table = blocks.table;
            seq.computed = blocks.cached_tokens;
            let len = (seq.tokens.len() - seq.computed)
                .min(budget)
                .min(seq.max_chunk());
            plan.seqs.push(ScheduledSeq {
                id: seq.id,
                start: seq.computed,
                len,
                samples: seq.computed + len == seq.tokens.len(),
            });
            budget -= len;
            self.running.push(seq);
        }
        plan
    }

    /// The waiting sequence to admit next: the oldest of its flow, from the flow of the highest
    /// priority and then the earliest virtual time (ties: the oldest). Linear in the waiting
    /// queue, which the serving loop bounds.
    fn next_waiting(&self) -> Option<usize> {
        let mut best: Option<(usize, i32, u64)> = None;
        let mut seen: Vec<&str> = Vec::new();
        for (at, seq) in self.waiting.iter().enumerate() {
            let flow = &seq.flow;
            if seen.contains(&&*flow.name) {
                continue;
            }
            seen.push(&flow.name);
            let virtual_time = self.flows.get(&flow.name).map_or(0, |f| f.virtual_time);
            let better = best.is_none_or(|(_, priority, time)| {
                flow.priority > priority || (flow.priority == priority && virtual_time < time)
            });
            if better {
                best = Some((at, flow.priority, virtual_time));
            }
        }
        best.map(|(at, _, _)| at)
    }

    /// A sequence of `flow` joins the waiting queue (new, or preempted): a flow that had
    /// nothing waiting rejoins no earlier than its band's clock.
    fn now_waiting(&mut self, flow: &Flow) {
        let clock = self
            .virtual_clocks
            .get(&flow.priority)
            .copied()
            .unwrap_or(0);
        if let Some(state) = self.flows.get_mut(&flow.name) {
            if state.waiting == 0 {
                state.virtual_time = state.virtual_time.max(clock);
            }
            state.waiting += 1;
        }
    }

    /// A sequence of `flow` left for good (`was_waiting`: from the queue): the flow is
    /// forgotten with its last.
    fn forget(&mut self, flow: &str, was_waiting: bool) {
        if let Some(state) = self.flows.get_mut(flow) {
            if was_waiting {
                state.waiting = state.waiting.saturating_sub(1);
            }
            state.seqs = state.seqs.saturating_sub(1);
            if state.seqs == 0 {
                self.flows.remove(flow);
            }
        }
    }

    /// Records that the scheduled chunk of `id` was computed; full blocks join the prefix cache.
    pub fn computed(&mut self, id: SeqId, len: usize) {
        if let Some(seq) = self.running.iter_mut().find(|s| s.id == id) {
            seq.computed += len;
            self.tokens_computed += len as u64;
            self.blocks.register_full_blocks(
                &seq.table,
                &seq.tokens[..seq.computed],
                seq.cache_salt,
                &mut seq.prefix,
            );
        }
    }

    /// Appends a sampled token to a running sequence.
    pub fn append(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.running.iter_mut().find(|s| s.id == id) {
            seq.tokens.push(token);
        }
    }

    /// Removes a sequence (finished or cancelled) wherever it is, freeing its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(at) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(at);
            self.blocks.release(&seq.table);
            self.forget(&seq.flow.name, false);
        } else if let Some(at) = self.waiting.iter().position(|s| s.id == id) {
            if let Some(seq) = self.waiting.remove(at) {
                self.blocks.release(&seq.table);
                self.forget(&seq.flow.name, true);
            }
        }
    }

    fn preempt_newest(&mut self) {
        if let Some(mut seq) = self.running.pop() {
            self.blocks.release(&seq.table);
            seq.table.clear();
            seq.prefix.new_table();
            seq.computed = 0;
            self.preemptions += 1;
            self.now_waiting(&seq.flow);
            self.waiting.push_front(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(blocks: usize, max_seqs: usize, max_tokens: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: max_seqs,
                max_num_batched_tokens: max_tokens,
            },
            BlockManager::new(blocks, 4, true),
        )
    }

    /// Runs a plan as the engine would: every sampling sequence gets token 7.
    fn run(s: &mut Scheduler, plan: &Schedule) {
        for seq in &plan.seqs {
            s.computed(seq.id, seq.len);
            if seq.samples {
                s.append(seq.id, 7);
            }
        }
    }

    #[test]
    fn prompts_that_need_every_logit_come_in_short_chunks() {
        let mut s = scheduler(1024, 8, 2048);
        s.add(1, vec![1; 600], false);
        s.add(2, vec![2; 600], true);
        let plan = s.schedule();
        let lens: Vec<(SeqId, usize)> = plan.seqs.iter().map(|q| (q.id, q.len)).collect();
        assert_eq!(lens, [(1, ALL_LOGITS_CHUNK), (2, 600)]);
        run(&mut s, &plan);
        let plan = s.schedule();
        assert_eq!(plan.seqs[0].start, ALL_LOGITS_CHUNK);
        assert_eq!(plan.seqs[0].len, ALL_LOGITS_CHUNK);
    }

    #[test]
    fn decodes_come_first_and_long_prompts_are_chunked() {
        let mut s = scheduler(64, 8, 10);
        s.add(1, vec![1; 3], true);
        let plan = s.schedule();
        assert_eq!(
            plan.seqs,
            vec![ScheduledSeq {
                id: 1,
                start: 0,
                len: 3,
                samples: true
            }]
        );
        run(&mut s, &plan);
        s.add(2, vec![2; 25], true);
        // Step: 1 decode token for seq 1, then a 9-token chunk of seq 2.
        let plan = s.schedule();
        assert_eq!(
            plan.seqs,
            vec![
                ScheduledSeq {
                    id: 1,
                    start: 3,
                    len: 1,
                    samples: true
                },
                ScheduledSeq {
                    id: 2,
                    start: 0,
                    len: 9,
                    samples: false
                },
            ]
        );
        run(&mut s, &plan);
        let plan = s.schedule();
        assert_eq!(
            plan.seqs[0],
            ScheduledSeq {
                id: 1,
                start: 4,
                len: 1,
                samples: true
            }
        );
        assert_eq!(
            plan.seqs[1],
            ScheduledSeq {
                id: 2,
                start: 9,
                len: 9,
                samples: false
            }
        );
        run(&mut s, &plan);
        let plan = s.schedule();
        assert_eq!(
            plan.seqs[1],
            ScheduledSeq {
                id: 2,
                start: 18,
                len: 7,
                samples: true
            }
        );
        assert!(plan.num_tokens() <= 10);
    }

    #[test]
    fn sequence_limit_and_fcfs_admission() {
        let mut s = scheduler(64, 2, 100);
        for id in 1..=3 {
            s.add(id, vec![id as u32; 4], true);
        }
        let plan = s.schedule();
        let ids: Vec<SeqId> = plan.seqs.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(s.stats().waiting, 1);
        run(&mut s, &plan);
        s.remove(1);
        let plan = s.schedule();
        let ids: Vec<SeqId> = plan.seqs.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![2, 3]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
        // 4 blocks of 4 tokens; two sequences of 8 tokens fill the cache.
        let mut s = scheduler(4, 8, 100);
        s.add(1, vec![1; 8], true);
        s.add(2, vec![2; 8], true);
        let plan = s.schedule();
        assert_eq!(plan.seqs.len(), 2);
        run(&mut s, &plan);
        // Seq 1 needs a fifth block for its 9th token: seq 2 (newest) is preempted.
        let plan = s.schedule();
        assert_eq!(
            plan.seqs,
            vec![ScheduledSeq {
                id: 1,
                start: 8,
                len: 1,
                samples: true
            }]
        );
        let stats = s.stats();
        assert_eq!((stats.preemptions, stats.running, stats.waiting), (1, 1, 1));
        run(&mut s, &plan);
        s.remove(1);
        // Seq 2 comes back with its generated token and recomputes (8 prompt + 1 generated),
        // reusing its own cached full blocks.
        let plan = s.schedule();
        assert_eq!(plan.seqs.len(), 1);
        assert_eq!(plan.seqs[0].id, 2);
        assert_eq!(plan.seqs[0].start + plan.seqs[0].len, 9);
        assert!(plan.seqs[0].samples);
    }

    #[test]
    fn a_sequence_alone_without_blocks_is_dropped_not_looped() {
        let mut s = scheduler(2, 8, 100);
        s.add(1, vec![1; 8], true);
        let plan = s.schedule();
        run(&mut s, &plan);
        let plan = s.schedule();
        assert!(plan.seqs.is_empty());
        assert_eq!(plan.dropped, vec![(1, Dropped::OutOfCache)]);
        assert!(!s.has_work());
        assert_eq!(s.stats().blocks.used, 0);
    }

    #[test]
    fn removing_a_waiting_sequence_takes_it_out_of_the_queue() {
        let mut s = scheduler(16, 1, 100);
        for id in 1..=3 {
            s.add(id, vec![id as u32; 6], true);
        }
        let ids = |plan: &Schedule| plan.seqs.iter().map(|q| q.id).collect::<Vec<_>>();
        let plan = s.schedule();
        assert_eq!(ids(&plan), [1]);
        s.remove(2); // never admitted
        assert_eq!((s.stats().running, s.stats().waiting), (1, 1));
        run(&mut s, &plan);
        s.remove(1);
        let plan = s.schedule();
        assert_eq!(ids(&plan), [3], "the removed sequence is never scheduled");
        run(&mut s, &plan);
        s.remove(3);
        assert!(!s.has_work());
        assert_eq!(s.stats().blocks.used, 0);
    }

    #[test]
    fn removing_frees_every_block() {
        let mut s = scheduler(16, 8, 100);
        for id in 0..4 {
            s.add(id, vec![id as u32; 6], true);
        }
        let plan = s.schedule();
        run(&mut s, &plan);
        assert!(s.stats().blocks.used > 0);
        for id in 0..4 {
            s.remove(id);
        }
        assert_eq!(s.stats().blocks.used, 0);
    }

    fn flow(name: &str, weight: u32, priority: i32) -> Flow {
        Flow {
            name: Arc::from(name),
            weight,
            priority,
        }
    }

    /// Admits one sequence per step (a budget of one prompt) and says whose it was.
    fn admitted_flows(s: &mut Scheduler, steps: usize) -> Vec<SeqId> {
        let mut order = Vec::new();
        for _ in 0..steps {
            let plan = s.schedule();
            for q in plan.seqs.iter().filter(|q| q.start == 0) {
                order.push(q.id);
            }
            run(s, &plan);
        }
        order
    }

    #[test]
    fn a_burst_from_one_flow_does_not_take_the_places_others_wait_for() {
        // Two running slots; flow a queues six before flow b's two arrive.
        let mut s = scheduler(256, 2, 100);
        for id in 0..6 {
            s.add_salted(id, vec![1; 4], true, 0, flow("a", 1, 0));
        }
        for id in 10..12 {
            s.add_salted(id, vec![2; 4], true, 0, flow("b", 1, 0));
        }
        // Not a's first two: a's oldest, then b's (a has had one admission, b none); then each
        // slot that frees goes to the flow served less.
        let plan = s.schedule();
        let first: Vec<SeqId> = plan.seqs.iter().map(|q| q.id).collect();
        assert_eq!(first, [0, 10]);
        run(&mut s, &plan);
        s.remove(0);
        let plan = s.schedule();
        assert_eq!(
            plan.seqs.last().map(|q| q.id),
            Some(1),
            "a's turn, then b's"
        );
        run(&mut s, &plan);
        s.remove(10);
        let plan = s.schedule();
        assert_eq!(plan.seqs.last().map(|q| q.id), Some(11), "b's turn again");
    }

    #[test]
    fn with_one_slot_two_flows_take_turns() {
        let mut s = scheduler(256, 1, 100);
        for id in 0..4 {
            s.add_salted(id, vec![1; 4], true, 0, flow("a", 1, 0));
        }
        for id in 10..12 {
            s.add_salted(id, vec![2; 4], true, 0, flow("b", 1, 0));
        }
        let mut order = Vec::new();
        while s.has_work() {
            let plan = s.schedule();
            run(&mut s, &plan);
            let id = plan.seqs[0].id;
            order.push(id);
            s.remove(id);
        }
        assert_eq!(order, [0, 10, 1, 11, 2, 3]);
    }

    #[test]
    fn an_idle_flow_rejoins_at_the_current_virtual_time() {
        // b is served alone six times; a, idle all that while, then arrives: it must not be
        // owed six admissions in a row.
        let mut s = scheduler(256, 1, 100);
        for id in 0..10 {
            s.add_salted(id, vec![1; 4], true, 0, flow("b", 1, 0));
        }
        let next = |s: &mut Scheduler| {
            let plan = s.schedule();
            run(s, &plan);
            let id = plan.seqs[0].id;
            s.remove(id);
            id
        };
        for id in 0..6 {
            assert_eq!(next(&mut s), id);
        }
        for id in 10..14 {
            s.add_salted(id, vec![2; 4], true, 0, flow("a", 1, 0));
        }
        // a rejoins level with b (ties go to the older request), then they alternate.
        let order: Vec<SeqId> = (0..4).map(|_| next(&mut s)).collect();
        assert_eq!(order, [6, 10, 7, 11]);
    }

    #[test]
    fn a_flow_that_only_ran_banks_no_credit_while_others_are_served() {
        // a keeps one long sequence running while b is admitted eight times; then a floods.
        let mut s = scheduler(1024, 2, 100);
        s.add_salted(100, vec![1; 4], true, 0, flow("a", 1, 0));
        let plan = s.schedule();
        run(&mut s, &plan);
        for id in 0..8 {
            s.add_salted(id, vec![2; 4], true, 0, flow("b", 1, 0));
            let plan = s.schedule();
            run(&mut s, &plan);
            s.remove(id);
        }
        for id in 200..206 {
            s.add_salted(id, vec![1; 4], true, 0, flow("a", 1, 0));
        }
        for id in 10..13 {
            s.add_salted(id, vec![2; 4], true, 0, flow("b", 1, 0));
        }
        // One slot frees at a time (a's long one stays): a and b take turns.
        let mut order: Vec<SeqId> = Vec::new();
        for _ in 0..4 {
            let plan = s.schedule();
            run(&mut s, &plan);
            let admitted: Vec<SeqId> = plan
                .seqs
                .iter()
                .filter(|q| q.start == 0)
                .map(|q| q.id)
                .collect();
            order.extend(&admitted);
            for id in admitted {
                s.remove(id);
            }
        }
        assert_eq!(order, [200, 10, 201, 11]);
    }

    #[test]
    fn weights_share_the_running_slots() {
        // Twelve slots, both flows with plenty waiting: a (weight 3) gets nine, b three.
        let mut s = scheduler(1024, 12, 1000);
        for id in 0..20 {
            s.add_salted(id, vec![1; 4], true, 0, flow("a", 3, 0));
            s.add_salted(100 + id, vec![2; 4], true, 0, flow("b", 1, 0));
        }
        let plan = s.schedule();
        let a = plan.seqs.iter().filter(|q| q.id < 100).count();
        assert_eq!((a, plan.seqs.len() - a), (9, 3));
    }

    #[test]
    fn a_higher_priority_is_admitted_first_whatever_it_holds() {
        let mut s = scheduler(1024, 4, 1000);
        for id in 0..4 {
            s.add_salted(id, vec![1; 4], true, 0, flow("batch", 1, 0));
        }
        for id in 10..13 {
            s.add_salted(id, vec![2; 4], true, 0, flow("interactive", 1, 5));
        }
        let order = admitted_flows(&mut s, 1);
        assert_eq!(order, [10, 11, 12, 0]);
    }

    #[test]
    fn one_flow_alone_is_first_come_first_served() {
        let mut s = scheduler(1024, 3, 1000);
        for id in 0..5 {
            s.add_salted(id, vec![id as u32; 4], true, 0, flow("a", 1, 0));
        }
        let order = admitted_flows(&mut s, 1);
        assert_eq!(order, [0, 1, 2]);
    }
}
