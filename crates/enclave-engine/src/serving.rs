//! The serving loop: many requests at once through one paged KV cache, one forward per step.
//!
//! [`ServingCore`] is the synchronous heart (submit, step, introspect); [`EngineHandle`] runs it
//! on its own thread behind channels, for the HTTP server and the CLI. Each request gets a
//! stream of [`Event`]s; dropping the stream cancels the request, and its blocks are freed at
//! the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use enclave_models::{Logits, ModelError, PagedKvCache, SeqSlice};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::block_manager::BlockManager;
use crate::detokenizer::IncrementalDetokenizer;
use crate::engine::{logprob_of, Engine, FinishReason, GenerateRequest, StopStrings, ValidRequest};
use crate::error::{EngineError, Result};
use crate::sampler::{top_logprobs, Sampler};
use crate::scheduler::{Dropped, Scheduler, SchedulerConfig, SchedulerStats, SeqId};

/// How the serving loop sizes its cache and its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingConfig {
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Bytes of KV cache (all layers); the number of blocks is what fits.
    pub kv_cache_bytes: usize,
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (decode tokens first, then prompt chunks).
    pub max_num_batched_tokens: usize,
    pub prefix_caching: bool,
    /// Requests [`EngineHandle::submit`] accepts beyond `max_num_seqs` before it refuses with
    /// [`EngineError::Overloaded`] (a bounded queue rather than unbounded latency).
    pub max_waiting_requests: usize,
    /// Requests one flow (tenant) may have running and waiting at once, past which its next
    /// is [`EngineError::FlowFull`]; `None`: half of `max_num_seqs + max_waiting_requests`, so
    /// one tenant's flood always leaves room for the others' requests.
    pub max_outstanding_per_flow: Option<usize>,
}

/// The token budget of one forward pass on a CPU. A step's rows cost the same whether they are
/// prompt or decode tokens (~24 ms each for a 1.5B bf16 model on two Zen 3 cores), so the
/// budget bounds how long running streams wait while prompts prefill: 256 rows are ~6 s there,
/// 2048 were ~48 s. The bf16 tiles run at their full rate from ~64 rows, and a 1024-token
/// prompt prefilled faster in chunks of 256 than in one pass there (23-25 s against 31 s: a
/// chunk's activations stay in cache; BENCHMARKS.md, "The token budget").
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS: usize = 256;

impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_bytes: 1 << 30,
            max_num_seqs: 256,
            max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            prefix_caching: true,
            max_waiting_requests: 1024,
            max_outstanding_per_flow: None,
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens found in the prefix cache when the request was admitted.
    pub cached_prompt_tokens: usize,
}

/// A prompt token's log-probability given the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The most likely tokens at this position (as many as the request asked for).
    pub top: Vec<(u32, f32)>,
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Log-probabilities of the prompt's tokens (`None` for the first), sent once before the
    /// first token when the request asked for them.
    PromptLogprobs(Vec<Option<PromptLogprob>>),
    /// One generated token and the text that became final with it (may be empty).
    Token {
        id: u32,
        text: String,
        /// Natural-log probability of `id` under the model's distribution.
        logprob: f32,
        /// The most likely tokens and their log-probabilities, when the request asked for them.
        top_logprobs: Vec<(u32, f32)>,
    },
    /// The last event of a request that completed.
    Finished {
        reason: FinishReason,
        usage: Usage,
        /// The whole generated text (stop strings cut).
        text: String,
    },
    /// The last event of a request the engine could not complete.
    Failed(String),
}

/// One request in flight.
struct Active {
    request: ValidRequest,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    stops: StopStrings,
    generated: usize,
    cached_prompt_tokens: Option<usize>,
    /// Prompt log-probabilities gathered chunk by chunk, until sent.
    prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
    sink: UnboundedSender<Event>,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServingStats {
    pub scheduler: SchedulerStats,
    pub steps: u64,
    /// Requests dropped by their caller before finishing.
    pub cancelled: u64,
    /// Requests accepted into the queue, and their prompt tokens.
    pub submitted: u64,
    pub prompt_tokens: u64,
    /// Tokens sampled for all requests.
    pub generated_tokens: u64,
}

/// Requests, scheduler and KV cache of one model; [`ServingCore::step`] runs one forward.
pub struct ServingCore<'e> {
    engine: &'e Engine,
    cache: PagedKvCache,
    scheduler: Scheduler,
    active: HashMap<SeqId, Active>,
    next_id: SeqId,
    steps: u64,
    cancelled: u64,
    submitted: u64,
    prompt_tokens: u64,
    generated_tokens: u64,
}

