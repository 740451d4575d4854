//! `Gemma3ForCausalLM` (GGUF `gemma3`): Gemma 3's text model, the demo model's architecture.
//!
//! A Llama-shaped stack with four differences: local layers attend only to the last
//! `sliding_window` positions and rotate with their own base (every `sliding_window_pattern`-th
//! layer is global); queries and keys are RMS-normalised per head (QK-norm); the attention and
//! feed-forward outputs are normalised again before the residual add; and the embedding is
//! scaled by `sqrt(hidden_size)`. Norms scale by `1 + w`; the feed-forward is GeGLU.
//!
//! Every layer keeps its whole context in the cache (local layers read only their window), so the
//! cache layout is the same for all layers.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::kv_cache::{KvLayout, PagedKvCache, SeqSlice};
use crate::layers::attention::{Attention, AttentionShape};
use crate::layers::decoder::{activation_dtype, PackedBatch};
use crate::layers::linear::Linear;
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::norm::RmsNorm;
use crate::layers::rotary::{RopeScaling, RotaryEmbedding};
use crate::model::Logits;

/// `config.json` of a Gemma 3 text checkpoint (`model_type: gemma3_text`); field names and
/// defaults as `transformers`' `Gemma3TextConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "crate::hf_defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rope_local_base_freq")]
    pub rope_local_base_freq: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "default_sliding_window")]
    pub sliding_window: usize,
    #[serde(default = "default_sliding_window_pattern")]
    pub sliding_window_pattern: usize,
    /// `sliding_attention` / `full_attention` per layer (newer configs); overrides the pattern.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_hidden_activation")]
    pub hidden_activation: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Not a `transformers` key: set by our GGUF reader, whose files store norms as `1 + w`.
    #[serde(default = "default_norm_offset")]
    pub norm_weight_offset: f64,
}

fn default_head_dim() -> usize {
    256
}
fn default_rope_theta() -> f64 {
    1_000_000.0
}
fn default_rope_local_base_freq() -> f64 {
    10_000.0
}
fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
fn default_sliding_window() -> usize {
    4096
}
fn default_sliding_window_pattern() -> usize {
    6
}
fn default_hidden_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_true() -> bool {
    true
}
fn default_norm_offset() -> f64 {
    1.0
}

/// What the network needs, validated.
#[derive(Debug, Clone)]
pub struct Spec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub attention: AttentionShape,
    pub rms_norm_eps: f64,
    pub norm_weight_offset: f64,
    /// Per layer: `Some(window)` for a local (sliding-window) layer, `None` for a global one.
    pub layer_windows: Vec<Option<usize>>,
    pub rope_global: (f64, RopeScaling),
    pub rope_local_base: f64,
    pub query_scale: f64,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
}

