//! A vectorized exponential (AVX2 + FMA; `f32::exp` elsewhere) and its two users: `act(gate) ·
//! up` for the gated feed-forward in one pass over both inputs (on candle's worker pool for
//! long inputs), and the log-sum-exp that turns a row of logits into log-probabilities.
//!
//! Ours because candle 0.11 computes SiLU's exponential and GELU's tanh with scalar libm calls
//! on one thread per op (15 % of Gemma 3's prompt processing), then multiplies by `up` in a
//! second pass over a fresh tensor; and a scalar f64 `exp` per vocabulary entry cost 10 % of a
//! 16-sequence decoding step over Gemma 3's 262,144 tokens.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};

/// The activations fused here: both are `v · σ(a(v))` for a logistic σ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// `v · σ(v)`.
    Silu,
    /// GELU's tanh approximation, `0.5 v (1 + tanh(u)) = v · σ(2u)` with
    /// `u = √(2/π) (v + 0.044715 v³)`.
    GeluTanh,
}

/// Elements per unit of work on the pool (a multiple of the vector width).
const UNIT: usize = 1 << 13;

/// Below this many elements one thread does it (waking the pool costs more).
const PARALLEL_FROM: usize = 1 << 15;

/// `gate.apply_op2(up, GatedProduct(kind))` computes `act(gate) · up` elementwise.
pub(crate) struct GatedProduct(pub(crate) Gate);

impl CustomOp2 for GatedProduct {
    fn name(&self) -> &'static str {
        "gated-product"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((g0, g1)), Some((u0, u1))) = (
            gate_layout.contiguous_offsets(),
            up_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("gated-product needs contiguous inputs")
        };
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!(
                "gated-product: gate {:?} vs up {:?}",
                gate_layout.shape(),
                up_layout.shape()
            );
        }
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (gate, up) else {
            candle_core::bail!("gated-product takes f32 inputs")
        };
        let out = gated_product(self.0, &gate[g0..g1], &up[u0..u1]);
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

/// `act(gate[i]) · up[i]` for every `i`; each element's value does not depend on where it sits.
pub(crate) fn gated_product(kind: Gate, gate: &[f32], up: &[f32]) -> Vec<f32> {
    let len = gate.len().min(up.len());
    let mut out = vec![0f32; len];
    let kernel = Kernel::detect();
    if len < PARALLEL_FROM {
        kernel.run(kind, &gate[..len], &up[..len], &mut out);
        return out;
    }
    let out_ptr = super::quantized::OutPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(UNIT), |range| {
        let start = range.start * UNIT;
        let end = (range.end * UNIT).min(len);
        // SAFETY: units cover disjoint element ranges of `out`, which outlives the pool call
        // (it returns only when every unit is done).
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(start), end - start) };
        kernel.run(kind, &gate[start..end], &up[start..end], out);
    });
    out
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if super::quantized::avx2() {
            return Self::Avx2;
        }
        Self::Scalar
    }

    fn run(self, kind: Gate, gate: &[f32], up: &[f32], out: &mut [f32]) {
        match self {
            // SAFETY: `detect` saw AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { gated_avx2(kind, gate, up, out) },
            Self::Scalar => {
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = u * g / (1.0 + (-logistic_argument(kind, g)).exp());
                }
            }
        }
    }
}

/// `ln Σᵢ exp(vᵢ)`: the normaliser of a log-softmax (`log p(i) = vᵢ - log_sum_exp(v)`). The
/// exponentials are taken in f32 relative to the maximum (each within about 1 ulp), summed in
/// 8 f32 lanes over 256 values (relative error under 32 ulp) and in f64 beyond. Empty or all
/// `-inf` input gives `-inf`; any `+inf`, `+inf`; any NaN, NaN.
pub fn log_sum_exp(values: &[f32]) -> f64 {
    if values.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f64::from(max);
    }
    let mut sum = 0f64;
    for chunk in values.chunks(256) {
        sum += Kernel::detect().sum_exp(chunk, max);
    }
    f64::from(max) + sum.ln()
}

impl Kernel {
    /// `Σ exp(v - max)` over `values`.
    fn sum_exp(self, values: &[f32], max: f32) -> f64 {
        match self {
            // SAFETY: `detect` saw AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { sum_exp_avx2(values, max) },
            Self::Scalar => values.iter().map(|&v| f64::from((v - max).exp())).sum(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(values: &[f32], max: f32) -> f64 {
    // SAFETY: the caller checked AVX2 and FMA; loads stay within `values` or the tail buffer.
    unsafe {
        let whole = values.len() / 8 * 8;
        let shift = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for i in (0..whole).step_by(8) {
            let v = _mm256_loadu_ps(values.as_ptr().add(i));
            sum = _mm256_add_ps(sum, exp256(_mm256_sub_ps(v, shift)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total: f64 = lanes.iter().map(|&l| f64::from(l)).sum();
        if whole < values.len() {
            let mut tail = [max; 8];
            tail[..values.len() - whole].copy_from_slice(&values[whole..]);
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), shift));
            _mm256_storeu_ps(lanes.as_mut_ptr(), e);
            total += lanes[..values.len() - whole]
                .iter()
                .map(|&l| f64::from(l))
                .sum::<f64>();
        }
        total
    }
}

/// `a(v)` in `v · σ(a(v))`.
fn logistic_argument(kind: Gate, v: f32) -> f32 {
    match kind {
        Gate::Silu => v,
        Gate::GeluTanh => 2.0 * SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v),
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_avx2(kind: Gate, gate: &[f32], up: &[f32], out: &mut [f32]) {
    // SAFETY: the caller checked AVX2 and FMA; every load and store below stays within the
    // slices (full vectors) or the local tail buffers.
    unsafe {
        let len = out.len();
        let whole = len / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let vector = |g: __m256, u: __m256| -> __m256 {
            let a = match kind {
                Gate::Silu => g,
                Gate::GeluTanh => {
                    let cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
                    let inner = _mm256_fmadd_ps(_mm256_set1_ps(GELU_CUBIC), cube, g);
                    _mm256_mul_ps(_mm256_set1_ps(2.0 * SQRT_2_OVER_PI), inner)
                }
            };
            let denominator = _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), a)));
            _mm256_div_ps(_mm256_mul_ps(u, g), denominator)
        };
        for i in (0..whole).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), vector(g, u));
        }
        if whole < len {
            // The tail through the same instructions, so an element's bits never depend on its
            // position.
            let (mut g, mut u, mut o) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            g[..len - whole].copy_from_slice(&gate[whole..len]);
            u[..len - whole].copy_from_slice(&up[whole..len]);
            let value = vector(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
            _mm256_storeu_ps(o.as_mut_ptr(), value);
            out[whole..].copy_from_slice(&o[..len - whole]);
        }
    }
}

