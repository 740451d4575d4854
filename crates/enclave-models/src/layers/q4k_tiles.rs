//! Q4_K weights repacked at load into tiles of eight output features, for products of any
//! number of rows on AVX-512 VNNI. A tile block holds one 256-value block of each of eight
//! weight rows: their nibbles interleaved four bytes at a time, so one `vpdpbusd` multiplies four
//! activation bytes (broadcast) by four weights of each of the eight features and the sums land
//! in the features' lanes; the 6-bit scales and mins unpacked to a byte per sub-block and
//! feature; `d` and `dmin` side by side. Each block then costs about 30 instructions per feature
//! and activation row, against about 75 in the one-row kernel (`layers/kquants.rs`), which is
//! what bound decoding on Q4_K_M files below llama.cpp's speed.
//!
//! The arithmetic is llama.cpp's (and the one-row kernel's): activations quantized to Q8_K,
//! per block `d·dx·Σ_s scale_s·(q·x)_s − dmin·dx·Σ_s min_s·Σx_s` with the sums in integers.
//! A tile block takes 1,184 bytes for the 1,152 of the file's eight blocks.
//!
//! Ours because candle 0.11's Q4_K product decodes at under half the memory bandwidth and its
//! repacked copy takes a third more bytes per weight (`examples/kquant_matmul.rs`).

use super::kquants::{q4k_scales_mins, quantize_rows_q8_k, Q8KActivations, Q4K_BLOCK_BYTES, QK_K};
use super::quantized::OutPtr;

/// Output features interleaved in one tile (the lanes of a 256-bit vector).
const FEATURES: usize = 8;
/// Activation rows whose sums are kept in registers together.
const ROW_TILE: usize = 4;
/// Byte offsets within a tile block: `d` and `dmin` (f16 per feature), the scales (`[sub-block]
/// [feature]`), the mins (`[sub-block pair][feature][2]`, for `vpdpwssd` on pairs), the nibbles
/// (`[chunk][4-byte group][feature][4]`).
const D: usize = 0;
const DMIN: usize = 16;
const SCALES: usize = 32;
const MINS: usize = 96;
const QS: usize = 160;
/// 32-byte lines per tile block (1,184 bytes).
const TILE_LINES: usize = (QS + FEATURES * 128) / 32;

/// A 32-byte line, so every vector load of the nibbles is aligned.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Line([u8; 32]);

/// A Q4_K matrix `[n, k]` in tiles: `n.div_ceil(8)` groups of eight features, each group's
/// `k / 256` tile blocks in order.
pub struct Q4KTiles {
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for Q4KTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4KTiles")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Whether this CPU runs the tiles.
pub fn available() -> bool {
    super::q8_tiles::available()
}

impl Q4KTiles {
    /// Repacks `w`, the file's `n · k/256` Q4_K blocks; `None` when the CPU lacks AVX-512 VNNI
    /// or the shape does not fit (`k` not a multiple of 256, `w` not `n` rows).
    pub fn new(w: &[u8], n: usize, k: usize) -> Option<Self> {
        let blocks = k / QK_K;
        if !available()
            || k == 0
            || !k.is_multiple_of(QK_K)
            || w.len() != n * blocks * Q4K_BLOCK_BYTES
        {
            return None;
        }
        let groups = n.div_ceil(FEATURES);
        let mut lines = vec![Line([0; 32]); groups * blocks * TILE_LINES];
        let out = OutPtr(lines.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(groups, |range| {
            for group in range {
                // SAFETY: each group's tile blocks belong to this call alone, inside `lines`,
                // which outlives the pool call.
                let tiles = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.get().add(group * blocks * TILE_LINES).cast::<u8>(),
                        blocks * TILE_LINES * 32,
                    )
                };
                pack_group(w, n, blocks, group, tiles);
            }
        });
        Some(Self { n, k, lines })
    }