impl Config {
    /// Validates the config; `Err` names the offending key.
    pub fn spec(&self) -> std::result::Result<Spec, String> {
        let activation = Activation::from_hf(&self.hidden_activation).ok_or_else(|| {
            format!(
                "hidden_activation: {:?} is not supported",
                self.hidden_activation
            )
        })?;
        if self.final_logit_softcapping.is_some() {
            return Err("final_logit_softcapping: soft-capping is not supported".into());
        }
        if self.attn_logit_softcapping.is_some() {
            return Err("attn_logit_softcapping: soft-capping is not supported".into());
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err("num_attention_heads / num_key_value_heads: must be positive".into());
        }
        if self.query_pre_attn_scalar <= 0.0 {
            return Err("query_pre_attn_scalar: must be positive".into());
        }
        let layer_windows = match &self.layer_types {
            Some(types) => {
                if types.len() != self.num_hidden_layers {
                    return Err(format!(
                        "layer_types: {} entries for {} layers",
                        types.len(),
                        self.num_hidden_layers
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(Some(self.sliding_window)),
                        "full_attention" => Ok(None),
                        other => Err(format!("layer_types: {other:?} is not supported")),
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?
            }
            None => {
                if self.sliding_window_pattern == 0 {
                    return Err("sliding_window_pattern: must be positive".into());
                }
                (0..self.num_hidden_layers)
                    .map(|i| {
                        ((i + 1) % self.sliding_window_pattern != 0).then_some(self.sliding_window)
                    })
                    .collect()
            }
        };
        Ok(Spec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            attention: AttentionShape {
                hidden_size: self.hidden_size,
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim: self.head_dim,
                qkv_bias: self.attention_bias,
                o_bias: self.attention_bias,
            },
            rms_norm_eps: self.rms_norm_eps,
            norm_weight_offset: self.norm_weight_offset,
            layer_windows,
            rope_global: (
                self.rope_theta,
                RopeScaling::from_hf(self.rope_scaling.as_ref(), self.max_position_embeddings)?,
            ),
            rope_local_base: self.rope_local_base_freq,
            query_scale: 1.0 / self.query_pre_attn_scalar.sqrt(),
            activation,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: GatedMlp,
    post_feedforward_layernorm: RmsNorm,
    local: bool,
}

/// A loaded Gemma 3 text model: weights only, no state.
#[derive(Debug, Clone)]
pub struct Gemma3 {
    embed_tokens: Embedding,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary_global: RotaryEmbedding,
    rotary_local: RotaryEmbedding,
    spec: Spec,
    activations: DType,
}

impl Gemma3 {
    /// Loads `model.*` (and `lm_head.*` when untied): matrices in the builder's dtype, norms in
    /// the activation dtype.
    pub fn new(spec: Spec, vb: VarBuilder) -> Result<Self> {
        let activations = activation_dtype(vb.dtype(), vb.device());
        let model_vb = vb.pp("model");
        let norm_vb = model_vb.to_dtype(activations);
        let norm = |size: usize, vb: VarBuilder| {
            RmsNorm::with_offset(size, spec.rms_norm_eps, spec.norm_weight_offset, vb)
        };
        let embed_weight =
            model_vb.get((spec.vocab_size, spec.hidden_size), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(spec.layer_windows.len());
        for (i, window) in spec.layer_windows.iter().enumerate() {
            let vb = model_vb.pp("layers").pp(i);
            let norm_vb = norm_vb.pp("layers").pp(i);
            let head_dim = spec.attention.head_dim;
            let mut self_attn = Attention::new(spec.attention, activations, vb.pp("self_attn"))?
                .with_qk_norm(
                    norm(head_dim, norm_vb.pp("self_attn").pp("q_norm"))?,
                    norm(head_dim, norm_vb.pp("self_attn").pp("k_norm"))?,
                )
                .with_scale(spec.query_scale);
            if let Some(window) = window {
                self_attn = self_attn.with_sliding_window(*window);
            }
            layers.push(Layer {
                input_layernorm: norm(spec.hidden_size, norm_vb.pp("input_layernorm"))?,
                self_attn,
                post_attention_layernorm: norm(
                    spec.hidden_size,
                    norm_vb.pp("post_attention_layernorm"),
                )?,
                pre_feedforward_layernorm: norm(
                    spec.hidden_size,
                    norm_vb.pp("pre_feedforward_layernorm"),
                )?,
                mlp: GatedMlp::new(
                    spec.hidden_size,
                    spec.intermediate_size,
                    false,
                    spec.activation,
                    activations,
                    vb.pp("mlp"),
                )?,
                post_feedforward_layernorm: norm(
                    spec.hidden_size,
                    norm_vb.pp("post_feedforward_layernorm"),
                )?,
                local: window.is_some(),
            });
        }
        let final_norm = norm(spec.hidden_size, norm_vb.pp("norm"))?;
        let lm_head_weight = if spec.tie_word_embeddings {
            embed_weight.clone()
        } else {
            vb.get((spec.vocab_size, spec.hidden_size), "lm_head.weight")?
        };
        let head_dim = spec.attention.head_dim;
        Ok(Self {
            embed_tokens: Embedding::new(embed_weight, spec.hidden_size),
            embed_scale: (spec.hidden_size as f64).sqrt(),
            layers,
            norm: final_norm,
            lm_head: Linear::new(lm_head_weight, None).with_name(if spec.tie_word_embeddings {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            }),
            rotary_global: RotaryEmbedding::new(
                head_dim,
                spec.rope_global.0,
                spec.rope_global.1.clone(),
            ),
            rotary_local: RotaryEmbedding::new(head_dim, spec.rope_local_base, RopeScaling::None),
            spec,
            activations,
        })
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The dtype of hidden states and of the KV cache.
    pub fn activations(&self) -> DType {
        self.activations
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Keys and values of every layer (local layers included, see the module comment).
    pub fn kv_layout(&self) -> KvLayout {
        let width = self.spec.attention.num_kv_heads * self.spec.attention.head_dim;
        KvLayout {
            num_layers: self.layers.len(),
            k_width: width,
            v_width: width,
            dtype: self.activations,
        }
    }

    /// One forward over the new tokens of several sequences; see `Decoder::forward`.
    pub fn forward(
        &self,
        seqs: &[SeqSlice],
        cache: &PagedKvCache,
        which: Logits,
    ) -> Result<Tensor> {
        let device = self.embed_tokens.embeddings().device().clone();
        let dtype = self.activations;
        let batch = PackedBatch::new(seqs, &device)?;
        let mut xs = (self.embed_tokens.forward(&batch.ids)?.to_dtype(dtype)? * self.embed_scale)?;
        let (cos_global, sin_global) = batch.cos_sin(&self.rotary_global, dtype, &device)?;
        let (cos_local, sin_local) = batch.cos_sin(&self.rotary_local, dtype, &device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = if layer.local {
                (&cos_local, &sin_local)
            } else {
                (&cos_global, &sin_global)
            };
            let h = layer.input_layernorm.forward(&xs)?;
            let h = layer.self_attn.forward(&h, cos, sin, seqs, cache, i)?;
            let h = layer.post_attention_layernorm.forward(&h)?;
            let xs_attn = (xs + h)?;
            let h = layer.pre_feedforward_layernorm.forward(&xs_attn)?;
            let h = layer.mlp.forward(&h)?;
            let h = layer.post_feedforward_layernorm.forward(&h)?;
            xs = (xs_attn + h)?;
        }
        let xs = batch.select(&xs, which)?;
        let xs = self.norm.forward(&xs)?;
        self.lm_head.forward(&xs)?.squeeze(0)?.to_dtype(DType::F32)
    }

    /// Every matrix of the stack (attention, MLP, head), for quantizing after load.
    pub fn for_each_linear_mut(
        &mut self,
        f: &mut dyn FnMut(&mut Linear) -> Result<()>,
    ) -> Result<()> {
        for layer in &mut self.layers {
            for linear in layer.self_attn.linears_mut() {
                f(linear)?;
            }
            for linear in layer.mlp.linears_mut() {
                f(linear)?;
            }
        }
        f(&mut self.lm_head)
    }

    /// Bytes of weights held (the tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut total = bytes(self.embed_tokens.embeddings());
        if !self.spec.tie_word_embeddings || self.lm_head.quantized_dtype().is_some() {
            total += self.lm_head.weight_bytes();
        }
        let linear = |l: &Linear| l.weight_bytes();
        let norm_bytes = self.activations.size_in_bytes();
        for layer in &self.layers {
            total += layer.self_attn.weight_bytes(&linear);
            total += layer.mlp.weight_bytes(&linear);
            total += (4 * self.spec.hidden_size + 2 * self.spec.attention.head_dim) * norm_bytes;
        }
        total + self.spec.hidden_size * norm_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> Config {
        let mut base = serde_json::json!({
            "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 4, "max_position_embeddings": 64, "sliding_window": 3,
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn every_sixth_layer_is_global_by_default() {
        let spec = config(serde_json::json!({})).spec().unwrap();
        let globals: Vec<usize> = (0..7)
            .filter(|&i| spec.layer_windows[i].is_none())
            .collect();
        assert_eq!(globals, [5]);
        assert_eq!(spec.layer_windows[0], Some(3));
    }

    #[test]
    fn layer_types_override_the_pattern_and_bad_ones_name_the_key() {
        let types = ["full_attention"; 7];
        let spec = config(serde_json::json!({ "layer_types": types }))
            .spec()
            .unwrap();
        assert!(spec.layer_windows.iter().all(Option::is_none));
        let err = config(serde_json::json!({ "layer_types": ["full_attention"] }))
            .spec()
            .unwrap_err();
        assert!(err.contains("layer_types"), "{err}");
        let err = config(serde_json::json!({ "final_logit_softcapping": 30.0 }))
            .spec()
            .unwrap_err();
        assert!(err.contains("final_logit_softcapping"), "{err}");
    }
}
