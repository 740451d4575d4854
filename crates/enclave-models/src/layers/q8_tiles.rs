//! Products of Q8_0 or Q5_0 weights with many activation rows (prompt chunks, a large batch's
//! output head) on AVX-512 VNNI. Each work unit takes eight weight rows and interleaves their
//! blocks four bytes at a time into a small tile (signed bytes, f32 scales), so one `vpdpbusd`
//! multiplies four activation bytes, broadcast, with four weights of each of the eight output
//! features. A block's integer sums for eight features then take one conversion and one
//! multiply-add per activation row, against four `vpdpbusd`-and-scale sequences per feature and
//! row in the one-row kernel (`layers/quantized.rs`), and the tile is built once for every row.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: activations are quantized to Q8_0 as llama.cpp
//! does and offset by 128 into unsigned bytes, and the tile carries `-128 Σ w` per block and
//! feature as the sums' starting value, so each block's integer sum is exactly `Σ w·x`.
//!
//! Ours because candle 0.11 has no SIMD Q5_0 product (its products of many rows dequantise the
//! weights into an f32 GEMM) and its Q8_0 product over a 262,144-row head at 16 rows runs at
//! 18 GMAC/s (`examples/kquant_matmul.rs`).

use super::quantized::{check_shapes, quantize_block_q8_0, OutPtr, Q8Weights, QK8_0};

/// Output features interleaved in one tile (the lanes of a 256-bit vector).
const FEATURES: usize = 8;
/// Activation rows whose sums are kept in registers together (`group_vnni` dispatches 1 to 4).
const ROW_TILE: usize = 4;
const _: () = assert!(ROW_TILE == 4);
/// 256-bit vectors per block in a tile: the scales, the starting sums, eight 4-byte chunks.
const TILE_VECTORS: usize = 2 + QK8_0 / 4;

/// Whether this CPU runs [`matmul_q8_tiles`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::quantized::avx2()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x [rows, k] · Wᵀ` for `W [n, k]` in `format` blocks; returns `[rows, n]`, or `None` when
/// the CPU lacks AVX-512 VNNI (see [`available`]). `k` must be a multiple of 32 and `w` hold
/// exactly `n` rows. The same integer sums as `quantized::matmul_q8_blocks`, each block's scaled
/// into a row's total in block order; a row's result does not depend on the other rows.
pub fn matmul_q8_tiles(
    format: Q8Weights,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    n: usize,
) -> Option<Vec<f32>> {
    if !available() {
        return None;
    }
    check_shapes(format, x, rows, k, w, n);
    // Every tile reads all of a pass's activations: a pass holds as many rows as keep them in
    // the last-level cache (a 2,048-row chunk of an 8,960-wide input would not).
    let pass_rows = (PASS_BYTES / k.max(1)).max(4 * ROW_TILE) / ROW_TILE * ROW_TILE;
    Some(in_passes(format, x, rows, k, w, n, pass_rows))
}

/// [`matmul_q8_tiles`] on a CPU that has the features, `pass_rows` activation rows at a time.
fn in_passes(
    format: Q8Weights,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    n: usize,
    pass_rows: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    if rows == 0 || n == 0 || k == 0 {
        return out;
    }
    let mut first_row = 0;
    while first_row < rows {
        let pass = (rows - first_row).min(pass_rows);
        let (scales, unsigned) = quantize_offset(&x[first_row * k..(first_row + pass) * k], k);
        let shared = Shared {
            format,
            w,
            n,
            k,
            rows: pass,
            scales: &scales,
            unsigned: &unsigned,
            out: OutPtr(out[first_row * n..].as_mut_ptr()),
        };
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(FEATURES), |groups| {
            #[cfg(target_arch = "x86_64")]
            {
                let mut tile = Vec::new();
                for group in groups {
                    // SAFETY: `available` saw the features; `shared` describes consistent
                    // buffers (checked above) and each group writes only its features' outputs.
                    unsafe { group_vnni(&shared, group, &mut tile) };
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (groups, &shared);
        });
        first_row += pass;
    }
    out
}

/// Activation bytes (one per value) a pass keeps for its tiles to share.
const PASS_BYTES: usize = 4 << 20;

/// Rows of `x` quantized to Q8_0 (as `quantized::quantize_rows_q8_0`) with 128 added to each
/// quant: the scales and the unsigned quants. In parallel: a prompt chunk's quantization would
/// otherwise keep one thread busy while the other waits.
fn quantize_offset(x: &[f32], k: usize) -> (Vec<f32>, Vec<u8>) {
    let rows = x.len() / k;
    let blocks = k / QK8_0;
    let mut scales = vec![0f32; rows * blocks];
    let mut unsigned = vec![0u8; rows * k];
    let scales_out = OutPtr(scales.as_mut_ptr());
    let unsigned_out = OutPtr(unsigned.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        let mut quants = [0i8; QK8_0];
        for row in range {
            for b in 0..blocks {
                let at = row * k + b * QK8_0;
                let scale = quantize_block_q8_0(&x[at..at + QK8_0], &mut quants);
                // SAFETY: each row is one unit's alone, inside both vectors, which outlive the
                // pool call.
                unsafe {
                    *scales_out.get().add(row * blocks + b) = scale;
                    for (i, &q) in quants.iter().enumerate() {
                        *unsigned_out.get().add(at + i) = q as u8 ^ 0x80;
                    }
                }
            }
        }
    });
    (scales, unsigned)
}