impl<'e> ServingCore<'e> {
    pub fn new(engine: &'e Engine, config: &ServingConfig) -> Result<Self> {
        let model = engine.model();
        let cache = PagedKvCache::with_budget(
            model.kv_layout(),
            config.block_size,
            config.kv_cache_bytes,
            engine.model().device(),
        )
        .map_err(ModelError::from)?;
        if cache.num_blocks() == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "a KV cache of {} bytes holds no block of {} tokens ({} bytes each)",
                config.kv_cache_bytes,
                config.block_size,
                cache.bytes_per_block()
            )));
        }
        let blocks =
            BlockManager::new(cache.num_blocks(), config.block_size, config.prefix_caching);
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs.max(1),
                max_num_batched_tokens: config.max_num_batched_tokens.max(1),
            },
            blocks,
        );
        Ok(Self {
            engine,
            cache,
            scheduler,
            active: HashMap::new(),
            next_id: 0,
            steps: 0,
            cancelled: 0,
            submitted: 0,
            prompt_tokens: 0,
            generated_tokens: 0,
        })
    }

    /// Tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.cache.num_blocks() * self.cache.block_size()
    }

    /// Queues a validated request; its events go to `sink`. A prompt that could never fit in
    /// the cache is refused here and never queued.
    pub fn submit(&mut self, request: ValidRequest, sink: UnboundedSender<Event>) -> Result<SeqId> {
        check_fits(request.prompt_ids.len(), self.capacity_tokens())?;
        let id = self.next_id;
        self.next_id += 1;
        self.submitted += 1;
        self.prompt_tokens += request.prompt_ids.len() as u64;
        // Cached prefix blocks hold no logits: a request for prompt log-probabilities computes
        // its whole prompt.
        let wants_prompt_logprobs = request.prompt_logprobs.is_some();
        self.scheduler.add_salted(
            id,
            request.prompt_ids.clone(),
            !wants_prompt_logprobs,
            request.cache_salt,
            request.flow.clone(),
        );
        let tokenizer = self.engine.tokenizer();
        self.active.insert(
            id,
            Active {
                sampler: Sampler::new(request.sampling.clone(), &request.prompt_ids),
                detok: IncrementalDetokenizer::new(tokenizer, &request.prompt_ids, true),
                stops: StopStrings::new(&request.stop),
                generated: 0,
                cached_prompt_tokens: None,
                prompt_logprobs: wants_prompt_logprobs
                    .then(|| vec![None; request.prompt_ids.len()]),
                sink,
                request,
            },
        );
        Ok(id)
    }

    pub fn has_work(&self) -> bool {
        !self.active.is_empty()
    }

    pub fn stats(&self) -> ServingStats {
        ServingStats {
            scheduler: self.scheduler.stats(),
            steps: self.steps,
            cancelled: self.cancelled,
            submitted: self.submitted,
            prompt_tokens: self.prompt_tokens,
            generated_tokens: self.generated_tokens,
        }
    }

    /// Drops requests whose stream is gone, plans a batch, runs one forward over it, and
    /// samples the sequences that reached their last token.
    pub fn step(&mut self) -> Result<()> {
        let cancelled: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.sink.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in cancelled {
            self.scheduler.remove(id);
            self.active.remove(&id);
            self.cancelled += 1;
        }
        let plan = self.scheduler.schedule();
        for (id, why) in &plan.dropped {
            match why {
                Dropped::OutOfCache => self.finish_early(*id, FinishReason::Length),
            }
        }
        if plan.seqs.is_empty() {
            return Ok(());
        }
        let mut marked = false;
        let logits = {
            let mut slices = Vec::with_capacity(plan.seqs.len());
            for s in &plan.seqs {
                let Some((tokens, table)) = self.scheduler.seq(s.id) else {
                    return Err(EngineError::Internal(format!(
                        "scheduled sequence {} is unknown",
                        s.id
                    )));
                };
                let all_logits = self
                    .active
                    .get(&s.id)
                    .is_some_and(|a| a.prompt_logprobs.is_some());
                marked |= all_logits;
                slices.push(SeqSlice {
                    tokens: &tokens[s.start..s.start + s.len],
                    start: s.start,
                    block_table: table,
                    all_logits,
                });
            }
            let which = if marked { Logits::Marked } else { Logits::Last };
            self.engine
                .model()
                .forward_batch(&slices, &self.cache, which)?
                .to_vec2::<f32>()
                .map_err(ModelError::from)?
        };
        self.steps += 1;
        let mut rows = logits.iter();
        for s in &plan.seqs {
            self.scheduler.computed(s.id, s.len);
            let active = self.active.get_mut(&s.id);
            let row = match active {
                Some(active) if active.prompt_logprobs.is_some() => {
                    let chunk: Vec<&Vec<f32>> = rows.by_ref().take(s.len).collect();
                    active.gather_prompt_logprobs(s.start, &chunk);
                    chunk.last().copied()
                }
                _ => rows.next(),
            };
            let Some(row) = row else {
                return Err(EngineError::Internal(
                    "the forward returned fewer logit rows than scheduled".into(),
                ));
            };
            if let Some(active) = self.active.get_mut(&s.id) {
                active.cached_prompt_tokens.get_or_insert(s.start);
            }
            if !s.samples {
                continue;
            }
            let Some(active) = self.active.get_mut(&s.id) else {
                continue;
            };
            let (token, finished) = active.next_token(self.engine, row)?;
            self.generated_tokens += 1;
            self.scheduler.append(s.id, token);
            if let Some(reason) = finished {
                self.scheduler.remove(s.id);
                if let Some(active) = self.active.remove(&s.id) {
                    active.finish(reason);
                }
            }
        }
        Ok(())
    }

    /// Fails every request in flight (after an error the step cannot recover from).
    pub fn fail_all(&mut self, message: &str) {
        for (id, active) in self.active.drain() {
            self.scheduler.remove(id);
            let _ = active.sink.send(Event::Failed(message.to_string()));
        }
    }

    fn finish_early(&mut self, id: SeqId, reason: FinishReason) {
        // Text still held back (an incomplete character or stop-string prefix) is released into
        // the final text only; there is no token to attach it to.
        if let Some(mut active) = self.active.remove(&id) {
            let tail = active
                .detok
                .flush(self.engine.tokenizer())
                .unwrap_or_default();
            active.stops.finish(&tail);
            active.finish(reason);
        }
    }
}

