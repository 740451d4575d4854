//! Loading a model folder as a whole (weights, tokenizer, chat template, generation config) and
//! generating for one request.

use std::path::{Path, PathBuf};

use enclave_models::layers::activation::log_sum_exp;
use enclave_models::{DType, Device, LoadOptions, Model};
use tokio::sync::mpsc::unbounded_channel;

use crate::chat_template::ChatTemplate;
use crate::error::{EngineError, Result};
use crate::generation_config::GenerationConfig;
use crate::sampler::SamplingParams;
use crate::scheduler::Flow;
use crate::serving::{Event, ServingConfig, ServingCore};
use crate::tokenizer::Tokenizer;

/// The compute dtype asked for on the command line or in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeChoice {
    /// The fastest dtype that is correct on the device (see [`DTypeChoice::resolve`]).
    Auto,
    F32,
    BF16,
    F16,
}

impl DTypeChoice {
    /// The weight dtype to load. `auto` keeps a bf16 checkpoint in bf16 (exactly the stored
    /// values; on CPU activations stay f32 and weights are widened as they are read, which
    /// halves memory and makes decoding ~1.5x faster, BENCHMARKS.md) and loads anything else
    /// in f32 (f16 has no fast CPU kernel here, and f32 checkpoints stay exact).
    pub fn resolve(self, device: &Device, checkpoint: Option<DType>) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::BF16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::Auto => match checkpoint {
                Some(DType::BF16) => DType::BF16,
                Some(DType::F16) if !device.is_cpu() => DType::F16,
                _ if device.is_cpu() => DType::F32,
                _ => DType::BF16,
            },
        }
    }
}

/// How to load an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub dtype: DTypeChoice,
    pub device: Device,
    /// Longest sequence (prompt + completion) served; defaults to the model's
    /// `max_position_embeddings` and may only lower it.
    pub max_model_len: Option<usize>,
    /// Quantize the projection matrices at load (see [`WeightFormat`]).
    pub quantize: WeightFormat,
}

/// How projection matrices are held in memory (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// In the loaded dtype; a GGUF file is dequantised into it.
    #[default]
    Dense,
    /// Quantized into GGML blocks at load (any checkpoint, GGUF files re-quantized).
    Quantize(enclave_models::Quantization),
    /// A GGUF file's own blocks, as llama.cpp computes with them (dense for safetensors).
    Gguf,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            dtype: DTypeChoice::Auto,
            device: Device::Cpu,
            max_model_len: None,
            quantize: WeightFormat::Dense,
        }
    }
}

/// What a request asks to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text, encoded with the tokenizer's special tokens (BOS where it says so).
    Text(String),
    /// Token ids as they are.
    TokenIds(Vec<u32>),
    /// OpenAI-shaped messages, rendered with the chat template and a generation prompt.
    Chat(Vec<serde_json::Value>),
}

/// A generation request before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// `None`: the model's defaults from `generation_config.json`.
    pub sampling: Option<SamplingParams>,
    /// `None`: until a stop condition or the end of the context.
    pub max_tokens: Option<usize>,
    /// Strings that end generation; they are not part of the returned text.
    pub stop: Vec<String>,
    /// Token ids that end generation, in addition to the model's end-of-sequence ids.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-sequence ids.
    pub ignore_eos: bool,
    /// Report the log-probability of each generated token with this many most likely
    /// alternatives (0 to [`MAX_TOP_LOGPROBS`]); `None` reports the chosen token's only.
    pub logprobs: Option<usize>,
    /// Report the log-probability of every prompt token after the first (with this many
    /// alternatives). The whole prompt is then computed: cached prefixes hold no logits.
    pub prompt_logprobs: Option<usize>,
    /// The prefix-cache partition: requests share cached prompt blocks only with requests of
    /// the same salt. The server sets it from the authenticated tenant, never from the body.
    pub cache_salt: Option<String>,
    /// Whose share of the engine the request draws on (the server sets its tenant's).
    pub flow: Flow,
}

