//! Multi-head attention with grouped KV heads (GQA), reading and extending the caller's cache.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::Linear;

use super::rotary::RotaryEmbedding;
use crate::kv_cache::LayerKv;

/// Shape of an attention block, from the architecture's config.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Bias on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
}

#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    shape: AttentionShape,
    scale: f64,
}

impl Attention {
    /// Weights in the builder's dtype; biases and outputs in `activations`.
    pub fn new(shape: AttentionShape, activations: DType, vb: VarBuilder) -> Result<Self> {
        let AttentionShape {
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias,
            o_bias,
        } = shape;
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            candle_core::bail!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            );
        }
        Ok(Self {
            q_proj: Linear::load(
                hidden_size,
                num_heads * head_dim,
                qkv_bias,
                activations,
                vb.pp("q_proj"),
            )?,
            k_proj: Linear::load(
                hidden_size,
                num_kv_heads * head_dim,
                qkv_bias,
                activations,
                vb.pp("k_proj"),
            )?,
            v_proj: Linear::load(
                hidden_size,
                num_kv_heads * head_dim,
                qkv_bias,
                activations,
                vb.pp("v_proj"),
            )?,
            o_proj: Linear::load(
                num_heads * head_dim,
                hidden_size,
                o_bias,
                activations,
                vb.pp("o_proj"),
            )?,
            shape,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `xs` is `[1, len, hidden]` for positions `offset..offset + len`; `mask` is the additive
    /// causal mask `[len, offset + len]` (f32), or `None` for a single query position.
    pub fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        offset: usize,
        cache: &mut LayerKv,
    ) -> Result<Tensor> {
        let (b, len, _) = xs.dims3()?;
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            ..
        } = self.shape;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, len, n, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(xs)?, num_heads)?;
        let k = heads(self.k_proj.forward(xs)?, num_kv_heads)?;
        let v = heads(self.v_proj.forward(xs)?, num_kv_heads)?;
        let q = RotaryEmbedding::apply(&q, cos, sin)?;
        let k = RotaryEmbedding::apply(&k, cos, sin)?;
        let (k, v) = cache.append(offset, &k, &v)?;
        let total = offset + len;

        // Grouped heads without copying keys: the `group` query heads that share one KV head are
        // stacked along the row dimension, so one matmul per KV head covers them all.
        let group = num_heads / num_kv_heads;
        let q = q.reshape((b, num_kv_heads, group * len, head_dim))?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((b, num_kv_heads, group, len, total))?
                .broadcast_add(mask)?
                .reshape((b, num_kv_heads, group * len, total))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?; // [b, kv_heads, group * len, head_dim]
        let out = out
            .reshape((b, num_heads, len, head_dim))?
            .transpose(1, 2)?
            .reshape((b, len, num_heads * head_dim))?;
        self.o_proj.forward(&out)
    }
}

/// The additive causal mask for `len` new positions after `offset` cached ones:
/// `[len, offset + len]`, 0 where visible and -inf where in the future.
pub fn causal_mask(len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, total), device)
}

impl Attention {
    pub(crate) fn weight_bytes(&self, linear: &dyn Fn(&Linear) -> usize) -> usize {
        linear(&self.q_proj) + linear(&self.k_proj) + linear(&self.v_proj) + linear(&self.o_proj)
    }
}
