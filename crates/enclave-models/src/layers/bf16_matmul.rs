//! Products with bf16 weights on CPUs with AVX512-BF16: the inputs are rounded to bf16 (to
//! nearest, ties to even, as a bf16 model's activations are in `transformers`) and multiplied
//! with `vdpbf16ps`, which sums two bf16 products into each f32 lane per instruction — twice the
//! rate of widening the weights and using f32 FMAs. Batched decoding and prefill of a bf16 model
//! are bound by that arithmetic (BENCHMARKS.md, "Serving engine under concurrent load").
//!
//! Tiles of 4 features × 4 rows keep 16 accumulators in registers, so each 32-wide load of
//! weights feeds 4 rows and each load of inputs 4 features; every (row, feature) pair is computed
//! the same way whatever its tile, so a row's result does not depend on the other rows.

use half::bf16;

/// Output features per work unit handed to a thread.
const FEATURES_PER_UNIT: usize = 64;
/// Input rows swept per pass over a unit's weights (16 rows of 8960 bf16 are 287 KB).
const ROW_CHUNK: usize = 16;

/// Whether this CPU has the instructions (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x [rows, k] · Wᵀ` for bf16 `W [n, k]`; returns `[rows, n]`, or `None` when the CPU lacks
/// AVX512-BF16.
pub fn matmul_bf16(x: &[f32], rows: usize, w: &[bf16], n: usize, k: usize) -> Option<Vec<f32>> {
    if !available() {
        return None;
    }
    assert!(
        x.len() >= rows * k && w.len() == n * k,
        "bf16 product: [{rows}, {k}] x [{n}, {k}]"
    );
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `available` saw AVX-512F/BW and AVX512-BF16.
        let xb = unsafe { avx512::to_bf16(&x[..rows * k]) };
        let out =
            super::quantized::by_feature_units_of(FEATURES_PER_UNIT, n, rows, |first, out| {
                let features = out.len() / rows;
                // SAFETY: as above; the slices hold `rows` rows and `features` weight rows of `k`.
                unsafe {
                    avx512::dot_block(&xb, rows, &w[first * k..(first + features) * k], k, out)
                }
            });
        Some(out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, rows, w, n, k);
        None
    }
}

