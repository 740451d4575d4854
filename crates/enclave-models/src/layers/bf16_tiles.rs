//! bf16 weights repacked once into tiles of sixteen output features, for products of any number
//! of rows on AVX512-BF16. A tile holds, for each pair of input positions, the two bf16 weights
//! of each of the sixteen features (64 bytes): one `vdpbf16ps` multiplies an input pair,
//! broadcast, by the pairs of all sixteen features, and the sums land in the features' lanes.
//! Each weight load then feeds up to 16 rows, and no horizontal sums remain; the row-major
//! kernel (`layers/bf16_matmul.rs`) reads a weight and an input vector per 4 × 4 tile of products
//! and reduces every (row, feature) sum at the end, which bound a 16-sequence decoding step at
//! about 200 GFLOP/s (BENCHMARKS.md, "Serving engine under concurrent load").
//!
//! Inputs are rounded to bf16 as in `layers/bf16_matmul.rs` (to nearest, ties to even); every
//! (row, feature) sum runs over the input pairs in order in one f32 lane, whatever the batch.

use half::bf16;

use super::quantized::OutPtr;

/// Output features per tile (the f32 lanes of a 512-bit vector).
const FEATURES: usize = 16;
/// Most activation rows whose sums are kept in registers together (for two groups: 16
/// accumulators, two weight loads and eight broadcasts per sixteen `vdpbf16ps`; one group of
/// sixteen rows ran no faster, its broadcasts competing with the products).
const ROW_TILE: usize = 8;
/// Feature groups a work unit takes together.
const GROUPS_PER_UNIT: usize = 2;
/// Input rows' bf16 bytes a pass keeps for the tiles to share from cache.
const PASS_BYTES: usize = 4 << 20;

/// A 64-byte line: one input pair of sixteen features.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; FEATURES]);

/// A bf16 matrix `[n, k]` in tiles: `n.div_ceil(16)` groups of sixteen features, each group's
/// `k.div_ceil(2)` input pairs in order (features past `n` and the pair past an odd `k` zero).
pub struct Bf16Tiles {
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for Bf16Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16Tiles")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Whether this CPU runs the tiles (AVX512-BF16, as `layers/bf16_matmul.rs`).
pub fn available() -> bool {
    super::bf16_matmul::available()
}

impl Bf16Tiles {
    /// Repacks `w [n, k]`; `None` when the CPU lacks AVX512-BF16 or `w` is not `n · k` values.
    pub fn new(w: &[bf16], n: usize, k: usize) -> Option<Self> {
        if !available() || k == 0 || w.len() != n * k {
            return None;
        }
        let pairs = k.div_ceil(2);
        let groups = n.div_ceil(FEATURES);
        let mut lines = vec![Line([0; FEATURES]); groups * pairs];
        let out = OutPtr(lines.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(groups, |range| {
            for group in range {
                // SAFETY: each group's lines belong to this call alone, inside `lines`, which
                // outlives the pool call.
                let tile =
                    unsafe { std::slice::from_raw_parts_mut(out.get().add(group * pairs), pairs) };
                for j in 0..FEATURES.min(n - group * FEATURES) {
                    let row = &w[(group * FEATURES + j) * k..][..k];
                    for (i, line) in tile.iter_mut().enumerate() {
                        let low = row[2 * i].to_bits();
                        let high = row.get(2 * i + 1).map_or(0, |v| v.to_bits());
                        line.0[j] = u32::from(low) | (u32::from(high) << 16);
                    }
                }
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
        self.lines.len() * 64
    }

    /// `x [rows, k] · Wᵀ`, `[rows, n]`. A row's result does not depend on the other rows.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let pass_rows = (PASS_BYTES / (2 * self.k).max(1)).max(ROW_TILE);
        self.in_passes(x, rows, pass_rows)
    }

    fn in_passes(&self, x: &[f32], rows: usize, pass_rows: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len() >= rows * k,
            "bf16 tiles: [{rows}, {k}] input of {}",
            x.len()
        );
        let mut out = vec![0f32; rows * n];
        if rows == 0 || n == 0 {
            return out;
        }
        let mut first_row = 0;
        while first_row < rows {
            let pass = (rows - first_row).min(pass_rows);
            let pairs = input_pairs(&x[first_row * k..(first_row + pass) * k], pass, k);
            let shared = Shared {
                tiles: self,
                pairs: &pairs,
                rows: pass,
                out: OutPtr(out[first_row * n..].as_mut_ptr()),
            };
            let groups = n.div_ceil(FEATURES);
            let units = groups.div_ceil(GROUPS_PER_UNIT);
            candle_core::utils::barrier_pool().execute_chunked(units, |range| {
                #[cfg(target_arch = "x86_64")]
                for unit in range {
                    let first = unit * GROUPS_PER_UNIT;
                    // SAFETY: tiles exist only where `available` saw the features; each unit
                    // writes only its own groups' outputs.
                    unsafe { unit_rows(&shared, first, (groups - first).min(GROUPS_PER_UNIT)) };
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (range, &shared);
            });
            first_row += pass;
        }
        out
    }
}

/// Rows of `x` rounded to bf16 and packed in pairs (`[rows, k.div_ceil(2)]`, the odd tail
/// paired with zero), in parallel over rows when there are several.
fn input_pairs(x: &[f32], rows: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut packed = vec![0u32; rows * pairs];
    let out = OutPtr(packed.as_mut_ptr());
    let round = |range: std::ops::Range<usize>| {
        for r in range {
            // SAFETY: row `r` belongs to this call alone; `packed` outlives the pool call.
            let row = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * pairs), pairs) };
            let rounded = super::bf16_matmul::round_to_bf16(&x[r * k..(r + 1) * k]);
            for (i, pair) in row.iter_mut().enumerate() {
                let low = rounded[2 * i].to_bits();
                let high = rounded.get(2 * i + 1).map_or(0, |v| v.to_bits());
                *pair = u32::from(low) | (u32::from(high) << 16);
            }
        }
    };
    if rows > 1 {
        candle_core::utils::barrier_pool().execute_chunked(rows, round);
    } else {
        round(0..rows);
    }
    packed
}

/// What every work unit of a pass reads.
struct Shared<'a> {
    tiles: &'a Bf16Tiles,
    /// The pass's inputs, `[rows, k.div_ceil(2)]` bf16 pairs.
    pairs: &'a [u32],
    rows: usize,
    /// The pass's first output row.
    out: OutPtr,
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Every row of the pass against the tiles of groups `first .. first + count` (one or two),
/// 8, 4, 2 or 1 rows at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn unit_rows(s: &Shared, first: usize, count: usize) {
    // SAFETY: the caller checked the features; the row tiles stay below `s.rows`.
    unsafe {
        let mut row = 0;
        while row < s.rows {
            let left = s.rows - row;
            let tile = if left >= 8 {
                8
            } else if left >= 4 {
                4
            } else if left >= 2 {
                2
            } else {
                1
            };
            match (count, tile) {
                (2, 8) => rows_tile::<2, 8>(s, first, row),
                (2, 4) => rows_tile::<2, 4>(s, first, row),
                (2, 2) => rows_tile::<2, 2>(s, first, row),
                (2, _) => rows_tile::<2, 1>(s, first, row),
                (_, 8) => rows_tile::<1, 8>(s, first, row),
                (_, 4) => rows_tile::<1, 4>(s, first, row),
                (_, 2) => rows_tile::<1, 2>(s, first, row),
                _ => rows_tile::<1, 1>(s, first, row),
            }
            row += tile;
        }
    }
}