impl Active {
    /// Records the log-probabilities of the prompt tokens that the logit rows of a chunk
    /// starting at `start` predict; sends them all once the chunk reaches the prompt's end.
    fn gather_prompt_logprobs(&mut self, start: usize, rows: &[&Vec<f32>]) {
        let Some(gathered) = self.prompt_logprobs.as_mut() else {
            return;
        };
        let prompt = &self.request.prompt_ids;
        let top = self.request.prompt_logprobs.unwrap_or(0);
        for (k, row) in rows.iter().enumerate() {
            // The logits at position p predict the token at p + 1.
            let next = start + k + 1;
            if let (Some(&id), Some(slot)) = (prompt.get(next), gathered.get_mut(next)) {
                *slot = Some(PromptLogprob {
                    id,
                    logprob: logprob_of(row, id),
                    top: top_logprobs(row, top),
                });
            }
        }
        if start + rows.len() >= prompt.len() {
            if let Some(all) = self.prompt_logprobs.take() {
                let _ = self.sink.send(Event::PromptLogprobs(all));
            }
        }
    }

    /// Samples from `logits`, emits the token event, and says whether the request is done.
    fn next_token(
        &mut self,
        engine: &Engine,
        logits: &[f32],
    ) -> Result<(u32, Option<FinishReason>)> {
        let tokenizer = engine.tokenizer();
        let id = self.sampler.sample(logits);
        self.sampler.record(id);
        let logprob = logprob_of(logits, id);
        self.generated += 1;
        let (text, finished) = if self.request.stop_token_ids.contains(&id) {
            let tail = self.detok.flush(tokenizer)?;
            (self.stops.finish(&tail), Some(FinishReason::Stop))
        } else {
            let delta = self.detok.push(tokenizer, id)?;
            let (text, hit_stop) = self.stops.push(&delta);
            if hit_stop {
                (text, Some(FinishReason::Stop))
            } else if self.generated >= self.request.max_new_tokens {
                let tail = self.detok.flush(tokenizer)?;
                let (more, hit_stop) = self.stops.push(&tail);
                let rest = if hit_stop {
                    String::new()
                } else {
                    self.stops.finish("")
                };
                let reason = if hit_stop {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                };
                (format!("{text}{more}{rest}"), Some(reason))
            } else {
                (text, None)
            }
        };
        let top_logprobs = match self.request.logprobs {
            Some(n) if n > 0 => top_logprobs(logits, n),
            _ => Vec::new(),
        };
        let _ = self.sink.send(Event::Token {
            id,
            text,
            logprob,
            top_logprobs,
        });
        Ok((id, finished))
    }