    /// `(n, k)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lines.len() * 32
    }

    /// `x [rows, k] · Wᵀ`, `[rows, n]`. A row's result does not depend on the other rows.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.in_passes(x, rows, (PASS_BYTES / self.k.max(1)).max(4 * ROW_TILE))
    }

    fn in_passes(&self, x: &[f32], rows: usize, pass_rows: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len() >= rows * k,
            "Q4_K tiles: [{rows}, {k}] input of {}",
            x.len()
        );
        let mut out = vec![0f32; rows * n];
        if rows == 0 || n == 0 || k == 0 {
            return out;
        }
        let mut first_row = 0;
        while first_row < rows {
            let pass = (rows - first_row).min(pass_rows);
            let activations =
                quantize_rows_q8_k(&x[first_row * k..(first_row + pass) * k], pass, k);
            let shared = Shared {
                tiles: self,
                x: &activations,
                rows: pass,
                out: OutPtr(out[first_row * n..].as_mut_ptr()),
            };
            candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(FEATURES), |groups| {
                #[cfg(target_arch = "x86_64")]
                for group in groups {
                    // SAFETY: the tiles exist only where `available` saw the features; each
                    // group writes only its own features' outputs.
                    unsafe { group_vnni(&shared, group) };
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (groups, &shared);
            });
            first_row += pass;
        }
        out
    }
}

/// Activation bytes (one per value) a pass keeps for the tiles to share from cache.
const PASS_BYTES: usize = 4 << 20;

/// Writes the tile blocks of features `8 group .. 8 group + 8` (zeros past `n`).
fn pack_group(w: &[u8], n: usize, blocks: usize, group: usize, tiles: &mut [u8]) {
    let row_bytes = blocks * Q4K_BLOCK_BYTES;
    for b in 0..blocks {
        let tile = &mut tiles[b * TILE_LINES * 32..(b + 1) * TILE_LINES * 32];
        for j in 0..FEATURES.min(n - group * FEATURES) {
            let at = (group * FEATURES + j) * row_bytes + b * Q4K_BLOCK_BYTES;
            let block = &w[at..at + Q4K_BLOCK_BYTES];
            tile[D + 2 * j..D + 2 * j + 2].copy_from_slice(&block[0..2]);
            tile[DMIN + 2 * j..DMIN + 2 * j + 2].copy_from_slice(&block[2..4]);
            let (scales, mins) = q4k_scales_mins(&block[4..16]);
            for s in 0..8 {
                tile[SCALES + 8 * s + j] = (scales >> (8 * s)) as u8;
                tile[MINS + 16 * (s / 2) + 2 * j + s % 2] = (mins >> (8 * s)) as u8;
            }
            for c in 0..4 {
                for i in 0..8 {
                    let to = QS + (8 * c + i) * 32 + 4 * j;
                    let from = 16 + 32 * c + 4 * i;
                    tile[to..to + 4].copy_from_slice(&block[from..from + 4]);
                }
            }
        }
    }
}

/// What every work unit of a pass reads.
struct Shared<'a> {
    tiles: &'a Q4KTiles,
    x: &'a Q8KActivations,
    /// Rows in this pass.
    rows: usize,
    /// The pass's first output row.
    out: OutPtr,
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Every activation row of the pass against the tiles of group `group`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn group_vnni(s: &Shared, group: usize) {
    // SAFETY: the caller checked the features; rows are below `s.rows`.
    unsafe {
        let mut row = 0;
        while row < s.rows {
            let tile_rows = (s.rows - row).min(ROW_TILE);
            match tile_rows {
                1 => rows_vnni::<1>(s, group, row),
                2 => rows_vnni::<2>(s, group, row),
                3 => rows_vnni::<3>(s, group, row),
                _ => rows_vnni::<4>(s, group, row),
            }
            row += tile_rows;
        }
    }
}

