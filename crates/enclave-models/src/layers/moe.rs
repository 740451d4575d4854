//! Mixture of experts (DeepSeekMoE): a router picks `top_k` routed experts per token, each
//! expert runs once over the tokens routed to it, and shared experts run on every token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::Linear;
use super::mlp::{Activation, GatedMlp};

/// How router logits become scores (`scoring_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

/// How the experts of a token are chosen from its scores (`topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// The `top_k` best scores (DeepSeek-V2-Lite).
    Greedy,
    /// Only among the `topk_group` groups with the best single score (DeepSeek-V2).
    GroupLimitedGreedy,
    /// Scores plus `e_score_correction_bias` choose; groups ranked by the sum of their two best
    /// (DeepSeek-V3/R1). The weights are the unbiased scores.
    NoauxTc,
}

/// The router's configuration, validated by the architecture's config parser.
#[derive(Debug, Clone)]
pub struct RouterSpec {
    pub num_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    pub method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    /// DeepSeek-V3 multiplies by `routed_scaling_factor` after normalising; DeepSeek-V2's
    /// reference applies the factor only when it does not normalise.
    pub scale_after_norm: bool,
}

/// One token's choice: expert indices and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl RouterSpec {
    /// Routes one token from its raw router logits (`num_experts` values, f32).
    pub fn route(&self, logits: &[f32], bias: Option<&[f32]>) -> Routing {
        let scores: Vec<f32> = match self.scoring {
            Scoring::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                exps.into_iter().map(|e| e / sum).collect()
            }
            Scoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
        };
        let mut choice: Vec<f32> = match (self.method, bias) {
            (TopkMethod::NoauxTc, Some(bias)) => {
                scores.iter().zip(bias).map(|(s, b)| s + b).collect()
            }
            _ => scores.clone(),
        };
        if self.method != TopkMethod::Greedy && self.n_group > 1 {
            let per_group = self.num_experts / self.n_group;
            let group_score = |g: &[f32]| -> f32 {
                match self.method {
                    TopkMethod::NoauxTc => {
                        top_indices(g, 2.min(g.len())).iter().map(|&i| g[i]).sum()
                    }
                    _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                }
            };
            let group_scores: Vec<f32> = choice.chunks(per_group).map(group_score).collect();
            let kept = top_indices(&group_scores, self.topk_group);
            for (g, chunk) in choice.chunks_mut(per_group).enumerate() {
                if !kept.contains(&g) {
                    // -inf (as DeepSeek's inference code), so a masked expert is never chosen.
                    chunk.fill(f32::NEG_INFINITY);
                }
            }
        }
        let experts = top_indices(&choice, self.top_k);
        let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
        let normalise = self.top_k > 1 && self.norm_topk_prob;
        if normalise {
            let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        if !normalise || self.scale_after_norm {
            let factor = self.routed_scaling_factor as f32;
            weights.iter_mut().for_each(|w| *w *= factor);
        }
        Routing { experts, weights }
    }
}

/// Indices of the `k` largest values, best first (ties: the lower index first).
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// How many token rows the experts of a layer have processed, for tests and metrics.
#[derive(Debug, Default)]
pub struct ExpertCounters {
    /// Σ over routed experts of the tokens each ran on.
    pub routed_rows: AtomicU64,
    /// Tokens the shared experts ran on.
    pub shared_rows: AtomicU64,
}

/// A DeepSeekMoE feed-forward block.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    router: Linear,
    correction_bias: Option<Vec<f32>>,
    spec: RouterSpec,
    experts: Vec<GatedMlp>,
    shared: Option<GatedMlp>,
    counters: Arc<ExpertCounters>,
}

/// Sizes of a [`SparseMoe`].
#[derive(Debug, Clone, Copy)]
pub struct MoeShape {
    pub hidden: usize,
    pub expert_intermediate: usize,
    /// Shared experts, fused into one MLP `n_shared × expert_intermediate` wide.
    pub n_shared: usize,
    pub activation: Activation,
}

