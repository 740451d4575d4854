//! Products with weights in llama.cpp's 32-value blocks that pair with Q8_0 activations: Q8_0
//! (an f16 scale, then 32 signed bytes) and Q5_0 (an f16 scale, the 32 fifth bits, then 16 bytes
//! of nibbles; a weight is its 5-bit value minus 16). Activations are quantized to Q8_0 as
//! llama.cpp does (per block, scale `max|x|/127`, ties to even), weight blocks widened to signed
//! bytes in registers and multiplied as integers — AVX-512 VNNI `vpdpbusd` where the CPU has
//! it, AVX2 `vpmaddubsw` otherwise, scalar as the last resort. Each thread streams whole weight
//! rows front to back (the order hardware prefetchers follow), on candle's worker pool.
//!
//! Ours because candle 0.11 computes Q5_0 in scalar code, and its Q8_0 product is several times
//! slower for a handful of rows of a large matrix (`examples/q8_0_matmul.rs`, BENCHMARKS.md).

use half::f16;

/// Weights per block.
pub const QK8_0: usize = 32;
/// Bytes per Q8_0 block: the f16 scale, then the 32 quants.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes per Q5_0 block: the f16 scale, 4 bytes of fifth bits, 16 bytes of nibbles.
pub const Q5_0_BLOCK_BYTES: usize = 22;
/// Input rows sharing one pass over a weight row (their accumulators stay in registers).
const ROW_TILE: usize = 4;
/// Output features per work unit handed to a thread.
const FEATURES_PER_UNIT: usize = 4;

/// The weight layouts this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Weights {
    Q8_0,
    Q5_0,
}

impl Q8Weights {
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => Q8_0_BLOCK_BYTES,
            Self::Q5_0 => Q5_0_BLOCK_BYTES,
        }
    }
}

/// Activations quantized per block: `scales[r * blocks + b]`, `quants[r * k + i]`.
pub struct Q8Activations {
    pub(crate) scales: Vec<f32>,
    pub(crate) quants: Vec<i8>,
    pub(crate) blocks: usize,
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
        *scale = quantize_block_q8_0(block, q);
    }
    Q8Activations {
        scales,
        quants,
        blocks,
    }
}

