//! Multi-head attention with grouped KV heads (GQA), reading and extending the caller's cache.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::decode_attention::{decode_attention, DecodeQuery, HeadShape};
use super::linear::Linear;
use super::norm::RmsNorm;
use super::rotary::RotaryEmbedding;
use crate::kv_cache::{PagedKvCache, SeqSlice};

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
    /// RMSNorm of each query and key head before the rotation (Gemma 3's QK-norm).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    /// Only the last this-many positions are visible (Gemma 3's local layers).
    sliding_window: Option<usize>,
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
            qk_norm: None,
            sliding_window: None,
            shape,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// Normalises every query and key head (`q_norm`, `k_norm`: `[head_dim]`) before the rotation.
    pub fn with_qk_norm(mut self, q_norm: RmsNorm, k_norm: RmsNorm) -> Self {
        self.qk_norm = Some((q_norm, k_norm));
        self
    }

    /// Scores are `q·k · scale` instead of `q·k / sqrt(head_dim)`.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = scale;
        self
    }

    /// A query at position `p` sees keys `p - window + 1 ..= p` only.
    pub fn with_sliding_window(mut self, window: usize) -> Self {
        self.sliding_window = Some(window.max(1));
        self
    }

    /// Attention for a packed batch: `xs` is `[1, T, hidden]`, the new tokens of every sequence
    /// of `seqs` one after another, with `cos`/`sin` (`[T, head_dim / 2]`) for their positions.
    /// Each sequence's keys and values are written into `cache` through its block table and its
    /// context read back the same way.
    pub fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &[SeqSlice],
        cache: &PagedKvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (_, total_tokens, _) = xs.dims3()?;
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            ..
        } = self.shape;
        let heads = |t: Tensor, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((1, total_tokens, n, head_dim))?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            t.transpose(1, 2)?.contiguous()
        };
        let (q_norm, k_norm) = match &self.qk_norm {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        let q = heads(self.q_proj.forward(xs)?, num_heads, q_norm)?;
        let k = heads(self.k_proj.forward(xs)?, num_kv_heads, k_norm)?;
        let q = RotaryEmbedding::apply(&q, cos, sin)?.squeeze(0)?; // [heads, T, d]
        let k = RotaryEmbedding::apply(&k, cos, sin)?
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((total_tokens, num_kv_heads * head_dim))?;
        let v = self
            .v_proj
            .forward(xs)?
            .reshape((total_tokens, num_kv_heads * head_dim))?;
        let group = num_heads / num_kv_heads;
        let first_key = |seq: &SeqSlice| {
            self.sliding_window
                .map_or(0, |window| (seq.start + 1).saturating_sub(window))
        };
        let mut offset = 0;
        for seq in seqs {
            let len = seq.tokens.len();
            cache.write(
                layer,
                seq.block_table,
                seq.start,
                &k.narrow(0, offset, len)?,
                &v.narrow(0, offset, len)?,
            )?;
            offset += len;
        }
        // Single-token sequences (decode steps) read the pools in place when they are f32.
        let decoded = if seqs.iter().any(|seq| seq.tokens.len() == 1) {
            self.decode_single_tokens(&q, seqs, cache, layer, &first_key)?
        } else {
            None
        };
        let row = num_heads * head_dim;
        let mut outputs = Vec::with_capacity(seqs.len());
        let (mut offset, mut decoded_index) = (0, 0);
        for seq in seqs {
            let len = seq.tokens.len();
            if let (1, Some(decoded)) = (len, &decoded) {
                outputs.push(decoded.narrow(0, decoded_index, 1)?);
                decoded_index += 1;
                offset += 1;
                continue;
            }
            let total = seq.start + len;
            let (k_all, v_all) = cache.gather(layer, seq.block_table, total)?;
            let first_key = first_key(seq);
            let visible = total - first_key;
            let per_head = |t: Tensor| -> Result<Tensor> {
                t.narrow(0, first_key, visible)?
                    .reshape((visible, num_kv_heads, head_dim))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (k_all, v_all) = (per_head(k_all)?, per_head(v_all)?); // [kv_heads, visible, d]
            let q_seq = q.narrow(1, offset, len)?.contiguous()?.reshape((
                num_kv_heads,
                group * len,
                head_dim,
            ))?;
            let scores = (q_seq.matmul(&k_all.t()?)? * self.scale)?.to_dtype(DType::F32)?;
            let scores = if len > 1 {
                let mask =
                    attention_mask(len, seq.start, first_key, self.sliding_window, xs.device())?;
                scores
                    .reshape((num_kv_heads, group, len, visible))?
                    .broadcast_add(&mask)?
                    .reshape((num_kv_heads, group * len, visible))?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v_all.dtype())?;
            let out = probs.matmul(&v_all)?; // [kv_heads, group * len, d]
            outputs.push(
                out.reshape((num_heads, len, head_dim))?
                    .transpose(0, 1)?
                    .reshape((len, row))?,
            );
            offset += len;
        }
        let out = Tensor::cat(&outputs, 0)?.unsqueeze(0)?;
        self.o_proj.forward(&out)
    }
}