    fn finish(self, reason: FinishReason) {
        let usage = Usage {
            prompt_tokens: self.request.prompt_ids.len(),
            completion_tokens: self.generated,
            cached_prompt_tokens: self.cached_prompt_tokens.unwrap_or(0),
        };
        let _ = self.sink.send(Event::Finished {
            reason,
            usage,
            text: self.stops.into_text(),
        });
    }
}

fn check_fits(prompt: usize, capacity: usize) -> Result<()> {
    if prompt >= capacity {
        return Err(EngineError::InvalidRequest(format!(
            "the prompt of {prompt} tokens does not fit in the KV cache, which holds {capacity} tokens in all (raise --kv-cache-memory)"
        )));
    }
    Ok(())
}

/// A request's events, in order; dropping it cancels the request.
pub struct RequestStream {
    pub prompt_ids: Vec<u32>,
    receiver: UnboundedReceiver<Event>,
    _slots: (QueueSlot, FlowSlot),
}

/// One accepted request's place in the bounded queue, given back on drop.
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Requests accepted and not yet dropped, by flow.
#[derive(Default)]
struct FlowCounts(Mutex<HashMap<Arc<str>, usize>>);

/// One accepted request's place in its flow's share, given back on drop.
struct FlowSlot {
    counts: Arc<FlowCounts>,
    flow: Arc<str>,
}

impl FlowCounts {
    /// A place for one more request of `flow`, unless it holds `most` already.
    fn take(self: &Arc<Self>, flow: &Arc<str>, most: usize) -> Option<FlowSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = counts.entry(flow.clone()).or_default();
        if *held >= most {
            return None;
        }
        *held += 1;
        Some(FlowSlot {
            counts: self.clone(),
            flow: flow.clone(),
        })
    }

    fn held(&self, flow: &str) -> usize {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(flow).copied().unwrap_or(0)
    }
}

impl Drop for FlowSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = counts.get_mut(&self.flow) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.remove(&self.flow);
            }
        }
    }
}

impl RequestStream {
    /// Stops the request: the engine drops it (freeing its blocks) at its next step, and no
    /// more events come.
    pub fn cancel(&mut self) {
        self.receiver.close();
    }

    /// The next event, or `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        self.receiver.recv().await
    }

    /// An event already sent, without waiting (`None` when none is there now).
    pub fn try_next(&mut self) -> Option<Event> {
        self.receiver.try_recv().ok()
    }

    /// The next event, blocking the thread (for synchronous callers such as the CLI).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.receiver.blocking_recv()
    }
}

