//! Products with Q8_0 weights (llama.cpp's layout: blocks of 32 signed bytes after an f16
//! scale): activations are quantized to Q8_0 as llama.cpp does (per block, scale `max|x|/127`,
//! ties to even) and the blocks multiplied as integers — AVX-512 VNNI `vpdpbusd` where the CPU
//! has it, AVX2 `vpmaddubsw` otherwise, scalar as the last resort — with output features split
//! across threads. Ours because candle's Q8_0 product is several times slower for a handful of
//! rows (`examples/q8_0_matmul.rs`, BENCHMARKS.md).

use half::f16;
use rayon::prelude::*;

/// Weights per block.
pub const QK8_0: usize = 32;
/// Bytes per block: the f16 scale, then the 32 quants.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Parallel tasks per thread: enough to balance uneven cores, few enough that dispatch stays
/// cheap for the small matrices of a decode step (a 640 × 2048 product takes ~20 µs).
const TASKS_PER_THREAD: usize = 4;
/// Input rows sharing one pass over a weight row (their accumulators stay in registers).
const ROW_TILE: usize = 4;

/// Activations quantized per block: `scales[r * blocks + b]`, `quants[r * k + i]`.
pub struct Q8Activations {
    scales: Vec<f32>,
    quants: Vec<i8>,
    blocks: usize,
}

/// Quantizes `rows` rows of `k` values (`k` a multiple of 32) as llama.cpp's
/// `quantize_row_q8_0` does; the scale is rounded to f16 as it is stored there.
pub fn quantize_rows_q8_0(x: &[f32], rows: usize, k: usize) -> Q8Activations {
    let blocks = k / QK8_0;
    let mut scales = vec![0f32; rows * blocks];
    let mut quants = vec![0i8; rows * k];
    for ((block, scale), q) in x[..rows * k]
        .chunks_exact(QK8_0)
        .zip(scales.iter_mut())
        .zip(quants.chunks_exact_mut(QK8_0))
    {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        *scale = f16::from_f32(amax / 127.0).to_f32();
        let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(block) {
            *q = (v * inverse).round_ties_even() as i8;
        }
    }
    Q8Activations {
        scales,
        quants,
        blocks,
    }
}

/// `x [rows, k] · Wᵀ` for `W [n, k]` in Q8_0 blocks (`w`: `n · k/32 · 34` bytes); returns
/// `[rows, n]`. `k` must be a multiple of 32 and `w` hold exactly `n` rows.
pub fn matmul_q8_0(x: &[f32], rows: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
    matmul_q8_0_with(Kernel::detect(), x, rows, k, w, n)
}

fn matmul_q8_0_with(
    kernel: Kernel,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    n: usize,
) -> Vec<f32> {
    let blocks = k / QK8_0;
    let row_bytes = blocks * Q8_0_BLOCK_BYTES;
    debug_assert_eq!(w.len(), n * row_bytes);
    let activations = quantize_rows_q8_0(x, rows, k);
    // Each task fills its features for every row, feature-major; transposed at the end.
    let features_per_task = n
        .div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD)
        .next_multiple_of(4)
        .max(16);
    let mut by_feature = vec![0f32; n * rows];
    by_feature
        .par_chunks_mut(features_per_task * rows)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * features_per_task;
            let count = out.len() / rows;
            let weight_row = |f: usize| &w[(first + f) * row_bytes..(first + f + 1) * row_bytes];
            let mut f = 0;
            while f < count {
                let four;
                let one;
                let group: &[&[u8]] = if count - f >= 4 {
                    four = [
                        weight_row(f),
                        weight_row(f + 1),
                        weight_row(f + 2),
                        weight_row(f + 3),
                    ];
                    &four
                } else {
                    one = [weight_row(f)];
                    &one
                };
                let out = &mut out[f * rows..(f + group.len()) * rows];
                let mut row = 0;
                while row < rows {
                    let tile = (rows - row).min(ROW_TILE);
                    kernel.dot(group, &activations, row, tile, out, rows);
                    row += tile;
                }
                f += group.len();
            }
        });
    if rows == 1 {
        return by_feature;
    }
    let mut out = vec![0f32; rows * n];
    for (feature, values) in by_feature.chunks_exact(rows).enumerate() {
        for (row, &v) in values.iter().enumerate() {
            out[row * n + feature] = v;
        }
    }
    out
}