impl SparseMoe {
    /// Loads `gate.weight` (kept in f32: routing decisions are made in f32 as the reference
    /// does), `gate.e_score_correction_bias` for `noaux_tc`, `experts.{i}.*` and
    /// `shared_experts.*`.
    pub fn new(
        spec: RouterSpec,
        shape: MoeShape,
        activations: DType,
        counters: Arc<ExpertCounters>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let gate_vb = vb.pp("gate");
        let router = Linear::new(
            gate_vb
                .to_dtype(DType::F32)
                .get((spec.num_experts, shape.hidden), "weight")?,
            None,
        );
        let correction_bias = if spec.method == TopkMethod::NoauxTc {
            let bias = gate_vb
                .to_dtype(DType::F32)
                .get(spec.num_experts, "e_score_correction_bias")?;
            Some(bias.to_vec1::<f32>()?)
        } else {
            None
        };
        let experts = (0..spec.num_experts)
            .map(|i| {
                GatedMlp::new(
                    shape.hidden,
                    shape.expert_intermediate,
                    false,
                    shape.activation,
                    activations,
                    vb.pp("experts").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = if shape.n_shared > 0 {
            Some(GatedMlp::new(
                shape.hidden,
                shape.expert_intermediate * shape.n_shared,
                false,
                shape.activation,
                activations,
                vb.pp("shared_experts"),
            )?)
        } else {
            None
        };
        Ok(Self {
            router,
            correction_bias,
            spec,
            experts,
            shared,
            counters,
        })
    }

    /// `xs` is `[1, len, hidden]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, len, hidden) = xs.dims3()?;
        let rows = xs.reshape((b * len, hidden))?;
        let logits = self
            .router
            .forward(&rows.to_dtype(DType::F32)?)?
            .to_vec2::<f32>()?;
        // Tokens (and their weights) per expert: each expert then runs once, over exactly the
        // tokens routed to it.
        let mut assigned: Vec<(Vec<u32>, Vec<f32>)> =
            vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (token, token_logits) in logits.iter().enumerate() {
            let routing = self
                .spec
                .route(token_logits, self.correction_bias.as_deref());
            for (&e, &w) in routing.experts.iter().zip(&routing.weights) {
                if let Some((tokens, weights)) = assigned.get_mut(e) {
                    tokens.push(token as u32);
                    weights.push(w);
                }
            }
        }
        let mut out = vec![0f32; b * len * hidden];
        let mut routed_rows = 0u64;
        for (expert, (tokens, weights)) in self.experts.iter().zip(&assigned) {
            if tokens.is_empty() {
                continue;
            }
            routed_rows += tokens.len() as u64;
            let index = Tensor::new(tokens.as_slice(), xs.device())?;
            let ys = expert
                .forward(&rows.index_select(&index, 0)?)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for ((&token, &w), y) in tokens.iter().zip(weights).zip(&ys) {
                let dst = &mut out[token as usize * hidden..(token as usize + 1) * hidden];
                dst.iter_mut().zip(y).for_each(|(d, v)| *d += w * v);
            }
        }
        self.counters
            .routed_rows
            .fetch_add(routed_rows, Ordering::Relaxed);
        let routed = Tensor::from_vec(out, (b, len, hidden), xs.device())?.to_dtype(xs.dtype())?;
        match &self.shared {
            Some(shared) => {
                self.counters
                    .shared_rows
                    .fetch_add((b * len) as u64, Ordering::Relaxed);
                routed + shared.forward(xs)?
            }
            None => Ok(routed),
        }
    }

    /// The experts' matrices (routed and shared; the router stays f32).
    pub(crate) fn for_each_linear_mut(
        &mut self,
        f: &mut dyn FnMut(&mut Linear) -> Result<()>,
    ) -> Result<()> {
        for mlp in self.experts.iter_mut().chain(self.shared.as_mut()) {
            for linear in mlp.linears_mut() {
                f(linear)?;
            }
        }
        Ok(())
    }

    pub(crate) fn weight_bytes(&self, linear: &dyn Fn(&Linear) -> usize) -> usize {
        linear(&self.router)
            + self
                .experts
                .iter()
                .map(|e| e.weight_bytes(linear))
                .sum::<usize>()
            + self.shared.as_ref().map_or(0, |s| s.weight_bytes(linear))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(method: TopkMethod, scoring: Scoring) -> RouterSpec {
        RouterSpec {
            num_experts: 8,
            top_k: 2,
            scoring,
            method,
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
            scale_after_norm: true,
        }
    }

    #[test]
    fn group_limited_greedy_only_picks_from_the_best_groups() {
        // Groups of two: {0,1} best single score 0.9 (expert 0), {2,3} 0.8, {4,5} 0.85, {6,7} 0.1.
        // With two groups kept ({0,1} and {4,5}), expert 2 (0.8) is out although it beats 5.
        let logits = [0.9f32, 0.0, 0.8, 0.0, 0.85, 0.5, 0.1, 0.0].map(|p: f32| p.ln());
        let r = spec(TopkMethod::GroupLimitedGreedy, Scoring::Softmax).route(&logits, None);
        assert_eq!(r.experts, vec![0, 4]);
        let greedy = spec(TopkMethod::Greedy, Scoring::Softmax).route(&logits, None);
        assert_eq!(greedy.experts, vec![0, 4]);
        let logits = [0.9f32, 0.0, 0.8, 0.0, 0.85, 0.5, 0.1, 0.0].map(|p: f32| p.ln());
        let mut s = spec(TopkMethod::GroupLimitedGreedy, Scoring::Softmax);
        s.top_k = 3;
        assert_eq!(s.route(&logits, None).experts, vec![0, 4, 5]);
        s.method = TopkMethod::Greedy;
        assert_eq!(s.route(&logits, None).experts, vec![0, 4, 2]);
    }

    #[test]
    fn noaux_tc_chooses_with_the_bias_but_weighs_without_it() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, 0.5, 0.4, -2.0, -3.0];
        let mut bias = [0.0f32; 8];
        bias[3] = 5.0; // drags expert 3 (and its group {2,3}) into the choice
        let mut s = spec(TopkMethod::NoauxTc, Scoring::Sigmoid);
        s.norm_topk_prob = true;
        s.routed_scaling_factor = 2.5;
        let r = s.route(&logits, Some(&bias));
        assert_eq!(r.experts, vec![3, 0]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (w3, w0) = (sig(-1.0), sig(2.0));
        assert!(
            (r.weights[0] - 2.5 * w3 / (w3 + w0)).abs() < 1e-6,
            "{:?}",
            r.weights
        );
        assert!(
            (r.weights[1] - 2.5 * w0 / (w3 + w0)).abs() < 1e-6,
            "{:?}",
            r.weights
        );
    }

    #[test]
    fn v2_reference_scales_only_unnormalised_weights() {
        let logits = [1.0f32, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mut s = spec(TopkMethod::Greedy, Scoring::Softmax);
        s.routed_scaling_factor = 16.0;
        s.norm_topk_prob = true;
        s.scale_after_norm = false;
        let r = s.route(&logits, None);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        s.norm_topk_prob = false;
        let r = s.route(&logits, None);
        assert!(r.weights.iter().sum::<f32>() > 1.0);
    }
}