/// What every work unit of a pass reads.
struct Shared<'a> {
    format: Q8Weights,
    w: &'a [u8],
    n: usize,
    k: usize,
    /// Rows in this pass.
    rows: usize,
    /// Activation scales, `[rows, k / 32]`.
    scales: &'a [f32],
    /// The activations' quants plus 128, `[rows, k]`.
    unsigned: &'a [u8],
    /// The pass's first output row.
    out: OutPtr,
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Builds the tile of output features `8 group .. 8 group + 8` and runs every activation row
/// against it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn group_vnni(s: &Shared, group: usize, tile: &mut Vec<__m256i>) {
    // SAFETY: the caller checked the features and the buffers' sizes; weight rows read are
    // `first .. first + count`, all below `n`.
    unsafe {
        let blocks = s.k / QK8_0;
        let block_bytes = s.format.block_bytes();
        let row_bytes = blocks * block_bytes;
        let first = group * FEATURES;
        let count = (s.n - first).min(FEATURES);
        tile.clear();
        tile.resize(blocks * TILE_VECTORS, _mm256_setzero_si256());
        let offset = _mm256_set1_epi8(0x80u8 as i8);
        for b in 0..blocks {
            let mut quants = [_mm256_setzero_si256(); FEATURES];
            let mut scales = [0f32; FEATURES];
            for j in 0..count {
                let block = s.w.as_ptr().add((first + j) * row_bytes + b * block_bytes);
                (scales[j], quants[j]) = match s.format {
                    Q8Weights::Q8_0 => super::quantized::decode_q8_0(block),
                    Q8Weights::Q5_0 => super::quantized::decode_q5_0(block),
                };
            }
            let chunks = transpose_dwords(quants);
            // 128 Σ w per feature: the offset's share of each unsigned-by-signed sum.
            let mut offset_share = _mm256_setzero_si256();
            for &chunk in &chunks {
                offset_share = _mm256_dpbusd_epi32(offset_share, offset, chunk);
            }
            let t = &mut tile[b * TILE_VECTORS..(b + 1) * TILE_VECTORS];
            t[0] = _mm256_castps_si256(_mm256_loadu_ps(scales.as_ptr()));
            t[1] = _mm256_sub_epi32(_mm256_setzero_si256(), offset_share);
            t[2..].copy_from_slice(&chunks);
        }
        let mut row = 0;
        while row < s.rows {
            let tile_rows = (s.rows - row).min(ROW_TILE);
            match tile_rows {
                1 => rows_vnni::<1>(s, tile, row, first, count),
                2 => rows_vnni::<2>(s, tile, row, first, count),
                3 => rows_vnni::<3>(s, tile, row, first, count),
                _ => rows_vnni::<4>(s, tile, row, first, count),
            }
            row += tile_rows;
        }
    }
}

/// Activation rows `row .. row + R` against a built tile, into their outputs `first ..
/// first + count`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn rows_vnni<const R: usize>(
    s: &Shared,
    tile: &[__m256i],
    row: usize,
    first: usize,
    count: usize,
) {
    // SAFETY: rows `row .. row + R` exist (the caller's loop), each holds `k` activation bytes
    // and `blocks` scales; the outputs written are this group's features of those rows.
    unsafe {
        let blocks = s.k / QK8_0;
        let mut sums = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let t = tile.as_ptr().add(b * TILE_VECTORS);
            let weight_scales = _mm256_castsi256_ps(*t);
            for (r, sum) in sums.iter_mut().enumerate() {
                let x = s.unsigned.as_ptr().add((row + r) * s.k + b * QK8_0);
                let mut ints = *t.add(1);
                for c in 0..QK8_0 / 4 {
                    let four = _mm256_set1_epi32((x.add(4 * c) as *const i32).read_unaligned());
                    ints = _mm256_dpbusd_epi32(ints, four, *t.add(2 + c));
                }
                let x_scale = *s.scales.get_unchecked((row + r) * blocks + b);
                let scale = _mm256_mul_ps(weight_scales, _mm256_set1_ps(x_scale));
                *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, *sum);
            }
        }
        for (r, sum) in sums.iter().enumerate() {
            let out = s.out.get().add((row + r) * s.n + first);
            if count == FEATURES {
                _mm256_storeu_ps(out, *sum);
            } else {
                let mut lanes = [0f32; FEATURES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *sum);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), out, count);
            }
        }
    }
}