impl Attention {
    /// Attention outputs (`[n, heads * head_dim]`) of the single-token sequences among `seqs`,
    /// in order, computed on the pools in place (`layers/decode_attention.rs`); `None` when the
    /// pools are not f32 in CPU memory.
    fn decode_single_tokens(
        &self,
        q: &Tensor,
        seqs: &[SeqSlice],
        cache: &PagedKvCache,
        layer: usize,
        first_key: &dyn Fn(&SeqSlice) -> usize,
    ) -> Result<Option<Tensor>> {
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            ..
        } = self.shape;
        if cache.with_f32_pools(layer, |_, _| ())?.is_none() {
            return Ok(None);
        }
        let row = num_heads * head_dim;
        // [heads, T, d] -> one row of heads * d per token.
        let q_rows: Vec<f32> = q
            .transpose(0, 1)?
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1()?;
        let mut queries = Vec::new();
        let mut offset = 0;
        for seq in seqs {
            let len = seq.tokens.len();
            if len == 1 {
                queries.push(DecodeQuery {
                    q: &q_rows[offset * row..(offset + 1) * row],
                    slots: cache.slots(seq.block_table, first_key(seq), seq.start + 1)?,
                });
            }
            offset += len;
        }
        let shape = HeadShape {
            num_heads,
            num_kv_heads,
            head_dim,
            scale: self.scale as f32,
        };
        let Some(out) =
            cache.with_f32_pools(layer, |k, v| decode_attention(shape, &queries, k, v))?
        else {
            return Ok(None);
        };
        Ok(Some(Tensor::from_vec(
            out?,
            (queries.len(), row),
            q.device(),
        )?))
    }
}

/// The additive causal mask for `len` new positions after `offset` cached ones:
/// `[len, offset + len]`, 0 where visible and -inf where in the future.
pub fn causal_mask(len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    attention_mask(len, offset, 0, None, device)
}

/// The additive mask for `len` new positions after `offset` cached ones over the keys from
/// `first_key` on: `[len, offset + len - first_key]`, 0 where the key is neither in the future
/// nor (with a sliding `window`) `window` or more positions back, -inf elsewhere.
pub fn attention_mask(
    len: usize,
    offset: usize,
    first_key: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let total = offset + len;
    let window = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            let query = offset + i;
            (first_key..total).map(move |key| {
                if key > query || query - key >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, total - first_key), device)
}

impl Attention {
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ]
    }

    pub(crate) fn weight_bytes(&self, linear: &dyn Fn(&Linear) -> usize) -> usize {
        linear(&self.q_proj) + linear(&self.k_proj) + linear(&self.v_proj) + linear(&self.o_proj)
    }
}