/// `x` rounded to bf16 (to nearest, ties to even) as the kernels round their inputs.
pub(crate) fn round_to_bf16(x: &[f32]) -> Vec<bf16> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available` saw AVX-512F/BW and AVX512-BF16.
        return unsafe { avx512::to_bf16(x) };
    }
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::ROW_CHUNK;

    /// `x` rounded to bf16 (to nearest, ties to even), 32 values per instruction.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn to_bf16(x: &[f32]) -> Vec<bf16> {
        let mut out = vec![bf16::ZERO; x.len()];
        let main = x.len() / 32 * 32;
        // SAFETY: every pointer covers 32 values inside `x` and `out`.
        unsafe {
            for i in (0..main).step_by(32) {
                let low = _mm512_loadu_ps(x.as_ptr().add(i));
                let high = _mm512_loadu_ps(x.as_ptr().add(i + 16));
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), packed);
            }
        }
        // The tail through the same instruction (zero-padded), so every value rounds alike
        // (the instruction flushes denormals) wherever it falls in the batch.
        if main < x.len() {
            let mut padded = [0f32; 32];
            padded[..x.len() - main].copy_from_slice(&x[main..]);
            // SAFETY: `padded` holds 32 values; AVX-512 and AVX512-BF16 are on.
            let rounded: [bf16; 32] = unsafe {
                std::mem::transmute::<__m512bh, [bf16; 32]>(_mm512_cvtne2ps_pbh(
                    _mm512_loadu_ps(padded.as_ptr().add(16)),
                    _mm512_loadu_ps(padded.as_ptr()),
                ))
            };
            out[main..].copy_from_slice(&rounded[..x.len() - main]);
        }
        out
    }

    /// Features of `w` against every row of `x`, into `out[feature * rows + row]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn dot_block(x: &[bf16], rows: usize, w: &[bf16], k: usize, out: &mut [f32]) {
        let n = w.len() / k;
        assert!(x.len() >= rows * k && out.len() >= n * rows);
        for r0 in (0..rows).step_by(ROW_CHUNK) {
            let chunk_end = (r0 + ROW_CHUNK).min(rows);
            let mut o = 0;
            while o < n {
                let nf = (n - o).min(4);
                let mut r = r0;
                while r < chunk_end {
                    let nr = (chunk_end - r).min(4);
                    // SAFETY: o + nf <= n and r + nr <= rows (asserted sizes above).
                    unsafe {
                        match (nf, nr) {
                            (4, 4) => tile::<4, 4>(x, w, k, rows, out, o, r),
                            (4, 3) => tile::<4, 3>(x, w, k, rows, out, o, r),
                            (4, 2) => tile::<4, 2>(x, w, k, rows, out, o, r),
                            (4, 1) => tile::<4, 1>(x, w, k, rows, out, o, r),
                            (_, nr) => {
                                for f in 0..nf {
                                    match nr {
                                        4 => tile::<1, 4>(x, w, k, rows, out, o + f, r),
                                        3 => tile::<1, 3>(x, w, k, rows, out, o + f, r),
                                        2 => tile::<1, 2>(x, w, k, rows, out, o + f, r),
                                        _ => tile::<1, 1>(x, w, k, rows, out, o + f, r),
                                    }
                                }
                            }
                        }
                    }
                    r += nr;
                }
                o += nf;
            }
        }
    }

    /// Features `o..o + NF` for rows `r..r + NR`: one 16-lane accumulator per pair over `k` in
    /// steps of 32, a fixed reduction, then the tail in f32.
    #[inline(always)]
    #[allow(
        clippy::needless_range_loop,
        reason = "indexed loops over const-sized register arrays unroll into registers"
    )]
    unsafe fn tile<const NF: usize, const NR: usize>(
        x: &[bf16],
        w: &[bf16],
        k: usize,
        rows: usize,
        out: &mut [f32],
        o: usize,
        r: usize,
    ) {
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let k32 = k / 32 * 32;
        // SAFETY (whole body): features o..o+NF and rows r..r+NR are inside `w` and `x`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR]; NF];
            let mut i = 0;
            while i < k32 {
                let mut wv = [_mm512_setzero_si512(); NF];
                for (f, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(wp.add((o + f) * k + i).cast());
                }
                for rr in 0..NR {
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(xp.add((r + rr) * k + i).cast()));
                    for f in 0..NF {
                        acc[f][rr] = _mm512_dpbf16_ps(
                            acc[f][rr],
                            xv,
                            std::mem::transmute::<__m512i, __m512bh>(wv[f]),
                        );
                    }
                }
                i += 32;
            }
            for f in 0..NF {
                for rr in 0..NR {
                    let mut sum = _mm512_reduce_add_ps(acc[f][rr]);
                    for j in k32..k {
                        sum += (*xp.add((r + rr) * k + j)).to_f32()
                            * (*wp.add((o + f) * k + j)).to_f32();
                    }
                    out[(o + f) * rows + r + rr] = sum;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_of_bf16_rounded_inputs_whatever_the_batch() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // k with a tail past the last 32; n past the last 4-feature tile; rows past a chunk.
        let (n, k) = (70, 200);
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(((i * 31 % 97) as f32 - 48.0) / 50.0))
            .collect();
        let x: Vec<f32> = (0..19 * k)
            .map(|i| ((i * 17 % 89) as f32 - 44.0) / 23.0)
            .collect();
        let all = matmul_bf16(&x, 19, &w, n, k).unwrap();
        for r in 0..19 {
            for f in 0..n {
                // Exact products of the rounded inputs, summed in f64.
                let want: f64 = (0..k)
                    .map(|i| {
                        f64::from(bf16::from_f32(x[r * k + i]).to_f32())
                            * f64::from(w[f * k + i].to_f32())
                    })
                    .sum();
                let got = all[r * n + f];
                assert!(
                    (f64::from(got) - want).abs() < 1e-3 * want.abs().max(1.0),
                    "[{r}, {f}] {got} vs {want}"
                );
            }
            let alone = matmul_bf16(&x[r * k..(r + 1) * k], 1, &w, n, k).unwrap();
            assert_eq!(alone, all[r * n..(r + 1) * n], "row {r}");
        }
    }
}
