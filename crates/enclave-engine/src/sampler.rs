//! Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded.

use enclave_models::layers::activation::log_sum_exp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Per-request sampling parameters (already validated; see [`SamplingParams::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// 0 means no min-p cut.
    pub min_p: f32,
    /// > 1 discourages every token already in the prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already in the output.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per occurrence in the output.
    pub frequency_penalty: f32,
    /// Same seed and parameters give the same tokens.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every bound; the message names the parameter, the bound and the value.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("`{name}` must be a finite number, got {v}"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return Err(format!(
                "`temperature` must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("`top_p` must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("`min_p` must be in [0, 1], got {}", self.min_p));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(format!(
                "`repetition_penalty` must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("`{name}` must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }
}

/// Samples tokens for one sequence; owns its random generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each token in the output so far (presence/frequency penalties).
    output_counts: std::collections::HashMap<u32, u32>,
    /// Tokens of the prompt and output (repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            output_counts: Default::default(),
            seen: prompt.iter().copied().collect(),
        }
    }

    /// Records a generated token (for the penalties of later steps).
    pub fn record(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        self.seen.insert(token);
    }

    /// Picks the next token from raw `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits);
        if self.params.is_greedy() {
            return argmax(&logits);
        }
        let probs = self.distribution(&logits);
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        let mut target = self.rng.random::<f64>() * total;
        for &(id, p) in &probs {
            if target < p {
                return id;
            }
            target -= p;
        }
        probs.last().map_or(0, |&(id, _)| id)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &id in &self.seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    /// The tokens that survive temperature, top-k, top-p and min-p, with unnormalised
    /// probabilities (the top token's is 1): most likely first, except that tokens less likely
    /// than the top one by a factor over e^30 follow it in id order unless the top-p cut reaches
    /// them (together they hold under 1e-7 of the mass for any vocabulary under a million
    /// tokens, and sorting all of a 262,144-token vocabulary took 12 ms per sampled token,
    /// nearly a whole Gemma 3 270M decoding step).
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let temperature = p.temperature.max(1e-5) as f64;
        let mut order: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l as f64 / temperature))
            .collect();
        if p.top_k > 0 && p.top_k < order.len() {
            order.select_nth_unstable_by(p.top_k - 1, by_likelihood);
            order.truncate(p.top_k);
        }
        let max = order.iter().fold(f64::NEG_INFINITY, |m, &(_, l)| m.max(l));
        let (mut head, tail): (Vec<_>, Vec<_>) = order
            .into_iter()
            .partition(|&(_, l)| l >= max - NEGLIGIBLE_NATS);
        head.sort_unstable_by(by_likelihood);
        let sorted = head.len();
        let mut probs: Vec<(u32, f64)> = head
            .into_iter()
            .chain(tail)
            .map(|(id, l)| (id, (l - max).exp()))
            .collect();
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        if p.top_p < 1.0 {
            let head_mass: f64 = probs[..sorted].iter().map(|&(_, q)| q).sum();
            if head_mass / total < p.top_p as f64 {
                // The cut falls among the negligible tokens: they need their order too.
                probs[sorted..].sort_unstable_by(by_likelihood);
            }
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, &(_, q)) in probs.iter().enumerate() {
                cumulative += q / total;
                if cumulative >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            // The top token has unnormalised probability 1, so the threshold is min_p itself.
            probs.retain(|&(_, q)| q >= p.min_p as f64);
        }
        probs
    }
}

/// Below the top logit by more than this (after temperature), a token's order among the others
/// is not worth a sort.
const NEGLIGIBLE_NATS: f64 = 30.0;

/// More likely first; ties by lower id.
fn by_likelihood(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Natural-log probabilities of `logits` (log-softmax, normalised in f64).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_sum = log_sum_exp(logits);
    logits
        .iter()
        .map(|&l| (l as f64 - log_sum) as f32)
        .collect()
}