/// `eˣ` in 8 lanes to about 1 ulp (Cephes' `expf`: `x = n ln 2 + r`, a degree-7 polynomial for
/// `eʳ` on |r| ≤ ln 2 / 2, `2ⁿ` built in the exponent bits). Arguments are clamped to
/// [-87, 89]: results stay normal at the low end and reach infinity from about 88.4 up (a
/// little early: the logistic function's `v / (1 + eˣ)` is then 0 either way).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp256(x: __m256) -> __m256 {
    // SAFETY: called from AVX2 + FMA code only.
    unsafe {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(89.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts, the first exact in few bits, so `x - n ln 2` loses nothing.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_2e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: Gate, g: f64, u: f64) -> f64 {
        match kind {
            Gate::Silu => u * g / (1.0 + (-g).exp()),
            Gate::GeluTanh => {
                let inner = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
                u * 0.5 * g * (1.0 + inner.tanh())
            }
        }
    }

    fn inputs(len: usize) -> (Vec<f32>, Vec<f32>) {
        let gate = (0..len)
            .map(|i| ((i * 7919 % 20011) as f32 - 10005.0) / 400.0)
            .collect();
        let up = (0..len)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 13.0)
            .collect();
        (gate, up)
    }

    #[test]
    fn every_kernel_matches_the_exact_activation() {
        let (gate, up) = inputs(1000);
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        if super::super::quantized::avx2() {
            kernels.push(Kernel::Avx2);
        }
        for kind in [Gate::Silu, Gate::GeluTanh] {
            for &kernel in &kernels {
                let mut out = vec![0f32; gate.len()];
                kernel.run(kind, &gate, &up, &mut out);
                for ((&o, &g), &u) in out.iter().zip(&gate).zip(&up) {
                    let want = reference(kind, f64::from(g), f64::from(u));
                    // A few ulp of the product's magnitude (|up · gate| bounds the value).
                    let tolerance = 4.0 * f64::from(f32::EPSILON) * f64::from((u * g).abs());
                    assert!(
                        (f64::from(o) - want).abs() <= tolerance.max(1e-30),
                        "{kind:?} gate {g} up {u}: {o} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn log_sum_exp_matches_f64() {
        for len in [1usize, 7, 8, 1000, 262_147] {
            let values: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 10007) as f32 - 5000.0) / 300.0)
                .collect();
            let max = values
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, |m, v| m.max(f64::from(v)));
            let want = max
                + values
                    .iter()
                    .map(|&v| (f64::from(v) - max).exp())
                    .sum::<f64>()
                    .ln();
            let got = log_sum_exp(&values);
            assert!((got - want).abs() < 1e-6, "len {len}: {got} vs {want}");
        }
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f64::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[1.0, f32::INFINITY]), f64::INFINITY);
        assert!(log_sum_exp(&[1.0, f32::NAN, 2.0]).is_nan());
        // Masked entries count for nothing.
        let masked = log_sum_exp(&[0.0, f32::NEG_INFINITY, 0.0]);
        assert!((masked - 2f64.ln()).abs() < 1e-7);
    }

    #[test]
    fn extremes_stay_finite() {
        let gate = [-1e30f32, -200.0, -88.5, 0.0, 88.5, 200.0, 1e30];
        let up = [1f32; 7];
        for kind in [Gate::Silu, Gate::GeluTanh] {
            let out = gated_product(kind, &gate, &up);
            assert_eq!(out[3], 0.0);
            for (&o, &g) in out.iter().zip(&gate) {
                assert!(o.is_finite(), "{kind:?} {g}: {o}");
                if g > 50.0 {
                    assert_eq!(o, g, "{kind:?} {g}");
                }
                if g < -50.0 {
                    assert!(o.abs() < 1e-20, "{kind:?} {g}: {o}");
                }
            }
        }
    }

    #[test]
    fn an_elements_value_does_not_depend_on_its_position_or_the_split() {
        // Long enough for the pool, and a length that leaves a tail.
        let (gate, up) = inputs(PARALLEL_FROM + 13);
        for kind in [Gate::Silu, Gate::GeluTanh] {
            let all = gated_product(kind, &gate, &up);
            for start in [0, 1, 5, 4099] {
                let part = gated_product(kind, &gate[start..start + 11], &up[start..start + 11]);
                assert_eq!(&all[start..start + 11], &part[..], "{kind:?} from {start}");
            }
        }
    }
}