/// Runs `$kernel` for `F` features over `tile` (1 to 4) rows, scattering into `out`
/// (feature-major: `out[f * rows + t]`).
macro_rules! by_tile {
    ($kernel:ident, $F:literal, $w:expr, $x:expr, $row:expr, $tile:expr, $out:expr, $rows:expr) => {{
        macro_rules! run {
            ($T:literal) => {{
                let mut r = [[0f32; $T]; $F];
                $kernel::<$F, $T>($w, $x, $row, &mut r);
                for (f, values) in r.iter().enumerate() {
                    $out[f * $rows + $row..f * $rows + $row + $T].copy_from_slice(values);
                }
            }};
        }
        match $tile {
            1 => run!(1),
            2 => run!(2),
            3 => run!(3),
            _ => run!(4),
        }
    }};
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Kernel {
    /// Every kernel this CPU can run, best first.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = vec![Self::detect()];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            all.push(Self::Avx2);
        }
        all.push(Self::Scalar);
        all
    }

    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                return Self::Vnni;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Products of weight rows `w` (4 or 1 of them) with activation rows `row .. row + tile`,
    /// into `out[f * rows + t]`.
    fn dot(
        self,
        w: &[&[u8]],
        x: &Q8Activations,
        row: usize,
        tile: usize,
        out: &mut [f32],
        rows: usize,
    ) {
        match self {
            // SAFETY: `detect` saw the features; each slice holds `x.blocks` whole blocks.
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe {
                if let [a, b, c, d] = *w {
                    by_tile!(dot_vnni, 4, [a, b, c, d], x, row, tile, out, rows)
                } else {
                    for (f, &one) in w.iter().enumerate() {
                        by_tile!(dot_vnni, 1, [one], x, row, tile, out[f * rows..], rows)
                    }
                }
            },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe {
                if let [a, b, c, d] = *w {
                    by_tile!(dot_avx2, 4, [a, b, c, d], x, row, tile, out, rows)
                } else {
                    for (f, &one) in w.iter().enumerate() {
                        by_tile!(dot_avx2, 1, [one], x, row, tile, out[f * rows..], rows)
                    }
                }
            },
            Self::Scalar => {
                for (f, &one) in w.iter().enumerate() {
                    dot_scalar(
                        one,
                        x,
                        row,
                        tile,
                        &mut out[f * rows + row..f * rows + row + tile],
                    );
                }
            }
        }
    }
}

fn block_scale(block: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
}

fn dot_scalar(weights: &[u8], x: &Q8Activations, row: usize, tile: usize, out: &mut [f32]) {
    let k = x.blocks * QK8_0;
    for (t, out) in out.iter_mut().enumerate().take(tile) {
        let r = row + t;
        let mut sum = 0f32;
        for (b, block) in weights.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
            let xq = &x.quants[r * k + b * QK8_0..r * k + (b + 1) * QK8_0];
            let int: i32 = block[2..]
                .iter()
                .zip(xq)
                .map(|(&w, &v)| i32::from(w as i8) * i32::from(v))
                .sum();
            sum += block_scale(block) * x.scales[r * x.blocks + b] * int as f32;
        }
        *out = sum;
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    // SAFETY: SSE/AVX are present wherever this is called (inside AVX2 kernels).
    unsafe {
        let sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        let sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
        _mm_cvtss_f32(sum)
    }
}

/// Converts an f16 scale stored little-endian at `p` (F16C).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scale_at(p: *const u8) -> f32 {
    // SAFETY: the caller enabled f16c and `p..p + 2` is readable.
    unsafe {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
}

