//! Products with Q4_K and Q6_K weights read in their GGUF layout, for a handful of input rows
//! (decoding). Activations are quantized to Q8_K per 256-value block as llama.cpp does, and each
//! block's integer products are weighted by the 6- or 8-bit sub-block scales in integer
//! registers (AVX-512 VNNI `vpdpwssd` where the CPU has it, AVX2 `vpmaddwd` otherwise, scalar
//! code as the last resort), then scaled once per block in f32.
//!
//! Ours because candle 0.11 repacks Q4_K into tiles with f32 scales (0.75 bytes per weight
//! instead of 0.5625, kept beside the original) and runs Q6_K one row at a time in AVX2, so a
//! decode step streams a third more bytes than the file holds (`examples/kquant_matmul.rs`).
//! Work is split by output features over candle's persistent worker pool, whose threads are
//! already spinning from the step's other products.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::quantized::hsum256;
use super::quantized::{by_feature_units, nearest_int, Kernel, OutPtr};

/// Values per k-quant super-block.
pub const QK_K: usize = 256;
/// Bytes per Q4_K block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and mins, 128
/// bytes of nibbles.
pub const Q4K_BLOCK_BYTES: usize = 144;
/// Bytes per Q6_K block: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed scales,
/// f16 `d`.
pub const Q6K_BLOCK_BYTES: usize = 210;
/// Input rows sharing each decoded weight block.
const ROW_TILE: usize = 4;

/// The k-quant layouts this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KQuant {
    Q4K,
    Q6K,
}

impl KQuant {
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => Q4K_BLOCK_BYTES,
            Self::Q6K => Q6K_BLOCK_BYTES,
        }
    }
}

/// Activations quantized to Q8_K: per row and block a scale `d`, 256 quants and the sums of
/// each 16 quants (`bsums`) and of each 32 (`sums32`, what Q4_K's mins multiply).
pub struct Q8KActivations {
    pub(crate) d: Vec<f32>,
    pub(crate) qs: Vec<i8>,
    pub(crate) bsums: Vec<i16>,
    pub(crate) sums32: Vec<i16>,
    pub(crate) blocks: usize,
}

/// Quantizes `rows` rows of `k` values (`k` a multiple of 256) as llama.cpp's
/// `quantize_row_q8_K` does: the value of largest magnitude maps to -127, ties round to even.
/// Rows are split over candle's worker pool when there are several: a prompt chunk's
/// quantization would otherwise keep one thread busy while the others wait.
pub fn quantize_rows_q8_k(x: &[f32], rows: usize, k: usize) -> Q8KActivations {
    let blocks = k / QK_K;
    let mut d = vec![0f32; rows * blocks];
    let mut qs = vec![0i8; rows * k];
    let mut bsums = vec![0i16; rows * blocks * 16];
    let mut sums32 = vec![0i16; rows * blocks * 8];
    let total = rows * blocks;
    if total > 0 {
        let (d_out, qs_out) = (OutPtr(d.as_mut_ptr()), OutPtr(qs.as_mut_ptr()));
        let (bsums_out, sums32_out) = (OutPtr(bsums.as_mut_ptr()), OutPtr(sums32.as_mut_ptr()));
        let quantize = |range: std::ops::Range<usize>| {
            for b in range {
                // SAFETY: block `b` of every buffer belongs to this call alone, and the buffers
                // outlive the pool call.
                unsafe {
                    quantize_block_q8_k(
                        &x[b * QK_K..(b + 1) * QK_K],
                        &mut *d_out.get().add(b),
                        std::slice::from_raw_parts_mut(qs_out.get().add(b * QK_K), QK_K),
                        std::slice::from_raw_parts_mut(bsums_out.get().add(b * 16), 16),
                        std::slice::from_raw_parts_mut(sums32_out.get().add(b * 8), 8),
                    );
                }
            }
        };
        if rows > 1 {
            candle_core::utils::barrier_pool().execute_chunked(total, quantize);
        } else {
            quantize(0..total);
        }
    }
    Q8KActivations {
        d,
        qs,
        bsums,
        sums32,
        blocks,
    }
}