/// Eight vectors of eight 4-byte chunks, transposed: chunk `c` of vector `j` moves to lane `j`
/// of vector `c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose_dwords(q: [__m256i; 8]) -> [__m256i; 8] {
    // SAFETY: called from AVX2 code only.
    unsafe {
        let a0 = _mm256_unpacklo_epi32(q[0], q[1]);
        let a1 = _mm256_unpackhi_epi32(q[0], q[1]);
        let a2 = _mm256_unpacklo_epi32(q[2], q[3]);
        let a3 = _mm256_unpackhi_epi32(q[2], q[3]);
        let a4 = _mm256_unpacklo_epi32(q[4], q[5]);
        let a5 = _mm256_unpackhi_epi32(q[4], q[5]);
        let a6 = _mm256_unpacklo_epi32(q[6], q[7]);
        let a7 = _mm256_unpackhi_epi32(q[6], q[7]);
        // Chunks c and c + 4 of four vectors each.
        let b0 = _mm256_unpacklo_epi64(a0, a2);
        let b1 = _mm256_unpackhi_epi64(a0, a2);
        let b2 = _mm256_unpacklo_epi64(a1, a3);
        let b3 = _mm256_unpackhi_epi64(a1, a3);
        let b4 = _mm256_unpacklo_epi64(a4, a6);
        let b5 = _mm256_unpackhi_epi64(a4, a6);
        let b6 = _mm256_unpacklo_epi64(a5, a7);
        let b7 = _mm256_unpackhi_epi64(a5, a7);
        [
            _mm256_permute2x128_si256::<0x20>(b0, b4),
            _mm256_permute2x128_si256::<0x20>(b1, b5),
            _mm256_permute2x128_si256::<0x20>(b2, b6),
            _mm256_permute2x128_si256::<0x20>(b3, b7),
            _mm256_permute2x128_si256::<0x31>(b0, b4),
            _mm256_permute2x128_si256::<0x31>(b1, b5),
            _mm256_permute2x128_si256::<0x31>(b2, b6),
            _mm256_permute2x128_si256::<0x31>(b3, b7),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::quantized::{matmul_q8_blocks, test_weights};
    use candle_core::quantized::GgmlDType;

    #[test]
    fn tiles_give_the_one_row_kernels_integer_sums() {
        if !available() {
            eprintln!("SKIPPED: this CPU lacks AVX-512 VNNI");
            return;
        }
        // 21 features: two whole tiles and a partial one; rows past one row tile and a tail.
        let (n, k) = (21, 160);
        for (dtype, format) in [
            (GgmlDType::Q8_0, Q8Weights::Q8_0),
            (GgmlDType::Q5_0, Q8Weights::Q5_0),
        ] {
            let (w, _, _) = test_weights(n, k, dtype, 11);
            for (rows, pass_rows) in [(1, 16), (4, 16), (7, 16), (33, 64), (33, 8)] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 53 % 127) as f32 - 63.0) / 9.0)
                    .collect();
                let want = matmul_q8_blocks(format, &x, rows, k, &w, n);
                let got = in_passes(format, &x, rows, k, &w, n, pass_rows);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{format:?} rows {rows} in {pass_rows} [{}, {}]: {a} vs {b}",
                        i / n,
                        i % n
                    );
                }
            }
        }
    }

    #[test]
    fn extreme_weights_and_activations_keep_exact_integer_sums() {
        if !available() {
            return;
        }
        // Weights ±127 and activations at ±127 after quantization: the offset's share must
        // cancel exactly. One feature, one block: the sum is an exact small integer times the
        // scales, so compare against the integer sum.
        let k = QK8_0;
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        for i in 0..32 {
            block[2 + i] = if i % 3 == 0 { 0x81 } else { 0x7F }; // -127 or 127
        }
        let x: Vec<f32> = (0..k)
            .map(|i| if i % 2 == 0 { 127.0 } else { -127.0 })
            .collect();
        let got = matmul_q8_tiles(Q8Weights::Q8_0, &x, 1, k, &block, 1).unwrap();
        let exact: i32 = (0..32)
            .map(|i| (if i % 3 == 0 { -127 } else { 127 }) * (if i % 2 == 0 { 127 } else { -127 }))
            .sum();
        assert_eq!(got[0], exact as f32);
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        if !available() {
            return;
        }
        let (n, k) = (13, 96);
        let (w, _, _) = test_weights(n, k, GgmlDType::Q5_0, 5);
        let x: Vec<f32> = (0..9 * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0)
            .collect();
        let all = matmul_q8_tiles(Q8Weights::Q5_0, &x, 9, k, &w, n).unwrap();
        for r in 0..9 {
            let alone =
                matmul_q8_tiles(Q8Weights::Q5_0, &x[r * k..(r + 1) * k], 1, k, &w, n).unwrap();
            assert_eq!(&all[r * n..(r + 1) * n], &alone[..], "row {r}");
        }
    }
}
