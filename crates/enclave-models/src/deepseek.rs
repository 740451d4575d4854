//! `DeepseekV2ForCausalLM` and `DeepseekV3ForCausalLM`: DeepSeek-V2, V2-Lite, V2.5, V3 and R1.
//!
//! Two things set them apart from the Llama family, and both are what make them cheap to serve:
//! - **Multi-head Latent Attention.** Keys and values are up-projected from one small latent per
//!   token (`kv_lora_rank`) plus one rotary key shared by all heads (`qk_rope_head_dim`); the
//!   cache keeps only those. Long inputs expand the latents into per-head keys and values (the
//!   cheaper form when many queries share them); short ones (decoding) fold the key
//!   up-projection into the query and apply the value up-projection after attention, so each
//!   step reads `kv_lora_rank + qk_rope_head_dim` values per cached token and head, never
//!   expanded keys.
//! - **DeepSeekMoE** (see [`crate::layers::moe`]) from layer `first_k_dense_replace` on.
//!
//! Semantics follow DeepSeek's reference code and transformers' native classes (rotary on
//! adjacent pairs, YaRN `mscale_all_dim` on the softmax scale, the two latent norms at eps 1e-6).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use crate::kv_cache::{KvLayout, PagedKvCache, SeqSlice};
use crate::layers::attention::causal_mask;
use crate::layers::decoder::{activation_dtype, PackedBatch};
use crate::layers::linear::Linear;
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::moe::{ExpertCounters, MoeShape, RouterSpec, Scoring, SparseMoe, TopkMethod};
use crate::layers::norm::RmsNorm;
use crate::layers::rotary::{yarn_mscale, RopeScaling, RotaryEmbedding};
use crate::model::Logits;

/// Which DeepSeek generation a config belongs to: they differ in defaults and in how the
/// router scales its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    V2,
    V3,
}

/// The eps of `q_a_layernorm` and `kv_a_layernorm`: fixed in the reference, not `rms_norm_eps`.
const LATENT_NORM_EPS: f64 = 1e-6;

/// `config.json` of a DeepSeek-V2/V3 checkpoint; field names as Hugging Face writes them.
/// Fields whose default differs between V2 and V3 are optional here and resolved in [`Config::spec`].
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "crate::hf_defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "crate::hf_defaults::rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "crate::hf_defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "one")]
    pub moe_layer_freq: usize,
    pub topk_method: Option<String>,
    pub scoring_func: Option<String>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub routed_scaling_factor: Option<f64>,
    /// Multi-token-prediction layers stored after the decoder layers; not used for decoding.
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    #[serde(default = "yes")]
    pub rope_interleave: bool,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// Everything the model needs, validated.