/// Rows `row .. row + R` against the tiles of groups `first .. first + G`, into their outputs.
/// Each (row, feature) sum runs over the input pairs in order in its own lane, so it does not
/// depend on `G` or `R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(
    clippy::needless_range_loop,
    reason = "indexed loops over const-sized register arrays unroll into registers"
)]
unsafe fn rows_tile<const G: usize, const R: usize>(s: &Shared, first: usize, row: usize) {
    // SAFETY: rows `row .. row + R` exist in the pass, each with `pairs` packed inputs; the
    // groups' `pairs` lines each are inside `lines`; the outputs written are these groups'
    // features of those rows.
    unsafe {
        let (n, k) = s.tiles.shape();
        let pairs = k.div_ceil(2);
        let lines = s.tiles.lines.as_ptr().add(first * pairs);
        let inputs = s.pairs.as_ptr().add(row * pairs);
        let mut acc = [[_mm512_setzero_ps(); R]; G];
        for i in 0..pairs {
            let weights: [__m512bh; G] = std::array::from_fn(|g| {
                std::mem::transmute(_mm512_load_si512(lines.add(g * pairs + i).cast()))
            });
            for r in 0..R {
                let pair = *inputs.add(r * pairs + i);
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                for g in 0..G {
                    acc[g][r] = _mm512_dpbf16_ps(acc[g][r], x, weights[g]);
                }
            }
        }
        for (g, sums) in acc.iter().enumerate() {
            let features = (first + g) * FEATURES;
            let count = (n - features).min(FEATURES);
            let mask: __mmask16 = if count == FEATURES {
                !0
            } else {
                (1u16 << count) - 1
            };
            for (r, sum) in sums.iter().enumerate() {
                _mm512_mask_storeu_ps(s.out.get().add((row + r) * n + features), mask, *sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize, k: usize) -> Vec<bf16> {
        (0..n * k)
            .map(|i| bf16::from_f32(((i * 31 % 97) as f32 - 48.0) / 50.0))
            .collect()
    }

    #[test]
    fn products_of_bf16_rounded_inputs_whatever_the_batch() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16");
            return;
        }
        // An odd k (a padded pair); n past the last 16-feature tile and an odd number of
        // groups; rows through every row tile (8 + 8 + 8 + 2 + 1), and passes that split them.
        let (n, k) = (37, 201);
        let w = weights(n, k);
        let tiles = Bf16Tiles::new(&w, n, k).expect("tiles on an AVX512-BF16 CPU");
        let rows = 27;
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 17 % 89) as f32 - 44.0) / 23.0)
            .collect();
        for pass_rows in [rows, 5] {
            let all = tiles.in_passes(&x, rows, pass_rows);
            for r in 0..rows {
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
                        (f64::from(got) - want).abs() < 1e-4 * want.abs().max(1.0),
                        "pass {pass_rows} [{r}, {f}] {got} vs {want}"
                    );
                }
                let alone = tiles.matmul(&x[r * k..(r + 1) * k], 1);
                assert_eq!(alone, all[r * n..(r + 1) * n], "row {r}");
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_get_no_tiles() {
        let (n, k) = (19, 9);
        let w = weights(n, k);
        assert!(Bf16Tiles::new(&w[1..], n, k).is_none());
        assert!(Bf16Tiles::new(&w, n, 0).is_none());
    }
}