/// One block of 32 values into `quants` as llama.cpp's `quantize_row_q8_0` does; returns the
/// scale, rounded to f16 as it is stored there.
#[inline(always)]
pub(crate) fn quantize_block_q8_0(block: &[f32], quants: &mut [i8]) -> f32 {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (q, &v) in quants.iter_mut().zip(block) {
        *q = nearest_int(v * inverse) as i8;
    }
    f16::from_f32(amax / 127.0).to_f32()
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22` (llama.cpp's
/// `nearest_int`): adding 1.5·2^23 leaves the rounded value in the low mantissa bits. Plain
/// arithmetic, so loops over it vectorise where `round_ties_even` calls `rintf` per value.
#[inline(always)]
pub(crate) fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// `x [rows, k] · Wᵀ` for `W [n, k]` in `format` blocks; returns `[rows, n]`. `k` must be a
/// multiple of 32 and `w` hold exactly `n` rows. A row's result does not depend on the others.
pub fn matmul_q8_blocks(
    format: Q8Weights,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    n: usize,
) -> Vec<f32> {
    matmul_with(Kernel::detect(), format, x, rows, k, w, n)
}

fn matmul_with(
    kernel: Kernel,
    format: Q8Weights,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    n: usize,
) -> Vec<f32> {
    check_shapes(format, x, rows, k, w, n);
    let row_bytes = k / QK8_0 * format.block_bytes();
    let activations = quantize_rows_q8_0(x, rows, k);
    by_feature_units(n, rows, |first, out| {
        let count = out.len() / rows;
        let weights = &w[first * row_bytes..(first + count) * row_bytes];
        let mut row = 0;
        while row < rows {
            let tile = (rows - row).min(ROW_TILE);
            kernel.dot(format, weights, &activations, row, tile, out, rows);
            row += tile;
        }
    })
}

/// A pointer the workers write disjoint ranges through.
pub(crate) struct OutPtr<T = f32>(pub(crate) *mut T);

// Copy for any `T` (a derive would ask `T: Copy`).
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// Through a method, so closures capture the whole (`Sync`) wrapper.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: users write disjoint ranges only (each unit of `by_feature_units` its own features'
// outputs, of `q8_tiles` its own eight output columns and activation rows, of `decode_attention`
// its own heads, of `activation` its own elements).
unsafe impl<T> Send for OutPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for OutPtr<T> {}

/// Panics unless `x [rows, k]` and `w` (`n` rows of `format` blocks) fit a block product: the
/// callers (`Linear`, the examples) build them from one weight, so a mismatch is our bug.
pub(crate) fn check_shapes(
    format: Q8Weights,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    n: usize,
) {
    let row_bytes = k / QK8_0 * format.block_bytes();
    assert!(
        k.is_multiple_of(QK8_0) && w.len() == n * row_bytes && x.len() >= rows * k,
        "{format:?} product: [{rows}, {k}] x [{n}, {k}] with {} weight bytes",
        w.len()
    );
}

/// Runs `unit(first_feature, out)` for units of `FEATURES_PER_UNIT` output features over
/// candle's persistent worker pool (its threads are already spinning from the step's other
/// products), `out` being the unit's outputs feature-major (`out[f * rows + r]`); returns the
/// `[rows, n]` product.
pub(crate) fn by_feature_units(
    n: usize,
    rows: usize,
    unit: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    by_feature_units_of(FEATURES_PER_UNIT, n, rows, unit)
}

/// [`by_feature_units`] with `features_per_unit` output features per unit.
pub(crate) fn by_feature_units_of(
    features_per_unit: usize,
    n: usize,
    rows: usize,
    unit: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    if rows == 0 || n == 0 {
        return vec![0f32; rows * n];
    }
    let mut by_feature = vec![0f32; n * rows];
    let out = OutPtr(by_feature.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(features_per_unit), |range| {
        for index in range {
            let first = index * features_per_unit;
            let count = (n - first).min(features_per_unit);
            // SAFETY: units are disjoint, so outputs `first * rows .. (first + count) * rows`
            // belong to this unit alone; the vector outlives the pool call, which returns only
            // when every unit is done.
            let out = unsafe {
                std::slice::from_raw_parts_mut(out.get().add(first * rows), count * rows)
            };
            unit(first, out);
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

/// The instruction set a block kernel runs on (shared with `layers/kquants.rs`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

/// Runs a kernel family (`$q8_0`, `$q5_0`) on every weight row of `$w` over `$tile` (1 to 4)
/// activation rows from `$row`.
macro_rules! dispatch {
    ($q8_0:ident, $q5_0:ident, $format:expr, $w:expr, $x:expr, $row:expr, $tile:expr, $out:expr, $rows:expr) => {{
        macro_rules! run {
            ($T:literal) => {
                match $format {
                    Q8Weights::Q8_0 => $q8_0::<$T>($w, $x, $row, $out, $rows),
                    Q8Weights::Q5_0 => $q5_0::<$T>($w, $x, $row, $out, $rows),
                }
            };
        }
        match $tile {
            1 => run!(1),
            2 => run!(2),
            3 => run!(3),
            _ => run!(4),
        }
    }};
}

impl Kernel {
    /// Every kernel this CPU can run, best first.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut all = vec![Self::detect()];
        #[cfg(target_arch = "x86_64")]
        if avx2() && !matches!(all[0], Self::Avx2) {
            all.push(Self::Avx2);
        }
        all.push(Self::Scalar);
        all
    }

    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                return Self::Vnni;
            }
            if avx2() {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Products of the weight rows in `w` with activation rows `row .. row + tile`, into
    /// `out[f * rows + t]`.
    #[allow(clippy::too_many_arguments, reason = "the tile's coordinates")]
    fn dot(
        self,
        format: Q8Weights,
        w: &[u8],
        x: &Q8Activations,
        row: usize,
        tile: usize,
        out: &mut [f32],
        rows: usize,
    ) {
        match self {
            // SAFETY: `detect` saw the features; each weight row holds `x.blocks` whole blocks.
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe {
                dispatch!(q8_0_vnni, q5_0_vnni, format, w, x, row, tile, out, rows)
            },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe {
                dispatch!(q8_0_avx2, q5_0_avx2, format, w, x, row, tile, out, rows)
            },
            Self::Scalar => {
                let row_bytes = x.blocks * format.block_bytes();
                for (f, weights) in w.chunks_exact(row_bytes).enumerate() {
                    for t in 0..tile {
                        out[f * rows + row + t] = dot_scalar(format, weights, x, row + t);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

fn block_scale(block: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
}

/// The 32 signed weights of one block.
fn block_values(format: Q8Weights, block: &[u8]) -> [i32; QK8_0] {
    let mut values = [0i32; QK8_0];
    match format {
        Q8Weights::Q8_0 => {
            for (v, &q) in values.iter_mut().zip(&block[2..]) {
                *v = i32::from(q as i8);
            }
        }
        Q8Weights::Q5_0 => {
            let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            for j in 0..16 {
                let nibbles = block[6 + j];
                values[j] = i32::from(nibbles & 0x0F) | (((high >> j) & 1) << 4) as i32;
                values[j + 16] = i32::from(nibbles >> 4) | (((high >> (j + 16)) & 1) << 4) as i32;
            }
            for v in &mut values {
                *v -= 16;
            }
        }
    }
    values
}

fn dot_scalar(format: Q8Weights, weights: &[u8], x: &Q8Activations, r: usize) -> f32 {
    let k = x.blocks * QK8_0;
    let mut sum = 0f32;
    for (b, block) in weights.chunks_exact(format.block_bytes()).enumerate() {
        let xq = &x.quants[r * k + b * QK8_0..r * k + (b + 1) * QK8_0];
        let int: i32 = block_values(format, block)
            .iter()
            .zip(xq)
            .map(|(&w, &v)| w * i32::from(v))
            .sum();
        sum += block_scale(block) * x.scales[r * x.blocks + b] * int as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
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

/// A Q8_0 block's scale and 32 signed weights.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn decode_q8_0(block: *const u8) -> (f32, __m256i) {
    // SAFETY: the caller enabled AVX2 and F16C; the block's 34 bytes are readable.
    unsafe { (scale_at(block), _mm256_loadu_si256(block.add(2).cast())) }
}

/// A Q5_0 block's scale and 32 signed weights: nibbles `j` (low) and `j + 16` (high) of byte
/// `j`, topped up by bit 4 from the fifth bits, minus 16 — set as `nibble | 0xF0` (−16 + nibble
/// in two's complement) where the fifth bit is clear.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn decode_q5_0(block: *const u8) -> (f32, __m256i) {
    // SAFETY: the caller enabled AVX2 and F16C; the block's 22 bytes are readable.
    unsafe {
        let fifth = (block.add(2) as *const i32).read_unaligned();
        let packed = _mm_loadu_si128(block.add(6).cast());
        let low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
        let nibbles = _mm256_set_m128i(high, low);
        // Byte j of `spread` is byte j / 8 of the fifth bits; or-ing all bits but j % 8 and
        // comparing with all ones leaves 0xFF exactly where bit j is set.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(fifth),
            _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            ),
        );
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
        let values = _mm256_or_si256(
            nibbles,
            _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)),
        );
        (scale_at(block), values)
    }
}

/// One weight row after another against `T` activation rows: each block's integer products
/// summed in 8 lanes as `|w| · (x · sign(w))` so the unsigned × signed instruction applies
/// (activations never hold -128); `T` is a constant so the accumulators live in registers.
macro_rules! q8_dot_kernel {
    ($name:ident, $features:literal, $decode:ident, $block_bytes:expr, |$aw:ident, $sx:ident| $products:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize>(
            weights: &[u8],
            x: &Q8Activations,
            row: usize,
            out: &mut [f32],
            rows: usize,
        ) {
            // SAFETY: the caller checked the target features; every pointer below stays within
            // `x.blocks` whole blocks of each weight row and of activation rows `row .. row + T`.
            unsafe {
                let k = x.blocks * QK8_0;
                let xq = x.quants.as_ptr().add(row * k);
                let xs = x.scales.as_ptr().add(row * x.blocks);
                let row_bytes = x.blocks * $block_bytes;
                for (f, weights) in weights.chunks_exact(row_bytes).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); T];
                    for b in 0..x.blocks {
                        let (dw, qw) = $decode(weights.as_ptr().add(b * $block_bytes));
                        let $aw = _mm256_sign_epi8(qw, qw);
                        for t in 0..T {
                            let qx =
                                _mm256_loadu_si256(xq.add(t * k + b * QK8_0) as *const __m256i);
                            let $sx = _mm256_sign_epi8(qx, qw);
                            let ints: __m256i = $products;
                            let scale = _mm256_set1_ps(dw * *xs.add(t * x.blocks + b));
                            acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(ints), acc[t]);
                        }
                    }
                    for t in 0..T {
                        out[f * rows + row + t] = hsum256(acc[t]);
                    }
                }
            }
        }
    };
}

q8_dot_kernel!(
    q8_0_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    decode_q8_0,
    Q8_0_BLOCK_BYTES,
    |aw, sx| _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx)
);
q8_dot_kernel!(
    q8_0_avx2,
    "avx2,fma,f16c",
    decode_q8_0,
    Q8_0_BLOCK_BYTES,
    |aw, sx| _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1))
);
q8_dot_kernel!(
    q5_0_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    decode_q5_0,
    Q5_0_BLOCK_BYTES,
    |aw, sx| _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx)
);
q8_dot_kernel!(
    q5_0_avx2,
    "avx2,fma,f16c",
    decode_q5_0,
    Q5_0_BLOCK_BYTES,
    |aw, sx| _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1))
);

#[cfg(test)]
/// Weights quantized by candle (ggml's layout), as bytes and dequantised, and the tensor (for
/// the tests here and in `layers/kquants.rs`).
pub(crate) fn test_weights(
    n: usize,
    k: usize,
    dtype: candle_core::quantized::GgmlDType,
    seed: u64,
) -> (Vec<u8>, Vec<f32>, candle_core::quantized::QTensor) {
    let dev = candle_core::Device::Cpu;
    let values: Vec<f32> = (0..n * k)
        .map(|i| {
            let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            ((h % 2001) as f32 - 1000.0) / 1000.0 * (1.0 + (i / 32 % 5) as f32) * 0.01
        })
        .collect();
    let dense = candle_core::Tensor::from_vec(values, (n, k), &dev).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&dense, dtype).unwrap();
    let bytes = q.data().unwrap().to_vec();
    let dequantised = q
        .dequantize(&dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (bytes, dequantised, q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul};
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn every_kernel_gives_the_integer_products_and_approximates_the_dense_product() {
        // k a multiple of 64: candle's Q5_0 product takes blocks in pairs.
        let (n, k) = (70, 128);
        for (dtype, format) in [
            (GgmlDType::Q8_0, Q8Weights::Q8_0),
            (GgmlDType::Q5_0, Q8Weights::Q5_0),
        ] {
            let (w, dense, q) = test_weights(n, k, dtype, 7);
            let candle = QMatMul::from_arc(std::sync::Arc::new(q)).unwrap();
            for rows in [1, 3, 4, 9] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                    .collect();
                let want = matmul_with(Kernel::Scalar, format, &x, rows, k, &w, n);
                for kernel in Kernel::available() {
                    let got = matmul_with(kernel, format, &x, rows, k, &w, n);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{kernel:?} {format:?} rows {rows} [{i}]: {a} vs {b}"
                        );
                    }
                }
                // candle (ggml's reference) computes the same integer sums.
                let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
                let theirs: Vec<f32> = candle
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, (a, b)) in want.iter().zip(&theirs).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{format:?} candle [{i}]: {a} vs {b}"
                    );
                }
                // Against the exact product on the dequantised weights: activation rounding only.
                for r in 0..rows {
                    for f in 0..n {
                        let terms = (0..k).map(|i| x[r * k + i] * dense[f * k + i]);
                        let exact: f32 = terms.clone().sum();
                        let scale: f32 = terms.map(f32::abs).sum();
                        let got = want[r * n + f];
                        assert!((got - exact).abs() <= 0.02 * scale, "{got} vs {exact}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let (n, k) = (9, 128);
        for (dtype, format) in [
            (GgmlDType::Q8_0, Q8Weights::Q8_0),
            (GgmlDType::Q5_0, Q8Weights::Q5_0),
        ] {
            let (w, _, _) = test_weights(n, k, dtype, 3);
            let x: Vec<f32> = (0..7 * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0)
                .collect();
            let all = matmul_q8_blocks(format, &x, 7, k, &w, n);
            for r in 0..7 {
                let alone = matmul_q8_blocks(format, &x[r * k..(r + 1) * k], 1, k, &w, n);
                assert_eq!(&all[r * n..(r + 1) * n], &alone[..], "{format:?} row {r}");
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
        for v in [-130.5f32, -2.5, -0.5, 0.5, 1.5, 2.4999, 126.5, 4_000_000.5] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
        let zeros = quantize_rows_q8_0(&[0f32; QK8_0], 1, QK8_0);
        assert!(zeros.quants.iter().all(|&q| q == 0));
    }
}