/// A partition number for a salt string (never 0, the unsalted partition).
fn salt_of(salt: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    salt.hash(&mut h);
    h.finish().max(1)
}

/// Most alternatives a request may ask for per position (as vLLM and OpenAI's chat API).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Most stop strings in one request, and most bytes in one: every generated token is matched
/// against each of them on the engine thread that all requests share, so an unbounded list
/// would slow everyone's decoding. OpenAI takes 4; lm-evaluation-harness's completions client
/// sends a task's whole list (rarely over 8).
pub const MAX_STOP_STRINGS: usize = 16;
/// Most bytes in one stop string (see [`MAX_STOP_STRINGS`]).
pub const MAX_STOP_BYTES: usize = 512;

impl GenerateRequest {
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            sampling: None,
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            cache_salt: None,
            flow: Flow::default(),
        }
    }
}

/// A request that passed validation: tokenized, bounded, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Alternatives to report per generated token (`None`: none).
    pub logprobs: Option<usize>,
    /// Alternatives to report per prompt position (`None`: no prompt log-probabilities).
    pub prompt_logprobs: Option<usize>,
    /// Prefix-cache partition (0: the one of requests without a salt).
    pub cache_salt: u64,
    pub flow: Flow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
    /// Ended at the edge by a content policy (a sensitive value in the output); the engine
    /// itself never finishes so.
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ContentFilter => "content_filter",
        }
    }
}

/// One generated token as it is produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent<'a> {
    pub id: u32,
    /// Text that became final with this token (may be empty while a character or a possible
    /// stop string is incomplete).
    pub text: &'a str,
    /// Natural-log probability of `id` under the raw logits.
    pub logprob: f32,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// A loaded model with everything needed to turn text into text.
pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    generation_config: GenerationConfig,
    max_model_len: usize,
    model_dir: PathBuf,
}

