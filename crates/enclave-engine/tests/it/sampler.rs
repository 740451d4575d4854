//! Sampling on known distributions.

use std::collections::BTreeSet;

use enclave_engine::{Sampler, SamplingParams};

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams {
        seed: Some(7),
        ..SamplingParams::default()
    };
    f(&mut p);
    p
}

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

fn support(p: SamplingParams, logits: &[f32], draws: usize) -> BTreeSet<u32> {
    let mut sampler = Sampler::new(p, &[]);
    (0..draws).map(|_| sampler.sample(logits)).collect()
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 17) as f32 / 4.0).collect();
    let run = |seed| {
        let mut s = Sampler::new(params(|p| p.seed = Some(seed)), &[1, 2, 3]);
        (0..64)
            .map(|_| {
                let t = s.sample(&logits);
                s.record(t);
                t
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn top_k_keeps_only_the_k_most_likely() {
    let logits = vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
    assert_eq!(
        support(params(|p| p.top_k = 2), &logits, 2000),
        BTreeSet::from([4, 5])
    );
    assert_eq!(support(params(|p| p.top_k = 0), &logits, 5000).len(), 6);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    assert_eq!(
        support(params(|p| p.top_p = 0.75), &logits, 2000),
        BTreeSet::from([0, 1])
    );
    assert_eq!(
        support(params(|p| p.top_p = 0.9), &logits, 2000),
        BTreeSet::from([0, 1, 2])
    );
    assert_eq!(
        support(params(|p| p.top_p = 0.4), &logits, 500),
        BTreeSet::from([0])
    );
}

#[test]
fn min_p_drops_tokens_below_a_fraction_of_the_top() {
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    // Threshold 0.5 * 0.5 = 0.25: keeps 0.5 and 0.3.
    assert_eq!(
        support(params(|p| p.min_p = 0.5), &logits, 2000),
        BTreeSet::from([0, 1])
    );
    // Threshold 0.045: keeps everything.
    assert_eq!(support(params(|p| p.min_p = 0.09), &logits, 5000).len(), 4);
    // Threshold 0.06: drops the 0.05 token.
    assert_eq!(support(params(|p| p.min_p = 0.12), &logits, 5000).len(), 3);
}

#[test]
fn sampled_frequencies_follow_the_distribution() {
    let logits = logits_of(&[0.7, 0.2, 0.1]);
    let mut sampler = Sampler::new(params(|_| {}), &[]);
    let mut counts = [0usize; 3];
    let n = 20_000;
    for _ in 0..n {
        counts[sampler.sample(&logits) as usize] += 1;
    }
    for (i, expected) in [0.7, 0.2, 0.1].iter().enumerate() {
        let freq = counts[i] as f64 / n as f64;
        assert!(
            (freq - expected).abs() < 0.02,
            "token {i}: {freq} vs {expected}"
        );
    }
}

#[test]
fn temperature_sharpens_and_flattens() {
    let logits = logits_of(&[0.6, 0.4]);
    let share_of_first = |t: f32| {
        let mut s = Sampler::new(params(|p| p.temperature = t), &[]);
        (0..10_000).filter(|_| s.sample(&logits) == 0).count() as f64 / 10_000.0
    };
    assert!(share_of_first(0.3) > 0.75);
    assert!(share_of_first(5.0) < 0.55);
    // Temperature 0 is greedy.
    assert_eq!(
        support(params(|p| p.temperature = 0.0), &logits, 100),
        BTreeSet::from([0])
    );
}

#[test]
fn repetition_penalty_discourages_tokens_of_the_prompt() {
    let logits = vec![2.0, 1.9, -1.0];
    let greedy = |rep: f32, prompt: &[u32]| {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: rep,
                ..SamplingParams::greedy()
            },
            prompt,
        );
        s.sample(&logits)
    };
    assert_eq!(greedy(1.0, &[0]), 0);
    assert_eq!(greedy(1.1, &[0]), 1); // 2.0 / 1.1 < 1.9
    assert_eq!(greedy(1.1, &[2]), 0); // only the seen token is touched
}

#[test]
fn presence_and_frequency_penalties_count_generated_tokens() {
    let logits = vec![1.0, 0.7];
    let pick = |presence: f32, frequency: f32, times: usize| {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..SamplingParams::greedy()
            },
            &[],
        );
        for _ in 0..times {
            s.record(0);
        }
        s.sample(&logits)
    };
    assert_eq!(pick(0.2, 0.0, 1), 0); // 1.0 - 0.2 = 0.8 > 0.7
    assert_eq!(pick(0.4, 0.0, 1), 1); // 0.6 < 0.7
    assert_eq!(pick(0.4, 0.0, 0), 0); // nothing generated yet: no penalty
    assert_eq!(pick(0.0, 0.2, 1), 0); // 0.8
    assert_eq!(pick(0.0, 0.2, 2), 1); // 0.6
}

#[test]
fn invalid_parameters_name_the_field_and_bound() {
    let err = params(|p| p.top_p = 1.5).validate().unwrap_err();
    assert_eq!(err, "`top_p` must be in (0, 1], got 1.5");
    let err = params(|p| p.temperature = -1.0).validate().unwrap_err();
    assert_eq!(err, "`temperature` must be >= 0, got -1");
    let err = params(|p| p.min_p = 2.0).validate().unwrap_err();
    assert!(err.starts_with("`min_p`"));
    let err = params(|p| p.presence_penalty = 3.0).validate().unwrap_err();
    assert!(err.starts_with("`presence_penalty`"));
    assert!(params(|_| {}).validate().is_ok());
}