/// One 256-value block of [`quantize_rows_q8_k`].
fn quantize_block_q8_k(
    values: &[f32],
    d: &mut f32,
    quants: &mut [i8],
    bsums: &mut [i16],
    sums32: &mut [i16],
) {
    // The first value of largest magnitude, found in two passes the compiler vectorises.
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let Some(&max) = values
        .iter()
        .find(|v| v.abs() == amax)
        .filter(|_| amax > 0.0)
    else {
        return;
    };
    let iscale = -127.0 / max;
    for (q, &v) in quants.iter_mut().zip(values) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (sum, group) in bsums.iter_mut().zip(quants.chunks_exact(16)) {
        *sum = group.iter().map(|&q| i16::from(q)).sum();
    }
    for (s, sum) in sums32.iter_mut().enumerate() {
        *sum = bsums[2 * s] + bsums[2 * s + 1];
    }
    *d = 1.0 / iscale;
}

/// `x [rows, k] · Wᵀ` for `W [n, k]` in `kind` blocks (`w`: `n · k/256` blocks); returns
/// `[rows, n]`. `k` must be a multiple of 256 and `w` hold exactly `n` rows. A row's result does
/// not depend on the other rows.
pub fn matmul_k_quant(
    kind: KQuant,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    n: usize,
) -> Vec<f32> {
    matmul_with(Kernel::detect(), kind, x, rows, k, w, n)
}

fn matmul_with(
    kernel: Kernel,
    kind: KQuant,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    n: usize,
) -> Vec<f32> {
    let row_bytes = k / QK_K * kind.block_bytes();
    assert!(
        k.is_multiple_of(QK_K) && w.len() == n * row_bytes && x.len() >= rows * k,
        "k-quant product: [{rows}, {k}] x [{n}, {k}] with {} weight bytes",
        w.len()
    );
    let activations = quantize_rows_q8_k(x, rows, k);
    by_feature_units(n, rows, |first, out| {
        let count = out.len() / rows;
        let weights = &w[first * row_bytes..(first + count) * row_bytes];
        let mut row = 0;
        while row < rows {
            let tile = (rows - row).min(ROW_TILE);
            kernel.dot_k_quant(kind, weights, row_bytes, &activations, row, tile, out, rows);
            row += tile;
        }
    })
}

