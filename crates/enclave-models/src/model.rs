//! Loading a Hugging Face model folder into the right architecture.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::deepseek::{self, Deepseek, ExpertStats, MlaForm};
use crate::error::{ModelError, Result};
use crate::gemma3::{self, Gemma3};
use crate::gguf::GgufFile;
use crate::kv_cache::{KvCache, KvLayout, PagedKvCache, SeqSlice};
use crate::layers::decoder::{Decoder, DecoderSpec};
use crate::weights::{SafetensorsWeights, DEFAULT_FP8_BLOCK};
use crate::{llama, qwen2};

/// The architectures this crate runs, by their `architectures[0]` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    DeepseekV2,
    DeepseekV3,
    Gemma3,
}

impl Architecture {
    pub const ALL: [Self; 5] = [
        Self::Llama,
        Self::Qwen2,
        Self::DeepseekV2,
        Self::DeepseekV3,
        Self::Gemma3,
    ];

    pub fn from_hf(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::DeepseekV2 => "DeepseekV2ForCausalLM",
            Self::DeepseekV3 => "DeepseekV3ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
        }
    }
}

/// Weights quantized into GGML blocks after load (`--quantize`); products then quantize their
/// activations per block as llama.cpp does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// 8-bit, one f16 scale per 32 weights (8.5 bits per weight).
    Q8_0,
    /// 4-bit k-quants, 256-weight super-blocks (4.5 bits per weight); matrices whose rows are not
    /// a multiple of 256 take Q5_0 instead, as llama.cpp's quantizer does (held in memory as
    /// Q8_0 tiles, 8.5 bits, on AVX2 CPUs without VNNI: `layers/block_tiles.rs`).
    Q4K,
}

impl Quantization {
    /// The GGML type for a matrix with rows of `in_features`.
    pub fn ggml_dtype(self, in_features: usize) -> GgmlDType {
        let preferred = match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        };
        if in_features.is_multiple_of(preferred.block_size()) {
            preferred
        } else if in_features.is_multiple_of(GgmlDType::Q5_0.block_size()) {
            GgmlDType::Q5_0
        } else {
            // No block type fits (rows not a multiple of 32): such a matrix stays dense.
            GgmlDType::F32
        }
    }
}

/// Which positions a forward returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position (prompt log-probabilities, tests).
    All,
    /// Only the last one (generation): skips the vocabulary projection for the rest.
    Last,
    /// Every position of sequences marked `all_logits`, the last of the others (a batch where
    /// some requests want prompt log-probabilities).
    Marked,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of the weight matrices, converted at load (activations: see `activation_dtype`).
    pub dtype: DType,
    pub device: Device,
}

/// What callers need to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub num_layers: usize,
    pub hidden_size: usize,
    /// Bytes of KV cache each token takes (all layers): keys and values, or MLA's latents.
    pub kv_bytes_per_token: usize,
    /// `max_position_embeddings`: the longest sequence the model was built for.
    pub max_position_embeddings: usize,
    /// The dtype the weight matrices were loaded in.
    pub dtype: DType,
    /// The dtype of hidden states and the KV cache (f32 on CPU whatever `dtype` is).
    pub activation_dtype: DType,
    /// Bytes of weights in memory.
    pub weight_bytes: usize,
    /// Projection matrices held in GGML blocks, by type (empty: all dense in `dtype`).
    pub quantized_projections: Vec<(GgmlDType, usize)>,
}

/// A loaded model: weights only; the caller owns the [`KvCache`].
#[derive(Debug, Clone)]
pub struct Model {
    info: ModelInfo,
    network: Network,
    device: Device,
}

#[derive(Debug, Clone)]
enum Network {
    /// The Llama-family stack (Llama, Qwen2).
    Dense(Decoder),
    Deepseek(Deepseek),
    Gemma3(Gemma3),
}

/// The dtype the checkpoint is stored in, as `config.json` declares it (`torch_dtype`, or
/// `dtype` in newer files); `None` when it says nothing usable.
pub fn checkpoint_dtype(dir: &Path) -> Result<Option<DType>> {
    let config = read_config(dir)?;
    let name = config
        .get("torch_dtype")
        .or_else(|| config.get("dtype"))
        .and_then(Value::as_str);
    Ok(match name {
        Some("float32") => Some(DType::F32),
        Some("bfloat16") => Some(DType::BF16),
        Some("float16") => Some(DType::F16),
        _ => None,
    })
}

