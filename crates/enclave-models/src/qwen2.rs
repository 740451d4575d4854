//! `Qwen2ForCausalLM`: DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B.
//!
//! Differs from Llama by the bias on the q, k and v projections (never on o) and by its
//! optional sliding window, which the distilled DeepSeek models leave off.

use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::layers::attention::AttentionShape;
use crate::layers::decoder::{Decoder, DecoderSpec};
use crate::layers::mlp::Activation;
use crate::layers::rotary::RopeScaling;

/// `config.json` of a Qwen2 checkpoint; field names as Hugging Face writes them.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "crate::hf_defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "crate::hf_defaults::rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "crate::hf_defaults::hidden_act")]
    pub hidden_act: String,
}

impl Config {
    /// The shared decoder's view of this config; `Err` names the offending key.
    pub fn spec(&self) -> Result<DecoderSpec, String> {
        if self.use_sliding_window {
            return Err("use_sliding_window: true is not supported".into());
        }
        let activation = Activation::from_hf(&self.hidden_act)
            .ok_or_else(|| format!("hidden_act: {:?} is not supported", self.hidden_act))?;
        if self.num_attention_heads == 0 {
            return Err("num_attention_heads: must be positive".into());
        }
        Ok(DecoderSpec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            attention: AttentionShape {
                hidden_size: self.hidden_size,
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
                head_dim: self.hidden_size / self.num_attention_heads,
                qkv_bias: true,
                o_bias: false,
            },
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScaling::from_hf(
                self.rope_scaling.as_ref(),
                self.max_position_embeddings,
            )?,
            mlp_bias: false,
            activation,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}

/// Loads the weights for `spec` (from [`Config::spec`]).
pub fn load(spec: DecoderSpec, vb: VarBuilder) -> candle_core::Result<Decoder> {
    Decoder::new(spec, vb)
}