/// Runs a kernel family (`$q4k`, `$q6k`) on every weight row of `$w` over `$tile` (1 to 4)
/// activation rows from `$row`: rows are read front to back, one after the other, the order
/// the hardware prefetchers follow best.
macro_rules! dispatch {
    ($q4k:ident, $q6k:ident, $kind:expr, $w:expr, $x:expr, $row:expr, $tile:expr, $out:expr, $rows:expr) => {{
        macro_rules! run {
            ($T:literal) => {
                match $kind {
                    KQuant::Q4K => $q4k::<$T>($w, $x, $row, $out, $rows),
                    KQuant::Q6K => $q6k::<$T>($w, $x, $row, $out, $rows),
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
    /// Products of the weight rows in `w` (`row_bytes` each) with
    /// activation rows `row .. row + tile`, into `out[f * rows + t]`.
    #[allow(clippy::too_many_arguments, reason = "the tile's coordinates")]
    fn dot_k_quant(
        self,
        kind: KQuant,
        w: &[u8],
        row_bytes: usize,
        x: &Q8KActivations,
        row: usize,
        tile: usize,
        out: &mut [f32],
        rows: usize,
    ) {
        match self {
            // SAFETY: `detect` saw the features; each weight row holds `x.blocks` whole blocks.
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe {
                dispatch!(q4k_vnni, q6k_vnni, kind, w, x, row, tile, out, rows)
            },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe {
                dispatch!(q4k_avx2, q6k_avx2, kind, w, x, row, tile, out, rows)
            },
            Self::Scalar => {
                for (f, weights) in w.chunks_exact(row_bytes).enumerate() {
                    for t in 0..tile {
                        out[f * rows + row + t] = match kind {
                            KQuant::Q4K => q4k_scalar(weights, x, row + t),
                            KQuant::Q6K => q6k_scalar(weights, x, row + t),
                        };
                    }
                }
            }
        }
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// The 8 scales and 8 mins of a Q4_K block, unpacked from their 12 bytes of 6-bit fields into
/// one byte each (llama.cpp's `get_scale_min_k4`, done for all eight at once).
#[inline(always)]
pub(crate) fn q4k_scales_mins(packed: &[u8]) -> (u64, u64) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (u0, u1, u2) = (word(0), word(4), word(8));
    let scales_lo = u0 & KMASK1;
    let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mins_lo = u1 & KMASK1;
    let mins_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    (
        u64::from(scales_lo) | (u64::from(scales_hi) << 32),
        u64::from(mins_lo) | (u64::from(mins_hi) << 32),
    )
}

/// One Q4_K weight row against activation row `r`: per block
/// `d·dx·Σ_s scale_s·(q·x)_s − dmin·dx·Σ_s min_s·Σx_s`.
fn q4k_scalar(weights: &[u8], x: &Q8KActivations, r: usize) -> f32 {
    let k = x.blocks * QK_K;
    let mut sum = 0f32;
    for (b, block) in weights.chunks_exact(Q4K_BLOCK_BYTES).enumerate() {
        let (scales, mins) = q4k_scales_mins(&block[4..16]);
        let xq = &x.qs[r * k + b * QK_K..r * k + (b + 1) * QK_K];
        let mut dot = 0i32;
        let mut min_dot = 0i32;
        for s in 0..8 {
            // Chunk s/2 holds sub-block s in its low (even s) or high (odd s) nibbles.
            let chunk = &block[16 + (s / 2) * 32..16 + (s / 2 + 1) * 32];
            let shift = 4 * (s % 2);
            let sub: i32 = chunk
                .iter()
                .zip(&xq[s * 32..(s + 1) * 32])
                .map(|(&q, &v)| i32::from((q >> shift) & 0x0F) * i32::from(v))
                .sum();
            dot += i32::from((scales >> (8 * s)) as u8) * sub;
            min_dot += i32::from((mins >> (8 * s)) as u8)
                * i32::from(x.sums32[(r * x.blocks + b) * 8 + s]);
        }
        let dx = x.d[r * x.blocks + b];
        sum += f16_at(block, 0) * dx * dot as f32 - f16_at(block, 2) * dx * min_dot as f32;
    }
    sum
}

/// One Q6_K weight row against activation row `r`: per block `d·dx·Σ_g scale_g·((u − 32)·x)_g`
/// over its 16 groups of 16, `u` being the stored unsigned 6-bit value.
fn q6k_scalar(weights: &[u8], x: &Q8KActivations, r: usize) -> f32 {
    let k = x.blocks * QK_K;
    let mut sum = 0f32;
    for (b, block) in weights.chunks_exact(Q6K_BLOCK_BYTES).enumerate() {
        let xq = &x.qs[r * k + b * QK_K..r * k + (b + 1) * QK_K];
        let mut dot = 0i32;
        for (i, &v) in xq.iter().enumerate() {
            // Value i: half h = i / 128; within it, quarter j = (i % 128) / 32 and lane l.
            let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
            let ql = block[64 * h + 32 * (j % 2) + l];
            let low = if j < 2 { ql & 0x0F } else { ql >> 4 };
            let high = (block[128 + 32 * h + l] >> (2 * j)) & 0x03;
            let u = i32::from(low | (high << 4)) - 32;
            let scale = i32::from(block[192 + i / 16] as i8);
            dot += scale * u * i32::from(v);
        }
        sum += f16_at(block, 208) * x.d[r * x.blocks + b] * dot as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Byte shuffles that repeat one 16-bit lane (`i`) of a 128-bit half eight times: picks scale
/// `i` of eight widened to 16 bits for every lane of a 32-value product.
#[cfg(target_arch = "x86_64")]
const fn repeat_word(i: u8) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut j = 0;
    while j < 16 {
        out[2 * j] = 2 * i;
        out[2 * j + 1] = 2 * i + 1;
        j += 1;
    }
    out
}

#[cfg(target_arch = "x86_64")]
const Q4K_SCALE_SHUFFLE: [[u8; 32]; 8] = [
    repeat_word(0),
    repeat_word(1),
    repeat_word(2),
    repeat_word(3),
    repeat_word(4),
    repeat_word(5),
    repeat_word(6),
    repeat_word(7),
];

/// Byte shuffles that spread scales `s` and `s + 1` of sixteen over 8 bytes each (one per
/// 16-value group of a 32-value product), `s = 2i`.
#[cfg(target_arch = "x86_64")]
const fn pair_bytes(i: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut j = 0;
    while j < 8 {
        out[j] = 2 * i;
        out[j + 8] = 2 * i + 1;
        j += 1;
    }
    out
}

#[cfg(target_arch = "x86_64")]
const Q6K_SCALE_SHUFFLE: [[u8; 16]; 8] = [
    pair_bytes(0),
    pair_bytes(1),
    pair_bytes(2),
    pair_bytes(3),
    pair_bytes(4),
    pair_bytes(5),
    pair_bytes(6),
    pair_bytes(7),
];

/// One Q4_K weight row against `T` activation rows. Each 32-byte chunk of nibbles holds two
/// sub-blocks (low and high nibbles); their products with the activations are summed in 16-bit
/// pairs (`vpmaddubsw`, at most 2·15·127) and weighted by the sub-block's scale into 32-bit
/// lanes (`$scaled`), in two chains for one row, so one float multiply per block remains. The
/// mins term uses the activations' 32-value sums.
macro_rules! q4k_kernel {
    ($name:ident, $features:literal, |$sum:ident, $pairs:ident, $scale:ident| $scaled:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize>(
            weights: &[u8],
            x: &Q8KActivations,
            row: usize,
            out: &mut [f32],
            rows: usize,
        ) {
            // SAFETY: the caller checked the target features; every pointer below stays within
            // `x.blocks` whole blocks of the weight row and of activation rows `row .. row + T`.
            unsafe {
                let k = x.blocks * QK_K;
                let low_nibbles = _mm256_set1_epi8(0x0F);
                let row_bytes = x.blocks * Q4K_BLOCK_BYTES;
                for (f, weights) in weights.chunks_exact(row_bytes).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); T];
                    for b in 0..x.blocks {
                        let block = weights.as_ptr().add(b * Q4K_BLOCK_BYTES);
                        let d =
                            _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
                        let (dw, dmin) = (_mm_cvtss_f32(d), _mm_cvtss_f32(_mm_movehdup_ps(d)));
                        let (scales8, mins8) =
                            q4k_scales_mins(std::slice::from_raw_parts(block.add(4), 12));
                        let scales = _mm256_cvtepu8_epi16(_mm_set1_epi64x(scales8 as i64));
                        let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins8 as i64));
                        // Low-nibble and high-nibble products in separate chains.
                        let mut sums = [[_mm256_setzero_si256(); 2]; T];
                        for c in 0..4 {
                            let scale_low = _mm256_shuffle_epi8(
                                scales,
                                _mm256_loadu_si256(Q4K_SCALE_SHUFFLE[2 * c].as_ptr().cast()),
                            );
                            let scale_high = _mm256_shuffle_epi8(
                                scales,
                                _mm256_loadu_si256(Q4K_SCALE_SHUFFLE[2 * c + 1].as_ptr().cast()),
                            );
                            let bits = _mm256_loadu_si256(block.add(16 + 32 * c).cast());
                            let low = _mm256_and_si256(bits, low_nibbles);
                            let high = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low_nibbles);
                            for t in 0..T {
                                let xq = x.qs.as_ptr().add((row + t) * k + b * QK_K + 64 * c);
                                let $sum = sums[t][0];
                                let $pairs =
                                    _mm256_maddubs_epi16(low, _mm256_loadu_si256(xq.cast()));
                                let $scale = scale_low;
                                sums[t][0] = $scaled;
                                let $sum = sums[t][1];
                                let $pairs = _mm256_maddubs_epi16(
                                    high,
                                    _mm256_loadu_si256(xq.add(32).cast()),
                                );
                                let $scale = scale_high;
                                sums[t][1] = $scaled;
                            }
                        }
                        for t in 0..T {
                            let at = (row + t) * x.blocks + b;
                            let dx = *x.d.get_unchecked(at);
                            let xsums = _mm_loadu_si128(x.sums32.as_ptr().add(at * 8).cast());
                            let min_dot = _mm256_zextsi128_si256(_mm_madd_epi16(mins, xsums));
                            let dot = _mm256_add_epi32(sums[t][0], sums[t][1]);
                            acc[t] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dw * dx),
                                _mm256_cvtepi32_ps(dot),
                                acc[t],
                            );
                            acc[t] = _mm256_fmadd_ps(
                                _mm256_set1_ps(-dmin * dx),
                                _mm256_cvtepi32_ps(min_dot),
                                acc[t],
                            );
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

/// One Q6_K weight row against `T` activation rows: the 6-bit values are rebuilt unsigned
/// (0..63) from their low nibbles and high bit pairs, multiplied in 16-bit pairs (at most
/// 2·63·128), weighted by the 16-value groups' signed scales into 32-bit lanes (`$scaled`, one
/// chain per half block), and the offset of 32 taken off once per block through the
/// activations' 16-value sums.
macro_rules! q6k_kernel {
    ($name:ident, $features:literal, |$sum:ident, $pairs:ident, $scale:ident| $scaled:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize>(
            weights: &[u8],
            x: &Q8KActivations,
            row: usize,
            out: &mut [f32],
            rows: usize,
        ) {
            // SAFETY: as for the Q4_K kernel.
            unsafe {
                let k = x.blocks * QK_K;
                let low_nibbles = _mm256_set1_epi8(0x0F);
                let bits45 = _mm256_set1_epi8(0x30);
                let row_bytes = x.blocks * Q6K_BLOCK_BYTES;
                for (f, weights) in weights.chunks_exact(row_bytes).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); T];
                    for b in 0..x.blocks {
                        let block = weights.as_ptr().add(b * Q6K_BLOCK_BYTES);
                        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                            (block.add(208) as *const u16).read_unaligned(),
                        ))));
                        let scales8 = _mm_loadu_si128(block.add(192).cast());
                        let mut sums = [[_mm256_setzero_si256(); 2]; T];
                        for h in 0..2 {
                            let low_a = _mm256_loadu_si256(block.add(64 * h).cast());
                            let low_b = _mm256_loadu_si256(block.add(64 * h + 32).cast());
                            let high = _mm256_loadu_si256(block.add(128 + 32 * h).cast());
                            // Bit pairs 0-1, 2-3, 4-5, 6-7 of `high` top up quarters 0..4, moved to
                            // bits 4-5 of each byte.
                            let quarters = [
                                _mm256_or_si256(
                                    _mm256_and_si256(low_a, low_nibbles),
                                    _mm256_and_si256(_mm256_slli_epi16(high, 4), bits45),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(low_b, low_nibbles),
                                    _mm256_and_si256(_mm256_slli_epi16(high, 2), bits45),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16(low_a, 4), low_nibbles),
                                    _mm256_and_si256(high, bits45),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16(low_b, 4), low_nibbles),
                                    _mm256_and_si256(_mm256_srli_epi16(high, 2), bits45),
                                ),
                            ];
                            for (j, &quarter) in quarters.iter().enumerate() {
                                let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(
                                    scales8,
                                    _mm_loadu_si128(Q6K_SCALE_SHUFFLE[4 * h + j].as_ptr().cast()),
                                ));
                                for t in 0..T {
                                    let xq =
                                        x.qs.as_ptr()
                                            .add((row + t) * k + b * QK_K + 128 * h + 32 * j);
                                    let $sum = sums[t][h];
                                    let $pairs = _mm256_maddubs_epi16(
                                        quarter,
                                        _mm256_loadu_si256(xq.cast()),
                                    );
                                    let $scale = scale;
                                    sums[t][h] = $scaled;
                                }
                            }
                        }
                        let scales16 = _mm256_cvtepi8_epi16(scales8);
                        for t in 0..T {
                            let at = (row + t) * x.blocks + b;
                            let bsums = _mm256_loadu_si256(x.bsums.as_ptr().add(at * 16).cast());
                            let offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, scales16), 5);
                            let dot =
                                _mm256_sub_epi32(_mm256_add_epi32(sums[t][0], sums[t][1]), offset);
                            acc[t] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dw * *x.d.get_unchecked(at)),
                                _mm256_cvtepi32_ps(dot),
                                acc[t],
                            );
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