impl Engine {
    /// Loads a Hugging Face model folder, or a GGUF file.
    pub fn load(dir: &Path, config: &EngineConfig) -> Result<Self> {
        if dir.is_file()
            && dir
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Self::load_gguf(dir, config);
        }
        if !dir.is_dir() {
            return Err(EngineError::File {
                path: dir.to_path_buf(),
                message: "model folder not found".into(),
            });
        }
        if config.quantize == WeightFormat::Gguf {
            return Err(EngineError::File {
                path: dir.to_path_buf(),
                message: "--quantize gguf keeps a GGUF file's blocks, but this is a model folder \
                          (use q8_0 or q4_k)"
                    .into(),
            });
        }
        // Cheap files first, so a broken tokenizer is reported before gigabytes are read.
        let tokenizer = Tokenizer::from_dir(dir)?;
        let chat_template = ChatTemplate::from_model_dir(
            dir,
            tokenizer.config(),
            tokenizer.special_tokens().clone(),
        )?;
        let generation_config = GenerationConfig::from_dir(dir)?;
        let options = LoadOptions {
            dtype: config
                .dtype
                .resolve(&config.device, enclave_models::checkpoint_dtype(dir)?),
            device: config.device.clone(),
        };
        let mut model = Model::load(dir, &options)?;
        if let WeightFormat::Quantize(quantization) = config.quantize {
            model.quantize(quantization)?;
        }
        model.pack_for_cpu()?;
        let max_model_len = Self::context_limit(&model, config)?;
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            generation_config,
            max_model_len,
            model_dir: dir.to_path_buf(),
        })
    }

    /// A GGUF file: weights, tokenizer, chat template and stop tokens all come from it.
    fn load_gguf(path: &Path, config: &EngineConfig) -> Result<Self> {
        let file = enclave_models::GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(file.metadata(), path)?;
        let chat_template = match tokenizer
            .config()
            .get("chat_template")
            .and_then(|t| t.as_str())
        {
            Some(source) => Some(ChatTemplate::new(
                source.to_string(),
                tokenizer.special_tokens().clone(),
            )?),
            None => None,
        };
        let mut generation_config = GenerationConfig::default();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = file
                .metadata()
                .get(key)
                .and_then(enclave_models::gguf::number)
            {
                generation_config.eos_token_ids.push(id as u32);
            }
        }
        // Chat models end a turn with their end-of-turn token (Gemma's `<end_of_turn>`), which
        // llama.cpp recognises by its text; files rarely name it.
        generation_config
            .eos_token_ids
            .extend(crate::gguf_tokenizer::end_of_turn_ids(file.metadata()));
        let checkpoint = if file.all_f32() {
            DType::F32
        } else {
            DType::BF16
        };
        let options = LoadOptions {
            dtype: config.dtype.resolve(&config.device, Some(checkpoint)),
            device: config.device.clone(),
        };
        if config.quantize == WeightFormat::Gguf && !config.device.is_cpu() {
            return Err(EngineError::File {
                path: path.to_path_buf(),
                message: "--quantize gguf computes on the CPU only for now".into(),
            });
        }
        let mut model = match config.quantize {
            WeightFormat::Gguf => Model::from_gguf(file, &options)?,
            WeightFormat::Dense | WeightFormat::Quantize(_) => {
                Model::from_gguf_dequantized(file, &options)?
            }
        };
        if let WeightFormat::Quantize(quantization) = config.quantize {
            model.quantize(quantization)?;
        }
        model.pack_for_cpu()?;
        let max_model_len = Self::context_limit(&model, config)?;
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            generation_config,
            max_model_len,
            model_dir: path.to_path_buf(),
        })
    }

    /// `--max-model-len` checked against the model's context.
    fn context_limit(model: &Model, config: &EngineConfig) -> Result<usize> {
        let limit = model.info().max_position_embeddings;
        match config.max_model_len {
            Some(n) if n > limit => Err(EngineError::InvalidRequest(format!(
                "--max-model-len {n} exceeds the model's max_position_embeddings ({limit})"
            ))),
            Some(0) => Err(EngineError::InvalidRequest(
                "--max-model-len must be at least 1".into(),
            )),
            Some(n) => Ok(n),
            None => Ok(limit),
        }
    }

    /// One line for start-up logs: architecture, size, dtype and KV-cache bytes per token.
    pub fn summary(&self) -> String {
        let info = self.model.info();
        let quantized = if info.quantized_projections.is_empty() {
            String::new()
        } else {
            let formats: Vec<String> = info
                .quantized_projections
                .iter()
                .map(|(dtype, n)| format!("{n} {dtype:?}"))
                .collect();
            format!(" (projections in blocks: {})", formats.join(", "))
        };
        format!(
            "{}: {} layers, {:.1} MB of {:?} weights{quantized}, {:?} activations, KV cache {} bytes/token, context {} tokens",
            info.architecture.hf_name(),
            info.num_layers,
            info.weight_bytes as f64 / 1e6,
            info.dtype,
            info.activation_dtype,
            info.kv_bytes_per_token,
            self.max_model_len,
        )
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation_config
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The longest text worth tokenizing: no token is shorter than a byte, and real ones
    /// average 3-4, so more than 16 bytes per token of the context can never fit.
    pub fn max_text_bytes(&self) -> usize {
        self.max_model_len.saturating_mul(16)
    }

    /// Refuses `text` longer than [`Self::max_text_bytes`] before any tokenizing, which for
    /// megabytes would cost seconds of a core for a request that cannot fit anyway.
    pub fn check_text_len(&self, text: &str) -> Result<()> {
        let limit = self.max_text_bytes();
        if text.len() > limit {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt is {} bytes; this model's context of {} tokens never holds more \
                 than {limit} bytes of text",
                text.len(),
                self.max_model_len
            )));
        }
        Ok(())
    }

    /// Renders a conversation with the model's chat template, with a generation prompt.
    pub fn render_chat(&self, messages: &[serde_json::Value]) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "{} has no chat template (chat_template.jinja or tokenizer_config.json)",
                self.model_dir.display()
            ))
        })?;
        template.render(messages, None, true)
    }

    /// Tokenizes and bounds a request: everything that can be wrong with it is reported here.
    pub fn validate(&self, request: GenerateRequest) -> Result<ValidRequest> {
        let prompt_ids = match &request.prompt {
            Prompt::Text(text) => {
                self.check_text_len(text)?;
                self.tokenizer.encode(text, true)?
            }
            Prompt::TokenIds(ids) => ids.clone(),
            Prompt::Chat(messages) => {
                let text = self.render_chat(messages)?;
                self.check_text_len(&text)?;
                // The template writes its own BOS, so no special tokens are added again.
                self.tokenizer.encode(&text, false)?
            }
        };
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let vocab = self.model.info().vocab_size;
        if let Some(&bad) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let sampling = request
            .sampling
            .unwrap_or_else(|| self.generation_config.default_sampling());
        sampling.validate().map_err(EngineError::InvalidRequest)?;
        let prompt = prompt_ids.len();
        let max_new_tokens = match request.max_tokens {
            Some(0) => {
                return Err(EngineError::InvalidRequest(
                    "`max_tokens` must be at least 1, got 0".into(),
                ))
            }
            Some(n) => n,
            None => self.max_model_len.saturating_sub(prompt).max(1),
        };
        let requested = prompt.saturating_add(max_new_tokens);
        if requested > self.max_model_len {
            return Err(EngineError::ContextOverflow {
                limit: self.max_model_len,
                requested,
                prompt,
                completion: max_new_tokens,
            });
        }
        let mut stop_token_ids = request.stop_token_ids.clone();
        if !request.ignore_eos {
            stop_token_ids.extend(&self.generation_config.eos_token_ids);
            if let Some(eos) = self.tokenizer.eos_token_id() {
                stop_token_ids.push(eos);
            }
        }
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        for (name, n) in [
            ("logprobs", request.logprobs),
            ("prompt_logprobs", request.prompt_logprobs),
        ] {
            if let Some(n) = n.filter(|&n| n > MAX_TOP_LOGPROBS) {
                return Err(EngineError::InvalidRequest(format!(
                    "`{name}` must be at most {MAX_TOP_LOGPROBS}, got {n}"
                )));
            }
        }
        if request.stop.len() > MAX_STOP_STRINGS {
            return Err(EngineError::InvalidRequest(format!(
                "`stop` takes at most {MAX_STOP_STRINGS} strings, got {}",
                request.stop.len()
            )));
        }
        if let Some((i, long)) = request
            .stop
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_STOP_BYTES)
        {
            return Err(EngineError::InvalidRequest(format!(
                "`stop` strings may be at most {MAX_STOP_BYTES} bytes long; string {i} has {}",
                long.len()
            )));
        }
        let stop: Vec<String> = request.stop.into_iter().filter(|s| !s.is_empty()).collect();
        Ok(ValidRequest {
            prompt_ids,
            sampling,
            max_new_tokens,
            stop,
            stop_token_ids,
            logprobs: request.logprobs,
            prompt_logprobs: request.prompt_logprobs,
            cache_salt: request.cache_salt.as_deref().map_or(0, salt_of),
            flow: request.flow,
        })
    }

    /// Generates for one request, calling `on_token` as each token is produced. Runs through
    /// the serving loop ([`ServingCore`]) with a cache sized for exactly this request, so one
    /// request and many take the same code path.
    pub fn generate(
        &self,
        request: &ValidRequest,
        mut on_token: impl FnMut(&TokenEvent<'_>),
    ) -> Result<Generation> {
        let block_size = 16;
        let tokens = request.prompt_ids.len() + request.max_new_tokens;
        let config = ServingConfig {
            block_size,
            kv_cache_bytes: (tokens.div_ceil(block_size) + 1)
                * block_size
                * self.model.kv_layout().bytes_per_token(),
            max_num_seqs: 1,
            // Prompt chunks as the server takes them (faster than the whole prompt at once).
            max_num_batched_tokens: crate::serving::DEFAULT_MAX_NUM_BATCHED_TOKENS,
            prefix_caching: false,
            max_waiting_requests: 0,
            max_outstanding_per_flow: None,
        };
        let mut core = ServingCore::new(self, &config)?;
        let (sink, mut events) = unbounded_channel();
        core.submit(request.clone(), sink)?;
        let mut ids = Vec::new();
        let mut logprobs = Vec::new();
        loop {
            core.step()?;
            while let Ok(event) = events.try_recv() {
                match event {
                    Event::Token {
                        id, text, logprob, ..
                    } => {
                        ids.push(id);
                        logprobs.push(logprob);
                        on_token(&TokenEvent {
                            id,
                            text: &text,
                            logprob,
                        });
                    }
                    Event::Finished { reason, text, .. } => {
                        return Ok(Generation {
                            prompt_ids: request.prompt_ids.clone(),
                            ids,
                            text,
                            logprobs,
                            finish_reason: reason,
                        })
                    }
                    Event::Failed(message) => return Err(EngineError::Internal(message)),
                    Event::PromptLogprobs(_) => {}
                }
            }
            if !core.has_work() {
                return Err(EngineError::Internal(
                    "the request ended without a finish event".into(),
                ));
            }
        }
    }
}