/// `F` weight rows (output features) against `T` activation rows: each block's integer
/// products summed in 8 lanes as `|w| · (x · sign(w))` so the unsigned × signed instruction
/// applies (activations never hold -128). `F` and `T` are constants so the `F × T` accumulators
/// live in registers; several features per pass share each activation load and keep
/// independent multiply-add chains in flight.
macro_rules! q8_dot_kernel {
    ($name:ident, $features:literal, |$aw:ident, $sx:ident| $products:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const F: usize, const T: usize>(
            weights: [&[u8]; F],
            x: &Q8Activations,
            row: usize,
            out: &mut [[f32; T]; F],
        ) {
            // SAFETY: the caller checked the target features; every pointer below stays within
            // `x.blocks` whole blocks of each weight row and of activation rows `row .. row + T`.
            unsafe {
                let k = x.blocks * QK8_0;
                let mut acc = [[_mm256_setzero_ps(); T]; F];
                let xq = x.quants.as_ptr().add(row * k);
                let xs = x.scales.as_ptr().add(row * x.blocks);
                for b in 0..x.blocks {
                    let mut qx = [_mm256_setzero_si256(); T];
                    let mut dx = [0f32; T];
                    for t in 0..T {
                        qx[t] = _mm256_loadu_si256(xq.add(t * k + b * QK8_0) as *const __m256i);
                        dx[t] = *xs.add(t * x.blocks + b);
                    }
                    for f in 0..F {
                        let block = weights[f].as_ptr().add(b * Q8_0_BLOCK_BYTES);
                        let dw = scale_at(block);
                        let qw = _mm256_loadu_si256(block.add(2) as *const __m256i);
                        let $aw = _mm256_sign_epi8(qw, qw);
                        for t in 0..T {
                            let $sx = _mm256_sign_epi8(qx[t], qw);
                            let ints: __m256i = $products;
                            let scale = _mm256_set1_ps(dw * dx[t]);
                            acc[f][t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(ints), acc[f][t]);
                        }
                    }
                }
                for f in 0..F {
                    for t in 0..T {
                        out[f][t] = hsum256(acc[f][t]);
                    }
                }
            }
        }
    };
}

q8_dot_kernel!(
    dot_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    |aw, sx| _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx)
);
q8_dot_kernel!(dot_avx2, "avx2,fma,f16c", |aw, sx| _mm256_madd_epi16(
    _mm256_maddubs_epi16(aw, sx),
    _mm256_set1_epi16(1)
));

#[cfg(test)]
mod tests {
    use super::*;

    /// Random Q8_0 weights as bytes, and the same weights dequantised.
    fn weights(n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for _ in 0..n * k / QK8_0 {
            let scale = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            bytes.extend_from_slice(&scale.to_bits().to_le_bytes());
            for _ in 0..QK8_0 {
                let q = (next() % 255) as i32 - 127;
                bytes.push(q as i8 as u8);
                dense.push(scale.to_f32() * q as f32);
            }
        }
        (bytes, dense)
    }

    fn reference(x: &[f32], rows: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
        let a = quantize_rows_q8_0(x, rows, k);
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for f in 0..n {
                let row_bytes = k / QK8_0 * Q8_0_BLOCK_BYTES;
                let mut one = [0f32];
                dot_scalar(&w[f * row_bytes..(f + 1) * row_bytes], &a, r, 1, &mut one);
                out[r * n + f] = one[0];
            }
        }
        out
    }

    #[test]
    fn every_kernel_gives_the_integer_products_and_approximates_the_dense_product() {
        let (n, k) = (70, 96);
        let (w, dense) = weights(n, k, 7);
        for rows in [1, 3, 4, 9] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let want = reference(&x, rows, k, &w, n);
            for kernel in Kernel::available() {
                let got = matmul_q8_0_with(kernel, &x, rows, k, &w, n);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "rows {rows} [{i}]: {a} vs {b}"
                    );
                }
            }
            let got = matmul_q8_0(&x, rows, k, &w, n);
            // Against the exact product on the dequantised weights: activation rounding only.
            for r in 0..rows {
                for f in 0..n {
                    let exact: f32 = (0..k).map(|i| x[r * k + i] * dense[f * k + i]).sum();
                    let scale: f32 = (0..k)
                        .map(|i| (x[r * k + i] * dense[f * k + i]).abs())
                        .sum();
                    let got = got[r * n + f];
                    assert!((got - exact).abs() <= 0.02 * scale, "{got} vs {exact}");
                }
            }
        }
    }

    #[test]
    fn activations_round_like_llama_cpp() {
        // max 127 → scale 1: halves round to even, as `_mm256_round_ps` does in llama.cpp.
        let mut x = vec![0f32; QK8_0];
        x[..4].copy_from_slice(&[127.0, 63.5, 62.5, -62.5]);
        let a = quantize_rows_q8_0(&x, 1, QK8_0);
        assert_eq!(&a.quants[..4], &[127, 64, 62, -62]);
        assert_eq!(a.scales[0], 1.0);
        let zeros = quantize_rows_q8_0(&[0f32; QK8_0], 1, QK8_0);
        assert!(zeros.quants.iter().all(|&q| q == 0));
    }
}