/// The `n` most likely tokens under `logits` with their natural-log probabilities, most likely
/// first (ties by lower id).
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 || logits.is_empty() {
        return Vec::new();
    }
    let log_sum = log_sum_exp(logits);
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(ids.len());
    if n < ids.len() {
        ids.select_nth_unstable_by(n - 1, order);
        ids.truncate(n);
    }
    ids.sort_unstable_by(order);
    ids.into_iter()
        .map(|id| (id, (logits[id as usize] as f64 - log_sum) as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_in_order() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0];
        let top = top_logprobs(&logits, 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 4]);
        let all = log_softmax(&logits);
        for (id, lp) in top {
            assert!((lp - all[id as usize]).abs() < 1e-6);
        }
        assert_eq!(top_logprobs(&logits, 10).len(), 5);
        assert!(top_logprobs(&logits, 0).is_empty());
    }

    /// Every token by likelihood, then the cuts: the definition the sampler keeps.
    fn fully_sorted(params: &SamplingParams, logits: &[f32]) -> Vec<(u32, f64)> {
        let temperature = params.temperature.max(1e-5) as f64;
        let mut order: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l as f64 / temperature))
            .collect();
        order.sort_by(by_likelihood);
        if params.top_k > 0 {
            order.truncate(params.top_k);
        }
        let max = order.first().map_or(0.0, |&(_, l)| l);
        let mut probs: Vec<(u32, f64)> = order
            .into_iter()
            .map(|(id, l)| (id, (l - max).exp()))
            .collect();
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        let mut cumulative = 0.0;
        if let Some(keep) = probs.iter().position(|&(_, q)| {
            cumulative += q / total;
            params.top_p < 1.0 && cumulative >= params.top_p as f64
        }) {
            probs.truncate(keep + 1);
        }
        probs.retain(|&(_, q)| q >= params.min_p as f64);
        probs
    }

    fn check_against_fully_sorted(params: &SamplingParams, logits: &[f32]) {
        let got = Sampler::new(params.clone(), &[]).distribution(logits);
        let want = fully_sorted(params, logits);
        let label = format!("{params:?}");
        assert_eq!(got.len(), want.len(), "{label}");
        // The tokens whose order matters come in the same order.
        let max = want[0].1;
        for (g, w) in got.iter().zip(&want) {
            if w.1 < max * (-NEGLIGIBLE_NATS).exp() {
                break;
            }
            assert_eq!(g.0, w.0, "{label}");
            assert!((g.1 - w.1).abs() <= 1e-12 * w.1, "{label}");
        }
        let mut sorted = got.clone();
        sorted.sort_by(by_likelihood);
        for (g, w) in sorted.iter().zip(&want) {
            assert_eq!(g.0, w.0, "{label}");
        }
    }

    #[test]
    fn the_distribution_is_the_fully_sorted_one_up_to_the_order_of_negligible_tokens() {
        // Logits spread over 80 nats with ties and masked entries, so every case has a tail.
        let logits: Vec<f32> = (0..5000)
            .map(|i| match i % 97 {
                0 => f32::NEG_INFINITY,
                _ => ((i * 7919 % 4001) as f32 - 3000.0) / 50.0,
            })
            .collect();
        for (temperature, top_k, top_p, min_p) in [
            (1.0, 0, 1.0, 0.0),
            (0.7, 0, 0.9, 0.0),
            (1.0, 40, 1.0, 0.0),
            (1.3, 100, 0.95, 0.05),
            (1.0, 0, 1.0, 1e-20),
            (1.0, 0, 0.999_999_9, 0.0),
            (30.0, 0, 0.5, 0.0),
        ] {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                ..SamplingParams::default()
            };
            check_against_fully_sorted(&params, &logits);
        }
        // A top-p cut among the negligible tokens: one likely token and 700,000 about 30 nats
        // below it, together 6.5e-8 of the mass, beyond the largest top_p under 1.
        let mut logits: Vec<f32> = (0..700_000)
            .map(|i| -30.01 - (i * 31 % 7) as f32 * 1e-3)
            .collect();
        logits[123] = 0.0;
        let params = SamplingParams {
            top_p: 1.0 - f32::EPSILON / 2.0,
            ..SamplingParams::default()
        };
        check_against_fully_sorted(&params, &logits);
    }
}