/// Reads and parses `config.json` of a model folder.
pub fn read_config(dir: &Path) -> Result<Value> {
    read_json(&dir.join("config.json"))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl Model {
    /// Loads a Hugging Face model folder: `config.json` and `model.safetensors` (or shards).
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = read_config(dir)?;
        let fp8_block = fp8_block_size(&config).map_err(|message| ModelError::Config {
            path: config_path.clone(),
            message,
        })?;
        Self::build(&config, &config_path, options, || {
            let mut weights = SafetensorsWeights::open_dir(dir)?;
            weights.set_fp8_block(fp8_block);
            Ok(weights.into_var_builder(options.dtype, &options.device))
        })
    }

    /// Loads a GGUF file (llama.cpp's format): config from its metadata, tensors dequantised
    /// into `options.dtype`.
    pub fn load_gguf(path: &Path, options: &LoadOptions) -> Result<Self> {
        Self::from_gguf(GgufFile::open(path)?, options)
    }

    /// Builds the model of an opened GGUF file; block-quantized matrices stay quantized on CPU
    /// (products quantize activations per block, as llama.cpp does), the rest is loaded in
    /// `options.dtype`.
    pub fn from_gguf(file: GgufFile, options: &LoadOptions) -> Result<Self> {
        Self::from_gguf_inner(file, options, options.device.is_cpu())
    }

    /// Builds the model of an opened GGUF file with every tensor dequantised into
    /// `options.dtype`: the reference arithmetic on the file's values (twice to four times the
    /// memory of the quantized blocks).
    pub fn from_gguf_dequantized(file: GgufFile, options: &LoadOptions) -> Result<Self> {
        Self::from_gguf_inner(file, options, false)
    }

    fn from_gguf_inner(
        file: GgufFile,
        options: &LoadOptions,
        keep_quantized: bool,
    ) -> Result<Self> {
        let config = file.hf_config()?;
        let path = file.path().to_path_buf();
        let mut stash = None;
        let mut model = Self::build(&config, &path, options, || {
            let (vb, quantized) =
                file.into_var_builder(options.dtype, &options.device, keep_quantized)?;
            stash = Some(quantized);
            Ok(vb)
        })?;
        if let Some(stash) = stash {
            let mut taken = std::collections::HashSet::new();
            model.for_each_linear_mut(&mut |linear| {
                if let Some(q) = stash.get(linear.name()) {
                    linear.set_quantized(q)?;
                    taken.insert(linear.name().to_string());
                }
                Ok(())
            })?;
            // Every stashed matrix was served as a placeholder: one no linear layer took would
            // compute with zeros.
            if let Some(orphan) = stash
                .names()
                .into_iter()
                .find(|n| n != "model.embed_tokens.weight" && !taken.contains(n))
            {
                return Err(ModelError::Config {
                    path,
                    message: format!(
                        "tensor `{orphan}` is block-quantized but not a projection matrix; \
                         load this file dequantised (without --quantize gguf)"
                    ),
                });
            }
            model.refresh_weight_info();
        }
        Ok(model)
    }

    /// Quantizes every projection matrix (attention, MLP, experts, head; not the embedding,
    /// norms, MoE router or MLA's latent up-projections) into `quantization`'s blocks (CPU).
    pub fn quantize(&mut self, quantization: Quantization) -> Result<()> {
        if !self.device.is_cpu() {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "--quantize runs on CPU only for now".into(),
            )));
        }
        self.for_each_linear_mut(&mut |linear| {
            if linear.is_bf16_packed() {
                candle_core::bail!(
                    "{}: packed for bf16 dot products; quantize before Model::pack_for_cpu",
                    linear.name()
                );
            }
            let Some(weight) = linear.dense_weight() else {
                return Ok(()); // already quantized (a GGUF file's blocks)
            };
            let in_features = weight.dim(1)?;
            let dtype = quantization.ggml_dtype(in_features);
            if dtype == GgmlDType::F32 {
                return Ok(());
            }
            let q = QTensor::quantize(&weight.to_dtype(DType::F32)?, dtype)?;
            linear.set_quantized(std::sync::Arc::new(q))
        })?;
        self.refresh_weight_info();
        Ok(())
    }

    /// Repacks every bf16 projection matrix into `layers/bf16_tiles.rs`'s tiles (CPUs with
    /// AVX512-BF16, or AVX2 and FMA), in place of its dense copy; a no-op elsewhere. Call after
    /// [`Model::quantize`], which needs the dense weights (and refuses packed ones).
    pub fn pack_for_cpu(&mut self) -> Result<()> {
        if !self.device.is_cpu() {
            return Ok(());
        }
        self.for_each_linear_mut(&mut |linear| linear.pack_bf16())?;
        self.refresh_weight_info();
        Ok(())
    }

    /// Visits every projection matrix (see [`Model::quantize`]).
    fn for_each_linear_mut(
        &mut self,
        f: &mut dyn FnMut(&mut crate::layers::linear::Linear) -> candle_core::Result<()>,
    ) -> Result<()> {
        match &mut self.network {
            Network::Dense(decoder) => decoder.for_each_linear_mut(f)?,
            Network::Gemma3(model) => model.for_each_linear_mut(f)?,
            Network::Deepseek(model) => model.for_each_linear_mut(f)?,
        }
        Ok(())
    }

    /// The GGML types the quantized projection matrices are held in, with how many have each.
    fn quantized_formats(&mut self) -> Vec<(GgmlDType, usize)> {
        let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
        let _ = self.for_each_linear_mut(&mut |linear| {
            if let Some(format) = linear.quantized_dtype() {
                match counts.iter_mut().find(|(f, _)| *f == format) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((format, 1)),
                }
            }
            Ok(())
        });
        counts
    }

    /// Recomputes the weight bytes and formats after matrices were quantized.
    fn refresh_weight_info(&mut self) {
        self.info.weight_bytes = self.network_weight_bytes();
        self.info.quantized_projections = self.quantized_formats();
    }

    fn network_weight_bytes(&self) -> usize {
        match &self.network {
            Network::Dense(decoder) => decoder.weight_bytes(),
            Network::Deepseek(model) => model.weight_bytes(),
            Network::Gemma3(model) => model.weight_bytes(),
        }
    }

    /// Parses and validates the config, then asks for the weights and builds the network.
    fn build<'a>(
        config: &Value,
        config_path: &Path,
        options: &LoadOptions,
        weights: impl FnOnce() -> Result<candle_nn::VarBuilder<'a>>,
    ) -> Result<Self> {
        let config_path = config_path.to_path_buf();
        let arch_name = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::Config {
                path: config_path.clone(),
                message: "architectures: missing (expected e.g. [\"Qwen2ForCausalLM\"])".into(),
            })?;
        let architecture = Architecture::from_hf(arch_name)
            .ok_or_else(|| ModelError::UnsupportedArchitecture(arch_name.to_string()))?;
        let config_error = |message: String| ModelError::Config {
            path: config_path.clone(),
            message,
        };
        let max_position_embeddings = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        // Parse and validate the whole config before reading any weights.
        enum Parsed {
            Dense(DecoderSpec),
            Deepseek(deepseek::Spec),
            Gemma3(gemma3::Spec),
        }
        let parsed = match architecture {
            Architecture::Llama => Parsed::Dense(
                parse_config::<llama::Config>(config, &config_path)?
                    .spec()
                    .map_err(config_error)?,
            ),
            Architecture::Qwen2 => Parsed::Dense(
                parse_config::<qwen2::Config>(config, &config_path)?
                    .spec()
                    .map_err(config_error)?,
            ),
            Architecture::DeepseekV2 | Architecture::DeepseekV3 => {
                let generation = if architecture == Architecture::DeepseekV2 {
                    deepseek::Generation::V2
                } else {
                    deepseek::Generation::V3
                };
                Parsed::Deepseek(
                    parse_config::<deepseek::Config>(config, &config_path)?
                        .spec(generation)
                        .map_err(config_error)?,
                )
            }
            Architecture::Gemma3 => Parsed::Gemma3(
                parse_config::<gemma3::Config>(config, &config_path)?
                    .spec()
                    .map_err(config_error)?,
            ),
        };
        let vb = weights()?;
        let network = match parsed {
            Parsed::Dense(spec) => Network::Dense(match architecture {
                Architecture::Llama => llama::load(spec, vb)?,
                _ => qwen2::load(spec, vb)?,
            }),
            Parsed::Deepseek(spec) => Network::Deepseek(Deepseek::new(spec, vb)?),
            Parsed::Gemma3(spec) => Network::Gemma3(Gemma3::new(spec, vb)?),
        };
        let info = match &network {
            Network::Dense(decoder) => {
                let spec = decoder.spec();
                ModelInfo {
                    architecture,
                    vocab_size: spec.vocab_size,
                    num_layers: spec.num_layers,
                    hidden_size: spec.hidden_size,
                    kv_bytes_per_token: decoder.kv_layout().bytes_per_token(),
                    max_position_embeddings,
                    dtype: options.dtype,
                    activation_dtype: decoder.activations(),
                    weight_bytes: decoder.weight_bytes(),
                    quantized_projections: Vec::new(),
                }
            }
            Network::Deepseek(model) => {
                let spec = model.spec();
                ModelInfo {
                    architecture,
                    vocab_size: spec.vocab_size,
                    num_layers: spec.num_layers,
                    hidden_size: spec.hidden_size,
                    kv_bytes_per_token: model.kv_layout().bytes_per_token(),
                    max_position_embeddings,
                    dtype: options.dtype,
                    activation_dtype: model.activations(),
                    weight_bytes: model.weight_bytes(),
                    quantized_projections: Vec::new(),
                }
            }
            Network::Gemma3(model) => ModelInfo {
                architecture,
                vocab_size: model.spec().vocab_size,
                num_layers: model.num_layers(),
                hidden_size: model.spec().hidden_size,
                kv_bytes_per_token: model.kv_layout().bytes_per_token(),
                max_position_embeddings,
                dtype: options.dtype,
                activation_dtype: model.activations(),
                weight_bytes: model.weight_bytes(),
                quantized_projections: Vec::new(),
            },
        };
        Ok(Self {
            info,
            network,
            device: options.device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// What one cached token holds per layer (for sizing a [`PagedKvCache`]).
    pub fn kv_layout(&self) -> KvLayout {
        match &self.network {
            Network::Dense(decoder) => decoder.kv_layout(),
            Network::Deepseek(model) => model.kv_layout(),
            Network::Gemma3(model) => model.kv_layout(),
        }
    }

    /// An empty single-sequence cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.kv_layout(), &self.device)
    }

    /// Bytes of KV cache per token.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.info.kv_bytes_per_token
    }

    /// Forces one form of MLA attention (DeepSeek models; ignored by others). Tests and
    /// benchmarks compare the two; the default picks the cheaper per forward.
    pub fn set_mla_form(&mut self, form: MlaForm) {
        if let Network::Deepseek(model) = &mut self.network {
            model.set_mla_form(form);
        }
    }

    /// Expert evaluations since load (MoE models; zero for dense ones).
    pub fn expert_stats(&self) -> ExpertStats {
        match &self.network {
            Network::Deepseek(model) => model.expert_stats(),
            Network::Dense(_) | Network::Gemma3(_) => ExpertStats::default(),
        }
    }

    /// Runs `tokens` after what `cache` holds and extends it; returns f32 logits `[n, vocab]`
    /// (`Logits::All`) or `[1, vocab]` (`Logits::Last`).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        let start = cache.len();
        self.check(tokens, start)?;
        let (paged, table) = cache.reserve(tokens.len())?;
        let seq = SeqSlice {
            tokens,
            start,
            block_table: table,
            all_logits: false,
        };
        let logits = self.forward_batch(&[seq], paged, which)?;
        cache.advance(tokens.len());
        Ok(logits)
    }

    /// One forward over the new tokens of several sequences sharing `cache` (each names its
    /// blocks; blocks may be shared for a common prefix). Returns f32 logits: one row per
    /// sequence (`Logits::Last`), or one per token, packed in order (`Logits::All`).
    pub fn forward_batch(
        &self,
        seqs: &[SeqSlice],
        cache: &PagedKvCache,
        which: Logits,
    ) -> Result<Tensor> {
        if cache.layout() != self.kv_layout() {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "kv cache layout {:?} does not match the model's {:?}",
                cache.layout(),
                self.kv_layout()
            ))));
        }
        for seq in seqs {
            self.check(seq.tokens, seq.start)?;
        }
        Ok(match &self.network {
            Network::Dense(decoder) => decoder.forward(seqs, cache, which)?,
            Network::Deepseek(model) => model.forward(seqs, cache, which)?,
            Network::Gemma3(model) => model.forward(seqs, cache, which)?,
        })
    }

    fn check(&self, tokens: &[u32], start: usize) -> Result<()> {
        let requested = start + tokens.len();
        if requested > self.info.max_position_embeddings {
            return Err(ModelError::ContextOverflow {
                requested,
                limit: self.info.max_position_embeddings,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.info.vocab_size
            ))));
        }
        Ok(())
    }
}

fn fp8_block_size(config: &Value) -> std::result::Result<[usize; 2], String> {
    let Some(q) = config.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok(DEFAULT_FP8_BLOCK);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "fp8" {
        return Err(format!(
            "quantization_config.quant_method: {method:?} is not supported (fp8)"
        ));
    }
    if let Some(fmt) = q.get("fmt").and_then(Value::as_str) {
        if fmt != "e4m3" {
            return Err(format!(
                "quantization_config.fmt: {fmt:?} is not supported (e4m3)"
            ));
        }
    }
    match q.get("weight_block_size") {
        None | Some(Value::Null) => Ok(DEFAULT_FP8_BLOCK),
        Some(v) => match v
            .as_array()
            .map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>())
        {
            Some(dims)
                if dims.len() == 2 && dims.iter().all(|d| matches!(d, Some(n) if *n > 0)) =>
            {
                Ok([dims[0].unwrap_or(0) as usize, dims[1].unwrap_or(0) as usize])
            }
            _ => Err(format!(
                "quantization_config.weight_block_size: {v} must be two positive integers"
            )),
        },
    }
}

fn parse_config<T: DeserializeOwned>(value: &Value, path: &Path) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}
