//! `--quantize`: every fixture architecture quantized at load keeps f32's greedy tokens, with
//! the chosen tokens' log-probabilities close (numbers printed, bounds asserted).

use candle_core::quantized::GgmlDType;
use enclave_models::{DType, Logits, Model, Quantization};

use crate::numerics::{argmax, goldens, load_model};
use crate::MODELS;

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < n {
        let row: Vec<f32> = model
            .forward(&input, &mut cache, Logits::Last)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = argmax(&row) as u32;
        out.push(next);
        input = vec![next];
    }
    out
}

/// A quantized model agrees with f32 where f32 is decided: at every step of the reference's
/// greedy continuation (teacher-forced) whose top-two margin is at least `MARGIN`, the argmax is
/// the same, and the free-running greedy continuation is identical up to the first undecided
/// step. Also measures the mean |Δ log p| of the chosen tokens.
fn check(quantization: Quantization, max_mean_delta: f64) {
    // Twice the largest |Δlogit| Q8_0 showed on these fixtures (0.33): no smaller margin can
    // be trusted to survive quantization.
    const MARGIN: f32 = 0.75;
    let (mut deltas, mut decided, mut free_steps) = (Vec::new(), 0, 0);
    for name in MODELS {
        let reference = load_model(name, DType::F32);
        let mut quantized = load_model(name, DType::F32);
        quantized.quantize(quantization).unwrap();
        // Matrices whose rows are not a multiple of 32 (some tiny DeepSeek shapes) stay dense.
        let formats = &quantized.info().quantized_projections;
        assert!(
            formats.iter().any(|(f, n)| *f == GgmlDType::Q8_0 && *n > 0),
            "{name}: nothing quantized: {formats:?}"
        );
        eprintln!("{name}: {formats:?}");
        assert!(quantized.info().weight_bytes < reference.info().weight_bytes);
        for golden in goldens(name) {
            // One token at a time after the prompt: the path generated tokens take (one-row
            // products, quantized activations).
            let rows = |m: &Model| -> Vec<Vec<f32>> {
                let mut cache = m.new_cache();
                let mut input = golden.ids.clone();
                let mut rows = Vec::new();
                for &token in &golden.greedy {
                    rows.push(
                        m.forward(&input, &mut cache, Logits::Last)
                            .unwrap()
                            .squeeze(0)
                            .unwrap()
                            .to_vec1()
                            .unwrap(),
                    );
                    input = vec![token];
                }
                rows
            };
            let (a, b) = (rows(&reference), rows(&quantized));
            let mut first_undecided = golden.greedy.len();
            for (step, &token) in golden.greedy.iter().enumerate() {
                let at = step;
                let (pa, pb) = (log_softmax(&a[at]), log_softmax(&b[at]));
                deltas.push((pa[token as usize] - pb[token as usize]).abs());
                let mut sorted = a[at].clone();
                sorted.sort_by(|x, y| y.total_cmp(x));
                if sorted[0] - sorted[1] >= MARGIN {
                    decided += 1;
                    assert_eq!(
                        argmax(&b[at]) as u32,
                        token,
                        "{name} {quantization:?} step {step} (margin {})",
                        sorted[0] - sorted[1]
                    );
                } else {
                    first_undecided = first_undecided.min(step);
                }
            }
            let ours = greedy(&quantized, &golden.ids, first_undecided);
            assert_eq!(
                ours,
                golden.greedy[..first_undecided],
                "{name} {quantization:?}"
            );
            free_steps += first_undecided;
        }
    }
    let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
    eprintln!(
        "{quantization:?}: argmax equal at {decided} decided steps of {}, free-running greedy equal for {free_steps} steps; mean |Δlogprob| of chosen tokens {mean:.4}",
        deltas.len()
    );
    // The tiny random models have small margins; about a fifth of their steps are decided.
    assert!(decided >= 150, "only {decided} decided steps were checked");
    assert!(
        mean < max_mean_delta,
        "{quantization:?}: mean |Δlogprob| {mean}"
    );
}

#[test]
fn q8_0_keeps_greedy_tokens_of_every_architecture() {
    check(Quantization::Q8_0, 0.05);
}