/// Activation rows `row .. row + R` against the tiles of group `group`. Per 64-value chunk the
/// low nibbles hold sub-block `2c` and the high ones `2c + 1`; each sub-block's sums
/// (`vpdpbusd`, unsigned nibbles by signed activations, at most 32·15·128) are weighted by its
/// scales (`vpmulld`), the mins by the activations' 32-value sums in 16-bit pairs (`vpdpwssd`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn rows_vnni<const R: usize>(s: &Shared, group: usize, row: usize) {
    // SAFETY: rows `row .. row + R` exist (the caller's loop), each with `k` quants, `blocks`
    // scales and `8 blocks` sums; the group's tile blocks are inside `lines`; the outputs
    // written are this group's features of those rows.
    unsafe {
        let (n, k) = (s.tiles.n, s.tiles.k);
        let blocks = k / QK_K;
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let tiles = s
            .tiles
            .lines
            .as_ptr()
            .add(group * blocks * TILE_LINES)
            .cast::<u8>();
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let tile = tiles.add(b * TILE_LINES * 32);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(D).cast()));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(DMIN).cast()));
            let xq: [*const u8; R] =
                std::array::from_fn(|r| s.x.qs.as_ptr().add((row + r) * k + b * QK_K).cast());
            let mut dot = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let mut low = [_mm256_setzero_si256(); R];
                let mut high = [_mm256_setzero_si256(); R];
                for i in 0..8 {
                    let bits = _mm256_load_si256(tile.add(QS + (8 * c + i) * 32).cast());
                    let w_low = _mm256_and_si256(bits, low_nibbles);
                    let w_high = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low_nibbles);
                    for r in 0..R {
                        let x = xq[r].add(64 * c + 4 * i);
                        let x_low = _mm256_set1_epi32((x as *const i32).read_unaligned());
                        let x_high = _mm256_set1_epi32((x.add(32) as *const i32).read_unaligned());
                        low[r] = _mm256_dpbusd_epi32(low[r], w_low, x_low);
                        high[r] = _mm256_dpbusd_epi32(high[r], w_high, x_high);
                    }
                }
                let scale_low =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(tile.add(SCALES + 16 * c).cast()));
                let scale_high =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(tile.add(SCALES + 16 * c + 8).cast()));
                for r in 0..R {
                    dot[r] = _mm256_add_epi32(
                        dot[r],
                        _mm256_add_epi32(
                            _mm256_mullo_epi32(low[r], scale_low),
                            _mm256_mullo_epi32(high[r], scale_high),
                        ),
                    );
                }
            }
            let mins: [__m256i; 4] = std::array::from_fn(|p| {
                _mm256_cvtepu8_epi16(_mm_loadu_si128(tile.add(MINS + 16 * p).cast()))
            });
            for r in 0..R {
                let at = (row + r) * blocks + b;
                let sums = s.x.sums32.as_ptr().add(at * 8);
                let mut min_dot = _mm256_setzero_si256();
                for (p, &pair) in mins.iter().enumerate() {
                    let x_sums =
                        _mm256_set1_epi32((sums.add(2 * p) as *const i32).read_unaligned());
                    min_dot = _mm256_dpwssd_epi32(min_dot, pair, x_sums);
                }
                let dx = _mm256_set1_ps(*s.x.d.get_unchecked(at));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_mul_ps(d, dx), acc[r]);
                acc[r] =
                    _mm256_fnmadd_ps(_mm256_cvtepi32_ps(min_dot), _mm256_mul_ps(dmin, dx), acc[r]);
            }
        }
        let first = group * FEATURES;
        let count = (n - first).min(FEATURES);
        for (r, sum) in acc.iter().enumerate() {
            let out = s.out.get().add((row + r) * n + first);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::kquants::{matmul_k_quant, KQuant};
    use crate::layers::quantized::test_weights;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn tiles_give_the_one_row_kernels_products() {
        if !available() {
            eprintln!("SKIPPED: this CPU lacks AVX-512 VNNI");
            return;
        }
        // 21 features: two whole tiles and a partial one; rows past one row tile and a tail.
        let (n, k) = (21, 512);
        let (w, _, _) = test_weights(n, k, GgmlDType::Q4K, 3);
        let Some(tiles) = Q4KTiles::new(&w, n, k) else {
            panic!("no tiles for a [21, 512] Q4_K matrix");
        };
        for (rows, pass_rows) in [(1, 16), (4, 16), (7, 16), (33, 64), (33, 8)] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 53 % 127) as f32 - 63.0) / 9.0)
                .collect();
            let want = matmul_k_quant(KQuant::Q4K, &x, rows, k, &w, n);
            let got = tiles.in_passes(&x, rows, pass_rows);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "rows {rows} in {pass_rows} [{}, {}]: {a} vs {b}",
                    i / n,
                    i % n
                );
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        if !available() {
            return;
        }
        let (n, k) = (13, 256);
        let (w, _, _) = test_weights(n, k, GgmlDType::Q4K, 5);
        let Some(tiles) = Q4KTiles::new(&w, n, k) else {
            panic!("no tiles");
        };
        let x: Vec<f32> = (0..9 * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0)
            .collect();
        let all = tiles.matmul(&x, 9);
        for r in 0..9 {
            let alone = tiles.matmul(&x[r * k..(r + 1) * k], 1);
            assert_eq!(&all[r * n..(r + 1) * n], &alone[..], "row {r}");
        }
    }

    #[test]
    fn shapes_that_do_not_fit_get_no_tiles() {
        let (w, _, _) = test_weights(8, 256, GgmlDType::Q4K, 1);
        assert!(Q4KTiles::new(&w, 9, 256).is_none());
        assert!(Q4KTiles::new(&w[..w.len() - 1], 8, 256).is_none());
        assert!(Q4KTiles::new(&w, 8, 128).is_none());
    }
}