/// Log-probability of one token under `logits` (log-softmax evaluated at `id` only).
pub(crate) fn logprob_of(logits: &[f32], id: u32) -> f32 {
    let chosen = logits
        .get(id as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY) as f64;
    (chosen - log_sum_exp(logits)) as f32
}

/// Finds stop strings in the generated text and holds back text that could still become one,
/// so a stop string is never emitted, even in part.
pub(crate) struct StopStrings {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopStrings {
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds decoded text; returns what may be emitted now and whether a stop string was hit
    /// (the text is then cut just before it).
    pub(crate) fn push(&mut self, delta: &str) -> (String, bool) {
        let search_from = self
            .text
            .len()
            .saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        self.text.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                let from = floor_char_boundary(&self.text, search_from);
                self.text[from..].find(s.as_str()).map(|i| from + i)
            })
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            return (self.take(self.text.len()), true);
        }
        let held = self
            .stops
            .iter()
            .map(|s| partial_suffix_len(&self.text, s))
            .max()
            .unwrap_or(0);
        (self.take(self.text.len() - held), false)
    }

    /// Adds the final text and releases everything held back.
    pub(crate) fn finish(&mut self, tail: &str) -> String {
        let (mut out, hit) = self.push(tail);
        if !hit {
            out.push_str(&self.take(self.text.len()));
        }
        out
    }

    fn take(&mut self, end: usize) -> String {
        let end = floor_char_boundary(&self.text, end.max(self.emitted));
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    pub(crate) fn into_text(self) -> String {
        self.text
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix_len(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_even_across_deltas() {
        let stops = vec!["END".to_string()];
        let mut s = StopStrings::new(&stops);
        assert_eq!(s.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("Dxyz"), (String::new(), true));
        assert_eq!(s.into_text(), "hello ");
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let stops = vec!["END".to_string()];
        let mut s = StopStrings::new(&stops);
        assert_eq!(s.push("a E"), ("a ".to_string(), false));
        assert_eq!(s.push("x"), ("Ex".to_string(), false));
        assert_eq!(s.finish("E"), "E");
        assert_eq!(s.into_text(), "a ExE");
    }

    #[test]
    fn multibyte_stop_strings_work() {
        let stops = vec!["。".to_string()];
        let mut s = StopStrings::new(&stops);
        assert_eq!(s.push("你好"), ("你好".to_string(), false));
        assert_eq!(s.push("。再见"), (String::new(), true));
        assert_eq!(s.into_text(), "你好");
    }
}