#[derive(Debug, Clone)]
pub struct Spec {
    pub generation: Generation,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rope_interleave: bool,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)²` under YaRN.
    pub softmax_scale: f64,
    /// `None` when every layer is dense.
    pub moe: Option<MoeSpec>,
}

#[derive(Debug, Clone)]
pub struct MoeSpec {
    pub router: RouterSpec,
    pub expert_intermediate: usize,
    pub n_shared: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

impl Spec {
    /// Whether decoder layer `layer` has a MoE block (the reference's rule).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| {
            layer >= m.first_k_dense_replace && layer.is_multiple_of(m.moe_layer_freq.max(1))
        })
    }

    /// Cached values per token and layer: the latent and the shared rotary key.
    pub fn latent_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

impl Config {
    /// Validates the config; `Err` names the offending field.
    pub fn spec(&self, generation: Generation) -> std::result::Result<Spec, String> {
        let activation = Activation::from_hf(&self.hidden_act)
            .ok_or_else(|| format!("hidden_act: {:?} is not supported", self.hidden_act))?;
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(format!("{name}: must be positive"))
            } else {
                Ok(())
            }
        };
        positive("num_attention_heads", self.num_attention_heads)?;
        positive("kv_lora_rank", self.kv_lora_rank)?;
        positive("qk_rope_head_dim", self.qk_rope_head_dim)?;
        positive("v_head_dim", self.v_head_dim)?;
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(format!(
                "qk_rope_head_dim: {} must be even (rotary pairs)",
                self.qk_rope_head_dim
            ));
        }
        if self.q_lora_rank == Some(0) {
            return Err("q_lora_rank: must be positive or null".into());
        }
        let rope_scaling =
            RopeScaling::from_hf(self.rope_scaling.as_ref(), self.max_position_embeddings)?;
        let qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim;
        let mut softmax_scale = 1.0 / (qk_head_dim as f64).sqrt();
        if let Some(obj) = self.rope_scaling.as_ref().and_then(Value::as_object) {
            let mscale_all_dim = obj
                .get("mscale_all_dim")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            let factor = obj.get("factor").and_then(Value::as_f64);
            if let (true, Some(factor)) = (mscale_all_dim != 0.0, factor) {
                let m = yarn_mscale(factor, mscale_all_dim);
                softmax_scale *= m * m;
            }
        }
        let moe = self.moe_spec(generation)?;
        Ok(Spec {
            generation,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling,
            rope_interleave: self.rope_interleave,
            activation,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
            softmax_scale,
            moe,
        })
    }

    fn moe_spec(&self, generation: Generation) -> std::result::Result<Option<MoeSpec>, String> {
        let Some(num_experts) = self.n_routed_experts.filter(|&n| n > 0) else {
            return Ok(None);
        };
        let v3 = generation == Generation::V3;
        let top_k = self
            .num_experts_per_tok
            .ok_or("num_experts_per_tok: missing (required with n_routed_experts)")?;
        if top_k == 0 || top_k > num_experts {
            return Err(format!(
                "num_experts_per_tok: {top_k} must be between 1 and n_routed_experts ({num_experts})"
            ));
        }
        let method_name =
            self.topk_method
                .as_deref()
                .unwrap_or(if v3 { "noaux_tc" } else { "greedy" });
        let method = match method_name {
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "noaux_tc" => TopkMethod::NoauxTc,
            other => {
                return Err(unsupported(
                    "topk_method",
                    other,
                    "greedy, group_limited_greedy, noaux_tc",
                ))
            }
        };
        let scoring_name =
            self.scoring_func
                .as_deref()
                .unwrap_or(if v3 { "sigmoid" } else { "softmax" });
        let scoring = match scoring_name {
            "softmax" => Scoring::Softmax,
            "sigmoid" => Scoring::Sigmoid,
            other => return Err(unsupported("scoring_func", other, "softmax, sigmoid")),
        };
        let (n_group, topk_group) = if method == TopkMethod::Greedy {
            (1, 1)
        } else {
            let n_group = self
                .n_group
                .ok_or_else(|| format!("n_group: missing (required by topk_method {method:?})"))?;
            let topk_group = self.topk_group.ok_or_else(|| {
                format!("topk_group: missing (required by topk_method {method:?})")
            })?;
            if n_group == 0 || !num_experts.is_multiple_of(n_group) {
                return Err(format!(
                    "n_group: {n_group} must divide n_routed_experts ({num_experts})"
                ));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(format!(
                    "topk_group: {topk_group} must be between 1 and n_group ({n_group})"
                ));
            }
            if topk_group * (num_experts / n_group) < top_k {
                return Err(format!(
                    "num_experts_per_tok: {top_k} exceeds the experts of topk_group ({topk_group}) groups of {}",
                    num_experts / n_group
                ));
            }
            (n_group, topk_group)
        };
        if self.moe_layer_freq == 0 {
            return Err("moe_layer_freq: must be positive".into());
        }
        let expert_intermediate = self
            .moe_intermediate_size
            .ok_or("moe_intermediate_size: missing (required with n_routed_experts)")?;
        Ok(Some(MoeSpec {
            router: RouterSpec {
                num_experts,
                top_k,
                scoring,
                method,
                n_group,
                topk_group,
                norm_topk_prob: self.norm_topk_prob.unwrap_or(v3),
                routed_scaling_factor: self.routed_scaling_factor.unwrap_or(if v3 {
                    2.5
                } else {
                    1.0
                }),
                scale_after_norm: v3,
            },
            expert_intermediate,
            n_shared: self.n_shared_experts.unwrap_or(0),
            first_k_dense_replace: self.first_k_dense_replace,
            moe_layer_freq: self.moe_layer_freq,
        }))
    }
}

fn unsupported(field: &str, value: &str, supported: &str) -> String {
    format!("{field}: {value:?} is not supported ({supported})")
}

/// Which MLA form a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaForm {
    /// The cheaper of the two for the shape at hand (see [`MlaAttention::absorbed_is_cheaper`]).
    #[default]
    Auto,
    /// Latents expanded to per-head keys and values.
    Expanded,
    /// Key up-projection folded into the query, value up-projection after attention.
    Absorbed,
}

#[derive(Debug, Clone)]
enum QueryProjection {
    Direct(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// One sequence's attention inputs: `q_nope` `[heads, len, nope]`, rotated `q_pe`
/// `[heads, len, rope]`, its cached latents `[total, rank]` and rotary keys `[total, rope]`, the
/// causal mask (None for one query), `len` and `total`.
type AttendArgs<'a> = (
    &'a Tensor,
    &'a Tensor,
    &'a Tensor,
    &'a Tensor,
    Option<&'a Tensor>,
    usize,
    usize,
);

/// Multi-head Latent Attention over a latent cache.
#[derive(Debug, Clone)]
struct MlaAttention {
    q: QueryProjection,
    kv_a: Linear,
    kv_a_norm: RmsNorm,
    /// `kv_b_proj` split per head into its key part `[heads, nope, rank]` and value part
    /// `[heads, v, rank]`, in the activation dtype: both forms multiply by them directly.
    w_uk: Tensor,
    w_uv: Tensor,
    o_proj: Linear,
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    rank: usize,
    scale: f64,
    interleaved: bool,
}

impl MlaAttention {
    fn new(spec: &Spec, activations: DType, vb: VarBuilder) -> Result<Self> {
        let hidden = spec.hidden_size;
        let heads = spec.num_heads;
        let qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim;
        let rank = spec.kv_lora_rank;
        let norm_vb = vb.to_dtype(activations);
        let q = match spec.q_lora_rank {
            None => QueryProjection::Direct(Linear::load(
                hidden,
                heads * qk,
                false,
                activations,
                vb.pp("q_proj"),
            )?),
            Some(q_rank) => QueryProjection::LowRank {
                a: Linear::load(
                    hidden,
                    q_rank,
                    spec.attention_bias,
                    activations,
                    vb.pp("q_a_proj"),
                )?,
                norm: RmsNorm::new(q_rank, LATENT_NORM_EPS, norm_vb.pp("q_a_layernorm"))?,
                b: Linear::load(q_rank, heads * qk, false, activations, vb.pp("q_b_proj"))?,
            },
        };
        let kv_a = Linear::load(
            hidden,
            rank + spec.qk_rope_head_dim,
            spec.attention_bias,
            activations,
            vb.pp("kv_a_proj_with_mqa"),
        )?;
        let kv_a_norm = RmsNorm::new(rank, LATENT_NORM_EPS, norm_vb.pp("kv_a_layernorm"))?;
        let per_head = spec.qk_nope_head_dim + spec.v_head_dim;
        let kv_b = vb
            .get((heads * per_head, rank), "kv_b_proj.weight")?
            .to_dtype(activations)?
            .reshape((heads, per_head, rank))?;
        let w_uk = kv_b.narrow(1, 0, spec.qk_nope_head_dim)?.contiguous()?;
        let w_uv = kv_b
            .narrow(1, spec.qk_nope_head_dim, spec.v_head_dim)?
            .contiguous()?;
        let o_proj = Linear::load(
            heads * spec.v_head_dim,
            hidden,
            spec.attention_bias,
            activations,
            vb.pp("o_proj"),
        )?;
        Ok(Self {
            q,
            kv_a,
            kv_a_norm,
            w_uk,
            w_uv,
            o_proj,
            heads,
            nope: spec.qk_nope_head_dim,
            rope: spec.qk_rope_head_dim,
            v: spec.v_head_dim,
            rank,
            scale: spec.softmax_scale,
            interleaved: spec.rope_interleave,
        })
    }

    /// Multiply-adds per head of each form for `len` queries over `total` cached positions.
    /// Expanded pays `total · rank · (nope + v)` to expand every latent; absorbed attends in the
    /// wider latent space. Decoding (len 1) is ~100x cheaper absorbed at DeepSeek-V3's sizes; a
    /// fresh prefill (len = total) is cheaper expanded.
    fn absorbed_is_cheaper(&self, len: usize, total: usize) -> bool {
        let expanded = total * self.rank * (self.nope + self.v)
            + len * total * (self.nope + self.rope + self.v);
        let absorbed = len * self.nope * self.rank
            + len * total * (2 * self.rank + self.rope)
            + len * self.rank * self.v;
        absorbed < expanded
    }

    fn rotate(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.interleaved {
            RotaryEmbedding::apply_interleaved(xs, cos, sin)
        } else {
            RotaryEmbedding::apply(xs, cos, sin)
        }
    }

    /// MLA for a packed batch (`xs` `[1, T, hidden]`, `cos`/`sin` `[T, rope / 2]`): each
    /// sequence's latents and rotary keys go into `cache` through its block table.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &[SeqSlice],
        cache: &PagedKvCache,
        layer: usize,
        form: MlaForm,
    ) -> Result<Tensor> {
        let (_, tokens, _) = xs.dims3()?;
        let (heads, nope, rope) = (self.heads, self.nope, self.rope);
        let q = match &self.q {
            QueryProjection::Direct(q) => q.forward(xs)?,
            QueryProjection::LowRank { a, norm, b } => {
                b.forward(&norm.forward(&a.forward(xs)?)?)?
            }
        };
        let q = q.reshape((tokens, heads, nope + rope))?.transpose(0, 1)?; // [heads, T, qk]
        let q_nope = q.narrow(2, 0, nope)?.contiguous()?;
        let q_pe = self
            .rotate(&q.narrow(2, nope, rope)?.unsqueeze(0)?, cos, sin)?
            .squeeze(0)?;

        let kv = self.kv_a.forward(xs)?; // [1, T, rank + rope]
        let latent = self
            .kv_a_norm
            .forward(&kv.narrow(2, 0, self.rank)?)?
            .squeeze(0)?;
        let k_pe = self
            .rotate(&kv.narrow(2, self.rank, rope)?.unsqueeze(0)?, cos, sin)?
            .reshape((tokens, rope))?;
        let mut outputs = Vec::with_capacity(seqs.len());
        let mut offset = 0;
        for seq in seqs {
            let len = seq.tokens.len();
            let total = seq.start + len;
            // The cache keeps exactly these two per token: the latent and the rotary key.
            let (latent_all, k_pe_all) = cache.write_and_gather(
                layer,
                seq.block_table,
                seq.start,
                &latent.narrow(0, offset, len)?,
                &k_pe.narrow(0, offset, len)?,
            )?;
            let q_nope = q_nope.narrow(1, offset, len)?.contiguous()?;
            let q_pe = q_pe.narrow(1, offset, len)?.contiguous()?;
            let mask = if len > 1 {
                Some(causal_mask(len, seq.start, xs.device())?)
            } else {
                None
            };
            let absorbed = match form {
                MlaForm::Auto => self.absorbed_is_cheaper(len, total),
                MlaForm::Expanded => false,
                MlaForm::Absorbed => true,
            };
            let args = (
                &q_nope,
                &q_pe,
                &latent_all,
                &k_pe_all,
                mask.as_ref(),
                len,
                total,
            );
            let out = if absorbed {
                self.attend_absorbed(args)?
            } else {
                self.attend_expanded(args)?
            }; // [heads, len, v]
            outputs.push(out.transpose(0, 1)?.reshape((len, heads * self.v))?);
            offset += len;
        }
        self.o_proj
            .forward(&Tensor::cat(&outputs, 0)?.unsqueeze(0)?)
    }

    fn softmax(&self, scores: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let scores = (scores * self.scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)
    }

    fn attend_expanded(&self, args: AttendArgs) -> Result<Tensor> {
        let (q_nope, q_pe, latent, k_pe, mask, len, total) = args;
        let heads = self.heads;
        // [total, rank] x [rank, heads * dim] → per-head keys and values for every position.
        let expand = |w: &Tensor, dim: usize| -> Result<Tensor> {
            latent
                .matmul(&w.reshape((heads * dim, self.rank))?.t()?)?
                .reshape((total, heads, dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let k_nope = expand(&self.w_uk, self.nope)?; // [heads, total, nope]
        let v = expand(&self.w_uv, self.v)?; // [heads, total, v]
        let scores =
            (q_nope.matmul(&k_nope.t()?)? + q_pe.contiguous()?.broadcast_matmul(&k_pe.t()?)?)?; // [heads, len, total]
        let probs = self.softmax(scores, mask)?.to_dtype(v.dtype())?;
        debug_assert_eq!(probs.dims(), [heads, len, total]);
        probs.matmul(&v)
    }

    fn attend_absorbed(&self, args: AttendArgs) -> Result<Tensor> {
        let (q_nope, q_pe, latent, k_pe, mask, len, total) = args;
        let heads = self.heads;
        // Fold W_UK into the query: q_nope·(W_UK c)ᵀ = (q_nope W_UK)·cᵀ, per head.
        let q_latent = q_nope.matmul(&self.w_uk)?; // [heads, len, rank]
        let rows = heads * len;
        let scores = (q_latent.reshape((rows, self.rank))?.matmul(&latent.t()?)?
            + q_pe
                .contiguous()?
                .reshape((rows, self.rope))?
                .matmul(&k_pe.t()?)?)?
        .reshape((heads, len, total))?;
        let probs = self.softmax(scores, mask)?.to_dtype(latent.dtype())?;
        // Attend over latents, then apply W_UV: Σ p·(W_UV c) = W_UV (Σ p·c).
        let context = probs.reshape((rows, total))?.matmul(latent)?; // [rows, rank]
        context
            .reshape((heads, len, self.rank))?
            .matmul(&self.w_uv.transpose(1, 2)?)
    }

    fn for_each_linear_mut(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        match &mut self.q {
            QueryProjection::Direct(q) => f(q)?,
            QueryProjection::LowRank { a, b, .. } => {
                f(a)?;
                f(b)?;
            }
        }
        f(&mut self.kv_a)?;
        f(&mut self.o_proj)
    }

    fn weight_bytes(&self, linear: &dyn Fn(&Linear) -> usize) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let q = match &self.q {
            QueryProjection::Direct(q) => linear(q),
            QueryProjection::LowRank { a, b, .. } => linear(a) + linear(b),
        };
        q + linear(&self.kv_a) + bytes(&self.w_uk) + bytes(&self.w_uv) + linear(&self.o_proj)
    }
}

#[derive(Debug, Clone)]
enum FeedForward {
    Dense(GatedMlp),
    Moe(SparseMoe),
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: MlaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

/// A loaded DeepSeek-V2/V3 model: weights only, no state.
#[derive(Debug, Clone)]
pub struct Deepseek {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    spec: Spec,
    activations: DType,
    counters: Arc<ExpertCounters>,
    form: MlaForm,
}

/// Expert evaluations since load, summed over MoE layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertStats {
    /// Σ over routed experts of the token rows each ran on.
    pub routed_rows: u64,
    /// Token rows the shared experts ran on.
    pub shared_rows: u64,
}

impl Deepseek {
    /// Loads `model.*` and `lm_head.*` for `spec`; tensors of MTP layers (indices from
    /// `num_hidden_layers` on) are never requested, so they are skipped.
    pub fn new(spec: Spec, vb: VarBuilder) -> Result<Self> {
        let activations = activation_dtype(vb.dtype(), vb.device());
        let counters = Arc::new(ExpertCounters::default());
        let model_vb = vb.pp("model");
        let norm_vb = model_vb.to_dtype(activations);
        let embed_weight =
            model_vb.get((spec.vocab_size, spec.hidden_size), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(spec.num_layers);
        for i in 0..spec.num_layers {
            let layer_vb = model_vb.pp("layers").pp(i);
            let mlp = match (&spec.moe, spec.is_moe_layer(i)) {
                (Some(moe), true) => FeedForward::Moe(SparseMoe::new(
                    moe.router.clone(),
                    MoeShape {
                        hidden: spec.hidden_size,
                        expert_intermediate: moe.expert_intermediate,
                        n_shared: moe.n_shared,
                        activation: spec.activation,
                    },
                    activations,
                    counters.clone(),
                    layer_vb.pp("mlp"),
                )?),
                _ => FeedForward::Dense(GatedMlp::new(
                    spec.hidden_size,
                    spec.intermediate_size,
                    false,
                    spec.activation,
                    activations,
                    layer_vb.pp("mlp"),
                )?),
            };
            let layer_norm_vb = norm_vb.pp("layers").pp(i);
            layers.push(Layer {
                input_layernorm: RmsNorm::new(
                    spec.hidden_size,
                    spec.rms_norm_eps,
                    layer_norm_vb.pp("input_layernorm"),
                )?,
                self_attn: MlaAttention::new(&spec, activations, layer_vb.pp("self_attn"))?,
                post_attention_layernorm: RmsNorm::new(
                    spec.hidden_size,
                    spec.rms_norm_eps,
                    layer_norm_vb.pp("post_attention_layernorm"),
                )?,
                mlp,
            });
        }
        let norm = RmsNorm::new(spec.hidden_size, spec.rms_norm_eps, norm_vb.pp("norm"))?;
        let lm_head_weight = if spec.tie_word_embeddings {
            embed_weight.clone()
        } else {
            vb.get((spec.vocab_size, spec.hidden_size), "lm_head.weight")?
        };
        let rotary = RotaryEmbedding::new(
            spec.qk_rope_head_dim,
            spec.rope_theta,
            spec.rope_scaling.clone(),
        );
        Ok(Self {
            embed_tokens: Embedding::new(embed_weight, spec.hidden_size),
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
            counters,
            form: MlaForm::Auto,
        })
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn activations(&self) -> DType {
        self.activations
    }

    /// Forces one MLA form (tests and benchmarks compare them); `Auto` by default.
    pub fn set_mla_form(&mut self, form: MlaForm) {
        self.form = form;
    }

    pub fn expert_stats(&self) -> ExpertStats {
        ExpertStats {
            routed_rows: self.counters.routed_rows.load(Ordering::Relaxed),
            shared_rows: self.counters.shared_rows.load(Ordering::Relaxed),
        }
    }

    /// The layout of one cached token: per layer the latent and the rotary key.
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            num_layers: self.spec.num_layers,
            k_width: self.spec.kv_lora_rank,
            v_width: self.spec.qk_rope_head_dim,
            dtype: self.activations,
        }
    }

    /// One forward over the new tokens of several sequences (see [`SeqSlice`]); returns f32
    /// logits for the rows `which` selects (`Last`: one per sequence; `All`: every token).
    pub fn forward(
        &self,
        seqs: &[SeqSlice],
        cache: &PagedKvCache,
        which: Logits,
    ) -> Result<Tensor> {
        let device: Device = self.embed_tokens.embeddings().device().clone();
        let batch = PackedBatch::new(seqs, &device)?;
        let mut xs = self
            .embed_tokens
            .forward(&batch.ids)?
            .to_dtype(self.activations)?;
        let (cos, sin) = batch.cos_sin(&self.rotary, self.activations, &device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&xs)?;
            let h = layer
                .self_attn
                .forward(&h, &cos, &sin, seqs, cache, i, self.form)?;
            let xs_attn = (&xs + h)?;
            let h = layer.post_attention_layernorm.forward(&xs_attn)?;
            let h = match &layer.mlp {
                FeedForward::Dense(mlp) => mlp.forward(&h)?,
                FeedForward::Moe(moe) => moe.forward(&h)?,
            };
            xs = (xs_attn + h)?;
        }
        let xs = batch.select(&xs, which)?;
        let xs = self.norm.forward(&xs)?;
        self.lm_head.forward(&xs)?.squeeze(0)?.to_dtype(DType::F32)
    }

    /// Every projection matrix (attention, MLPs, experts, head), for quantizing after load.
    pub fn for_each_linear_mut(
        &mut self,
        f: &mut dyn FnMut(&mut Linear) -> Result<()>,
    ) -> Result<()> {
        for layer in &mut self.layers {
            layer.self_attn.for_each_linear_mut(f)?;
            match &mut layer.mlp {
                FeedForward::Dense(mlp) => {
                    for linear in mlp.linears_mut() {
                        f(linear)?;
                    }
                }
                FeedForward::Moe(moe) => moe.for_each_linear_mut(f)?,
            }
        }
        f(&mut self.lm_head)
    }

    /// Bytes of weights held (the tied head counted once unless quantized apart).
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let linear = |l: &Linear| l.weight_bytes();
        let mut total = bytes(self.embed_tokens.embeddings());
        if !self.spec.tie_word_embeddings || self.lm_head.quantized_dtype().is_some() {
            total += linear(&self.lm_head);
        }
        for layer in &self.layers {
            total += layer.self_attn.weight_bytes(&linear);
            total += match &layer.mlp {
                FeedForward::Dense(mlp) => mlp.weight_bytes(&linear),
                FeedForward::Moe(moe) => moe.weight_bytes(&linear),
            };
        }
        total
    }
}
