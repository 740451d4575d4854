//! The decoder-only transformer stack shared by Llama-family architectures
//! (embedding → N × [norm → attention → residual → norm → gated MLP → residual] → norm → head).
//!
//! Architectures differ only in config values (biases, activation, rope scaling, tying), which
//! each architecture file turns into a [`DecoderSpec`].

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::attention::{Attention, AttentionShape};
use super::linear::Linear;
use super::mlp::{Activation, GatedMlp};
use super::norm::RmsNorm;
use super::rotary::{RopeScaling, RotaryEmbedding};
use crate::kv_cache::{KvLayout, PagedKvCache, SeqSlice};
use crate::model::Logits;

/// The dtype hidden states are computed in for weights of dtype `weights` on `device`.
///
/// On CPU always f32: reduced-precision weights are widened as they are read (in the
/// small-batch kernel, or once per prefill GEMM), so bf16 halves memory and decode traffic
/// without rounding activations, and every elementwise op runs on candle's vectorised f32 paths.
pub fn activation_dtype(weights: DType, device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        weights
    }
}

/// Everything the shared stack needs to know about an architecture.
#[derive(Debug, Clone)]
pub struct DecoderSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub attention: AttentionShape,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub mlp_bias: bool,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

impl DecoderLayer {
    fn new(spec: &DecoderSpec, activations: DType, vb: VarBuilder) -> Result<Self> {
        let norm_vb = vb.to_dtype(activations);
        Ok(Self {
            input_layernorm: RmsNorm::new(
                spec.hidden_size,
                spec.rms_norm_eps,
                norm_vb.pp("input_layernorm"),
            )?,
            self_attn: Attention::new(spec.attention, activations, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                spec.hidden_size,
                spec.rms_norm_eps,
                norm_vb.pp("post_attention_layernorm"),
            )?,
            mlp: GatedMlp::new(
                spec.hidden_size,
                spec.intermediate_size,
                spec.mlp_bias,
                spec.activation,
                activations,
                vb.pp("mlp"),
            )?,
        })
    }
}

/// A loaded decoder: weights only, no state.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    spec: DecoderSpec,
    activations: DType,
}

impl Decoder {
    /// Loads the stack from a Hugging Face checkpoint laid out as `model.*` and `lm_head.*`:
    /// matrices in the builder's dtype, norms and biases in the activation dtype.
    pub fn new(spec: DecoderSpec, vb: VarBuilder) -> Result<Self> {
        let activations = activation_dtype(vb.dtype(), vb.device());
        let model_vb = vb.pp("model");
        let embed_weight =
            model_vb.get((spec.vocab_size, spec.hidden_size), "embed_tokens.weight")?;
        let embed_tokens = Embedding::new(embed_weight.clone(), spec.hidden_size);
        let layers = (0..spec.num_layers)
            .map(|i| DecoderLayer::new(&spec, activations, model_vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            spec.hidden_size,
            spec.rms_norm_eps,
            model_vb.to_dtype(activations).pp("norm"),
        )?;
        let lm_head_weight = if spec.tie_word_embeddings {
            embed_weight
        } else {
            vb.get((spec.vocab_size, spec.hidden_size), "lm_head.weight")?
        };
        let rotary = RotaryEmbedding::new(
            spec.attention.head_dim,
            spec.rope_theta,
            spec.rope_scaling.clone(),
        );
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head: Linear::new(lm_head_weight, None).with_name(if spec.tie_word_embeddings {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            }),
            rotary,
            spec,
            activations,
        })
    }

    /// The dtype of hidden states and of the KV cache.
    pub fn activations(&self) -> DType {
        self.activations
    }

    pub fn spec(&self) -> &DecoderSpec {
        &self.spec
    }

    /// The layout of one cached token: keys and values of every layer.
    pub fn kv_layout(&self) -> KvLayout {
        let width = self.spec.attention.num_kv_heads * self.spec.attention.head_dim;
        KvLayout {
            num_layers: self.spec.num_layers,
            k_width: width,
            v_width: width,
            dtype: self.activations,
        }
    }

    /// One forward over the new tokens of several sequences (see [`SeqSlice`]), writing their
    /// keys and values through their block tables; returns f32 logits `[rows, vocab]` for the
    /// rows `which` selects (`Last`: one per sequence; `All`: every token, packed; `Marked`:
    /// every token of marked sequences, the last of the others).
    pub fn forward(
        &self,
        seqs: &[SeqSlice],
        cache: &PagedKvCache,
        which: Logits,
    ) -> Result<Tensor> {
        let device = self.embed_tokens.embeddings().device().clone();
        let dtype = self.activations;
        let batch = PackedBatch::new(seqs, &device)?;
        let mut xs = self.embed_tokens.forward(&batch.ids)?.to_dtype(dtype)?;
        let (cos, sin) = batch.cos_sin(&self.rotary, dtype, &device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = &xs;
            let h = layer.input_layernorm.forward(&xs)?;
            let h = layer.self_attn.forward(&h, &cos, &sin, seqs, cache, i)?;
            let xs_attn = (residual + h)?;
            let h = layer.post_attention_layernorm.forward(&xs_attn)?;
            let h = layer.mlp.forward(&h)?;
            xs = (xs_attn + h)?;
        }
        let xs = batch.select(&xs, which)?;
        let xs = self.norm.forward(&xs)?;
        self.lm_head
            .forward(&xs)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)
    }
}

/// The new tokens of a batch of sequences, packed one after another as `[1, T]`.
pub(crate) struct PackedBatch<'a> {
    pub ids: Tensor,
    seqs: &'a [SeqSlice<'a>],
}

impl<'a> PackedBatch<'a> {
    pub fn new(seqs: &'a [SeqSlice<'a>], device: &Device) -> Result<Self> {
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("forward needs at least one token for every sequence");
        }
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        Ok(Self {
            ids: Tensor::new(ids, device)?.unsqueeze(0)?,
            seqs,
        })
    }

    /// Rotary cos/sin `[T, dim / 2]` for every packed token at its own sequence's position.
    pub fn cos_sin(
        &self,
        rotary: &RotaryEmbedding,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (cos, sin): (Vec<Tensor>, Vec<Tensor>) = self
            .seqs
            .iter()
            .map(|s| rotary.cos_sin(s.start, s.tokens.len(), dtype, device))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        Ok((Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?))
    }

    /// The rows of `xs` (`[1, T, hidden]`) that `which` asks logits for.
    pub fn select(&self, xs: &Tensor, which: Logits) -> Result<Tensor> {
        match which {
            Logits::All => Ok(xs.clone()),
            Logits::Last | Logits::Marked => {
                let mut end = 0u32;
                let mut rows = Vec::with_capacity(self.seqs.len());
                for s in self.seqs {
                    let start = end;
                    end += s.tokens.len() as u32;
                    if which == Logits::Marked && s.all_logits {
                        rows.extend(start..end);
                    } else {
                        rows.push(end - 1);
                    }
                }
                xs.index_select(&Tensor::new(rows, xs.device())?, 1)
            }
        }
    }
}

impl Decoder {
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
        for layer in &self.layers {
            total += layer.self_attn.weight_bytes(&linear);
            total += layer.mlp.weight_bytes(&linear);
            total +=
                2 * self.spec.hidden_size * self.embed_tokens.embeddings().dtype().size_in_bytes();
        }
        total + self.spec.hidden_size * self.embed_tokens.embeddings().dtype().size_in_bytes()
    }
}