q4k_kernel!(
    q4k_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    |sum, pairs, scale| _mm256_dpwssd_epi32(sum, pairs, scale)
);
q4k_kernel!(q4k_avx2, "avx2,fma,f16c", |sum, pairs, scale| {
    _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, scale))
});
q6k_kernel!(
    q6k_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    |sum, pairs, scale| _mm256_dpwssd_epi32(sum, pairs, scale)
);
q6k_kernel!(q6k_avx2, "avx2,fma,f16c", |sum, pairs, scale| {
    _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, scale))
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::quantized::test_weights;
    use candle_core::quantized::{GgmlDType, QMatMul};
    use candle_core::{Device, Module, Tensor};

    fn inputs(rows: usize, k: usize) -> Vec<f32> {
        (0..rows * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn every_kernel_gives_the_scalar_sums_and_candles_product() {
        let (n, k) = (23, 768);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let kind = KQuant::from_ggml(dtype).unwrap();
            let (w, dense, q) = test_weights(n, k, dtype, 11);
            let candle = QMatMul::from_arc(std::sync::Arc::new(q)).unwrap();
            for rows in [1, 3, 4, 9] {
                let x = inputs(rows, k);
                let scalar = matmul_with(Kernel::Scalar, kind, &x, rows, k, &w, n);
                for kernel in Kernel::available() {
                    let got = matmul_with(kernel, kind, &x, rows, k, &w, n);
                    for (i, (a, b)) in got.iter().zip(&scalar).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{kernel:?} {dtype:?} rows {rows} [{i}]: {a} vs {b}"
                        );
                    }
                }
                // candle computes the same integer sums (its activations are Q8_K as well).
                let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
                let theirs: Vec<f32> = candle
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, (a, b)) in scalar.iter().zip(&theirs).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{dtype:?} candle [{i}]: {a} vs {b}"
                    );
                }
                // Against the dequantised weights in f32: activation rounding only.
                for r in 0..rows {
                    for f in 0..n {
                        let terms = (0..k).map(|i| x[r * k + i] * dense[f * k + i]);
                        let exact: f32 = terms.clone().sum();
                        let scale: f32 = terms.map(f32::abs).sum();
                        let got = scalar[r * n + f];
                        assert!((got - exact).abs() <= 0.02 * scale, "{got} vs {exact}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let (n, k) = (9, 512);
        for kind in [KQuant::Q4K, KQuant::Q6K] {
            let dtype = if kind == KQuant::Q4K {
                GgmlDType::Q4K
            } else {
                GgmlDType::Q6K
            };
            let (w, _, _) = test_weights(n, k, dtype, 3);
            let x = inputs(7, k);
            let all = matmul_k_quant(kind, &x, 7, k, &w, n);
            for r in 0..7 {
                let alone = matmul_k_quant(kind, &x[r * k..(r + 1) * k], 1, k, &w, n);
                assert_eq!(&all[r * n..(r + 1) * n], &alone[..], "{kind:?} row {r}");
            }
        }
    }

    #[test]
    fn activations_quantize_like_llama_cpp() {
        // The value of largest magnitude maps to -127 (scale negative when it is positive);
        // halves round to even.
        let mut x = vec![0f32; QK_K];
        x[..4].copy_from_slice(&[127.0, 63.5, 62.5, -1.5]);
        let a = quantize_rows_q8_k(&x, 1, QK_K);
        assert_eq!(&a.qs[..4], &[-127, -64, -62, 2]);
        assert_eq!(a.d[0], -1.0);
        assert_eq!(a.bsums[0], -127 - 64 - 62 + 2);
        assert_eq!(a.sums32[0], a.bsums[0] + a.bsums[1]);
        for v in [-130.5f32, -2.5, -0.5, 0.5, 1.5, 2.4999, 126.5, 4_000_000.5] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
        let zeros = quantize_rows_q8_k(&[0f32; QK_K], 1, QK_K);
        assert!(zeros.qs.iter().all(|&q| q == 0) && zeros.d[0] == 0.0);
    }
}