enum Command {
    Submit {
        request: ValidRequest,
        sink: UnboundedSender<Event>,
    },
    Shutdown,
    #[cfg(feature = "fault-injection")]
    Panic,
    /// Blocks the engine thread until the sender is dropped (tests only).
    #[cfg(feature = "fault-injection")]
    Hold(std::sync::mpsc::Receiver<()>),
}

/// The serving loop on its own thread. Cloning shares it.
#[derive(Clone)]
pub struct EngineHandle {
    engine: Arc<Engine>,
    commands: Sender<Command>,
    stats: Arc<Mutex<ServingStats>>,
    capacity_tokens: usize,
    /// Requests accepted and not yet dropped by their callers.
    outstanding: Arc<AtomicUsize>,
    max_outstanding: usize,
    by_flow: Arc<FlowCounts>,
    max_outstanding_per_flow: usize,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Starts the loop; the cache is allocated before this returns, so a bad budget is an error
    /// here rather than on the first request.
    pub fn start(engine: Engine, config: ServingConfig) -> Result<Self> {
        let engine = Arc::new(engine);
        let (commands, inbox) = mpsc::channel();
        let stats = Arc::new(Mutex::new(ServingStats::default()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let engine = engine.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("enclave-engine".into())
                .spawn(move || serve(&engine, &config, &inbox, &stats, &ready_tx))
                .map_err(|e| {
                    EngineError::Internal(format!("cannot start the engine thread: {e}"))
                })?
        };
        let capacity_tokens = ready_rx.recv().map_err(|_| {
            EngineError::Internal("the engine thread stopped while starting".into())
        })??;
        let max_outstanding = config
            .max_num_seqs
            .max(1)
            .saturating_add(config.max_waiting_requests);
        Ok(Self {
            engine,
            commands,
            stats,
            capacity_tokens,
            outstanding: Arc::new(AtomicUsize::new(0)),
            max_outstanding,
            by_flow: Arc::default(),
            max_outstanding_per_flow: config
                .max_outstanding_per_flow
                .unwrap_or(max_outstanding.div_ceil(2))
                .clamp(1, max_outstanding),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Validates and queues a request. Everything wrong with it (bad parameters, a prompt longer
    /// than the context or the whole cache) is an error here; it never enters the queue.
    /// A full queue is [`EngineError::Overloaded`].
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream> {
        self.submit_valid(self.engine.validate(request)?)
    }

    /// Queues a request already validated by [`Engine::validate`] (once for several choices,
    /// or off the caller's thread); what only the serving loop knows (the whole cache's size,
    /// the queue's room) is checked here.
    pub fn submit_valid(&self, request: ValidRequest) -> Result<RequestStream> {
        check_fits(request.prompt_ids.len(), self.capacity_tokens)?;
        let before = self.outstanding.fetch_add(1, Ordering::AcqRel);
        let slot = QueueSlot(self.outstanding.clone());
        if before >= self.max_outstanding {
            return Err(EngineError::Overloaded { in_flight: before });
        }
        let Some(flow_slot) = self
            .by_flow
            .take(&request.flow.name, self.max_outstanding_per_flow)
        else {
            return Err(EngineError::FlowFull {
                most: self.max_outstanding_per_flow,
            });
        };
        let (sink, receiver) = unbounded_channel();
        let prompt_ids = request.prompt_ids.clone();
        self.commands
            .send(Command::Submit { request, sink })
            .map_err(|_| EngineError::Internal("the engine thread has stopped".into()))?;
        Ok(RequestStream {
            prompt_ids,
            receiver,
            _slots: (slot, flow_slot),
        })
    }

    /// Most requests accepted at once (running and waiting); past it `submit` is
    /// [`EngineError::Overloaded`].
    pub fn max_outstanding(&self) -> usize {
        self.max_outstanding
    }

    /// Most requests one flow may have accepted at once; past it `submit` is
    /// [`EngineError::FlowFull`] for that flow.
    pub fn max_outstanding_per_flow(&self) -> usize {
        self.max_outstanding_per_flow
    }

    /// Requests of `flow` accepted whose streams are still held.
    pub fn outstanding_in_flow(&self, flow: &str) -> usize {
        self.by_flow.held(flow)
    }

    /// Makes the engine thread panic at its next turn, as a bug would (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn inject_panic(&self) {
        let _ = self.commands.send(Command::Panic);
    }

    /// Stops the engine thread at its next turn until the returned guard is dropped, as a
    /// loaded machine might: what tests then do to requests happens before any step (tests
    /// only). Requests submitted meanwhile wait in its inbox.
    #[cfg(feature = "fault-injection")]
    pub fn inject_hold(&self) -> std::sync::mpsc::Sender<()> {
        let (release, held) = mpsc::channel();
        let _ = self.commands.send(Command::Hold(held));
        release
    }

    /// Whether the engine thread still runs: false after [`Self::shutdown`], or once a step
    /// failed with an internal error (a panic), after which every request fails.
    pub fn is_running(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
            .unwrap_or(false)
    }

    /// Requests accepted whose streams are still held.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Counters as of the last step.
    pub fn stats(&self) -> ServingStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Stops the loop (requests in flight get `Failed`) and waits for the thread.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Ok(mut thread) = self.thread.lock() {
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The engine thread: wait for work when idle, otherwise take new requests and step.
fn serve(
    engine: &Engine,
    config: &ServingConfig,
    inbox: &Receiver<Command>,
    stats: &Mutex<ServingStats>,
    ready: &Sender<Result<usize>>,
) {
    let mut core = match ServingCore::new(engine, config) {
        Ok(core) => {
            let _ = ready.send(Ok(core.capacity_tokens()));
            core
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    loop {
        // A panic in a step (a bug, never an input) must not leave requests hanging: each gets
        // `Failed` with the message, and the thread ends, so `is_running` turns false (the
        // server's health check then reports it). The state it left is not trusted further.
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_turn(&mut core, inbox, stats)
        }));
        match turn {
            Ok(Turn::Continue) => {}
            Ok(Turn::Stop) => return,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                let message = format!("internal error in the engine: {message}");
                core.fail_all(&message);
                // Requests sent but not yet taken in fail too (those the failed turn had taken
                // are gone with it: their streams just end, which the server reports as errors).
                for command in inbox.try_iter() {
                    if let Command::Submit { sink, .. } = command {
                        let _ = sink.send(Event::Failed(message.clone()));
                    }
                }
                if let Ok(mut s) = stats.lock() {
                    *s = core.stats();
                }
                return;
            }
        }
    }
}

enum Turn {
    Continue,
    Stop,
}

/// One turn of the engine loop: new commands, then a step when there is work.
fn serve_turn(
    core: &mut ServingCore<'_>,
    inbox: &Receiver<Command>,
    stats: &Mutex<ServingStats>,
) -> Turn {
    let command = if core.has_work() {
        inbox.try_recv().ok()
    } else {
        // Idle: block, but wake now and then so a closed channel is noticed.
        match inbox.recv_timeout(Duration::from_millis(500)) {
            Ok(c) => Some(c),
            Err(RecvTimeoutError::Timeout) => return Turn::Continue,
            Err(RecvTimeoutError::Disconnected) => return Turn::Stop,
        }
    };
    let mut commands: Vec<Command> = command.into_iter().collect();
    commands.extend(inbox.try_iter());
    for command in commands {
        match command {
            Command::Submit { request, sink } => {
                if let Err(e) = core.submit(request, sink.clone()) {
                    let _ = sink.send(Event::Failed(e.to_string()));
                }
            }
            Command::Shutdown => {
                core.fail_all("the engine is shutting down");
                return Turn::Stop;
            }
            #[cfg(feature = "fault-injection")]
            #[allow(clippy::panic, reason = "the fault tests inject: a bug's panic")]
            Command::Panic => panic!("injected fault"),
            #[cfg(feature = "fault-injection")]
            Command::Hold(held) => {
                let _ = held.recv();
            }
        }
    }
    if core.has_work() {
        if let Err(e) = core.step() {
            core.fail_all(&e.to_string());
        }
    }
    if let Ok(mut s) = stats.lock() {
        *s = core.stats();
    }
    Turn::Continue
}
