//! Loading a Hugging Face model folder into the right architecture.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::layers::decoder::{Decoder, DecoderSpec};
use crate::weights::SafetensorsWeights;
use crate::{llama, qwen2};

/// The architectures this crate runs, by their `architectures[0]` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
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
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    /// `max_position_embeddings`: the longest sequence the model was built for.
    pub max_position_embeddings: usize,
    /// The dtype the weight matrices were loaded in.
    pub dtype: DType,
    /// The dtype of hidden states and the KV cache (f32 on CPU whatever `dtype` is).
    pub activation_dtype: DType,
    /// Bytes of weights in memory.
    pub weight_bytes: usize,
}

/// A loaded model: weights only; the caller owns the [`KvCache`].
#[derive(Debug, Clone)]
pub struct Model {
    info: ModelInfo,
    decoder: Decoder,
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
        let parse = |v: &Value| -> Result<DecoderSpec> {
            let spec = match architecture {
                Architecture::Llama => parse_config::<llama::Config>(v, &config_path)?.spec(),
                Architecture::Qwen2 => parse_config::<qwen2::Config>(v, &config_path)?.spec(),
            };
            spec.map_err(|message| ModelError::Config {
                path: config_path.clone(),
                message,
            })
        };
        let spec = parse(&config)?;
        let max_position_embeddings = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let weights = SafetensorsWeights::open_dir(dir)?;
        let vb = weights.into_var_builder(options.dtype, &options.device);
        let decoder = match architecture {
            Architecture::Llama => llama::load(spec, vb)?,
            Architecture::Qwen2 => qwen2::load(spec, vb)?,
        };
        let spec = decoder.spec();
        let info = ModelInfo {
            architecture,
            vocab_size: spec.vocab_size,
            num_layers: spec.num_layers,
            num_kv_heads: spec.attention.num_kv_heads,
            head_dim: spec.attention.head_dim,
            hidden_size: spec.hidden_size,
            max_position_embeddings,
            dtype: options.dtype,
            activation_dtype: decoder.activations(),
            weight_bytes: decoder.weight_bytes(),
        };
        Ok(Self { info, decoder })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// An empty cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.info.num_layers)
    }

    /// Bytes of KV cache per token.
    pub fn kv_bytes_per_token(&self) -> usize {
        KvCache::bytes_per_token(
            self.info.num_layers,
            self.info.num_kv_heads,
            self.info.head_dim,
            self.info.activation_dtype,
        )
    }

    /// Runs `tokens` after what `cache` holds and extends it; returns f32 logits `[n, vocab]`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        let requested = cache.len() + tokens.len();
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
        Ok(self.decoder.forward(tokens, cache, which)?)
    }
}

fn parse_config<T: DeserializeOwned>(value: &Value, path: &Path) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}
