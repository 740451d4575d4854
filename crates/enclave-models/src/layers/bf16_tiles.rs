//! bf16 weights repacked once into tiles of sixteen output features, for products of any number
//! of rows on AVX512-BF16 (and AVX2, below). A tile holds, for each pair of input positions, the
//! two bf16 weights of each of the sixteen features (64 bytes): one `vdpbf16ps` multiplies an
//! input pair, broadcast, by the pairs of all sixteen features, and the sums land in the
//! features' lanes.
//! Each weight load then feeds up to 16 rows, and no horizontal sums remain; the row-major
//! kernel (`layers/bf16_matmul.rs`) reads a weight and an input vector per 4 × 4 tile of products
//! and reduces every (row, feature) sum at the end, which bound a 16-sequence decoding step at
//! about 200 GFLOP/s (BENCHMARKS.md, "Serving engine under concurrent load").
//!
//! On AVX512-BF16 inputs are rounded to bf16 as in `layers/bf16_matmul.rs` (to nearest, ties to
//! even); with either kernel every (row, feature) sum runs over the input pairs in order in one
//! f32 lane, whatever the batch.
//!
//! CPUs without AVX512-BF16 but with AVX2 and FMA (AMD Zen 2 and 3, Intel before Cooper Lake)
//! read the same tiles eight features at a time: a shift and a mask widen a half line into the
//! f32 weights of the pair's first and second input, which multiply the f32 inputs (not
//! rounded) with two chained FMAs per pair into one accumulator per (row, feature). Without the
//! tiles those CPUs multiplied one row at a time from the dense weights while decoding and
//! widened every weight to f32 for each prompt (candle's GEMM).

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
/// Input rows' bf16 bytes a pass keeps for the tiles to share from cache (the AVX2 kernel reads
/// the rows as f32, twice that, from the caller's buffer).
const PASS_BYTES: usize = 4 << 20;
/// Rows of an AVX2 pass: their f32 inputs for one block (128 KB) stay in a Zen 3 core's 512 KB
/// L2 while the block's weights go through every row tile. (Passes of `PASS_BYTES` held 1,365
/// rows of a 1536-wide input, 1.4 MB per block: a 2048-row `[1536 -> 8960]` product ran at 103
/// GFLOP/s instead of 129, `examples/small_batch_matmul.rs`.)
const AVX2_PASS_ROWS: usize = 128;
/// Input pairs a unit takes at a time through all of a pass's rows: two groups' lines for 128
/// pairs are 16 KB, so every row tile after the first reads them from L1. (Taking each row tile
/// through the whole of `k` instead re-read a 16-row step's weights from L2 or memory per row
/// tile, 96 KB to 573 KB per unit for this model family.) The sums carry over in the outputs.
const BLOCK_PAIRS: usize = 128;

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
    kernel: Kernel,
}

/// How the tiles are multiplied on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// `vdpbf16ps` on inputs rounded to bf16 (AVX512-BF16).
    Bf16Dot,
    /// Weights widened in registers, f32 FMAs on f32 inputs (AVX2 and FMA).
    Avx2Fma,
}

/// The fastest kernel this CPU runs, if any (checked once).
fn best_kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            if super::bf16_matmul::available() {
                Some(Kernel::Bf16Dot)
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Some(Kernel::Avx2Fma)
            } else {
                None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Whether `kernel` runs on this CPU.
#[cfg(test)]
fn runs(kernel: Kernel) -> bool {
    match kernel {
        Kernel::Bf16Dot => best_kernel() == Some(Kernel::Bf16Dot),
        Kernel::Avx2Fma => best_kernel().is_some(),
    }
}

impl std::fmt::Debug for Bf16Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16Tiles")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Whether this CPU runs the tiles (AVX512-BF16, or AVX2 and FMA).
pub fn available() -> bool {
    best_kernel().is_some()
}

impl Bf16Tiles {
    /// Repacks `w [n, k]`; `None` when the CPU has neither AVX512-BF16 nor AVX2 and FMA, or `w`
    /// is not `n · k` values.
    pub fn new(w: &[bf16], n: usize, k: usize) -> Option<Self> {
        Self::with_kernel(w, n, k, best_kernel()?)
    }

    fn with_kernel(w: &[bf16], n: usize, k: usize, kernel: Kernel) -> Option<Self> {
        if k == 0 || w.len() != n * k {
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
        Some(Self {
            n,
            k,
            lines,
            kernel,
        })
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
        let pass_rows = match self.kernel {
            Kernel::Bf16Dot => (PASS_BYTES / (2 * self.k).max(1)).max(ROW_TILE),
            Kernel::Avx2Fma => AVX2_PASS_ROWS,
        };
        self.in_passes(x, rows, pass_rows, BLOCK_PAIRS)
    }

    fn in_passes(&self, x: &[f32], rows: usize, pass_rows: usize, block_pairs: usize) -> Vec<f32> {
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
        let pairs = k.div_ceil(2);
        let mut first_row = 0;
        while first_row < rows {
            let pass = (rows - first_row).min(pass_rows);
            let x_pass = &x[first_row * k..(first_row + pass) * k];
            let (packed, widened) = match self.kernel {
                Kernel::Bf16Dot => (input_pairs(x_pass, pass, k), Vec::new()),
                // An odd `k` gets a zero after each row, so the padded pair adds 0 · 0 (the
                // next row's first input could be infinite).
                Kernel::Avx2Fma if k % 2 == 1 => {
                    let mut padded = vec![0f32; pass * 2 * pairs];
                    for (to, from) in padded.chunks_exact_mut(2 * pairs).zip(x_pass.chunks(k)) {
                        to[..k].copy_from_slice(from);
                    }
                    (Vec::new(), padded)
                }
                Kernel::Avx2Fma => (Vec::new(), Vec::new()),
            };
            let shared = Shared {
                tiles: self,
                pairs: &packed,
                inputs: if widened.is_empty() { x_pass } else { &widened },
                rows: pass,
                block_pairs,
                out: OutPtr(out[first_row * n..].as_mut_ptr()),
            };
            let groups = n.div_ceil(FEATURES);
            let units = groups.div_ceil(GROUPS_PER_UNIT);
            let kernel = self.kernel;
            candle_core::utils::barrier_pool().execute_chunked(units, |range| {
                #[cfg(target_arch = "x86_64")]
                for unit in range {
                    let first = unit * GROUPS_PER_UNIT;
                    let count = (groups - first).min(GROUPS_PER_UNIT);
                    // SAFETY: tiles exist only where `best_kernel` saw the kernel's features
                    // (tests make them only for kernels that run); each unit writes only its own
                    // groups' outputs.
                    unsafe {
                        match kernel {
                            Kernel::Bf16Dot => unit_rows(&shared, first, count),
                            Kernel::Avx2Fma => avx2::unit_rows(&shared, first, count),
                        }
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (range, &shared, kernel);
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

impl Shared<'_> {
    /// Input pairs per block for a kernel whose register tiles take `row_tile` rows: all of
    /// them when one tile takes every row (blocks only serve the tiles after the first, and
    /// cost a single row the hardware prefetcher's run across them).
    fn block_pairs(&self, row_tile: usize) -> usize {
        if self.rows <= row_tile {
            self.tiles.k.div_ceil(2)
        } else {
            self.block_pairs
        }
    }
}

/// What every work unit of a pass reads.
struct Shared<'a> {
    tiles: &'a Bf16Tiles,
    /// The pass's inputs, `[rows, k.div_ceil(2)]` bf16 pairs (`Kernel::Bf16Dot`).
    pairs: &'a [u32],
    /// The pass's inputs, `[rows, 2 · k.div_ceil(2)]` f32 (`Kernel::Avx2Fma`).
    inputs: &'a [f32],
    rows: usize,
    /// Input pairs per block (`BLOCK_PAIRS` but in tests).
    block_pairs: usize,
    /// The pass's first output row.
    out: OutPtr,
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Every row of the pass against the tiles of groups `first .. first + count` (one or two),
/// a block of input pairs at a time (`Shared::block_pairs`), 8, 4, 2 or 1 rows at a time within
/// a block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn unit_rows(s: &Shared, first: usize, count: usize) {
    // SAFETY: the caller checked the features; the row tiles stay below `s.rows` and the blocks
    // below the tiles' pairs.
    unsafe {
        let pairs = s.tiles.k.div_ceil(2);
        let block_pairs = s.block_pairs(ROW_TILE);
        let mut start = 0;
        while start < pairs {
            let block = start..(start + block_pairs).min(pairs);
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
                let b = block.clone();
                match (count, tile) {
                    (2, 8) => rows_tile::<2, 8>(s, first, row, b),
                    (2, 4) => rows_tile::<2, 4>(s, first, row, b),
                    (2, 2) => rows_tile::<2, 2>(s, first, row, b),
                    (2, _) => rows_tile::<2, 1>(s, first, row, b),
                    (_, 8) => rows_tile::<1, 8>(s, first, row, b),
                    (_, 4) => rows_tile::<1, 4>(s, first, row, b),
                    (_, 2) => rows_tile::<1, 2>(s, first, row, b),
                    _ => rows_tile::<1, 1>(s, first, row, b),
                }
                row += tile;
            }
            start = block.end;
        }
    }
}

/// Rows `row .. row + R` against input pairs `block` of the tiles of groups `first .. first +
/// G`: the sums start from zero at the first pair and from the outputs (the sums so far) after
/// it, and go back to the outputs. Each (row, feature) sum runs over the input pairs in order in
/// its own lane, so it does not depend on `G`, `R` or the blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(
    clippy::needless_range_loop,
    reason = "indexed loops over const-sized register arrays unroll into registers"
)]
unsafe fn rows_tile<const G: usize, const R: usize>(
    s: &Shared,
    first: usize,
    row: usize,
    block: std::ops::Range<usize>,
) {
    // SAFETY: rows `row .. row + R` exist in the pass, each with `pairs` packed inputs; the
    // groups' `pairs` lines each are inside `lines` and `block` inside `0..pairs`; the outputs
    // read and written are these groups' features of those rows.
    unsafe {
        let (n, k) = s.tiles.shape();
        let pairs = k.div_ceil(2);
        let lines = s.tiles.lines.as_ptr().add(first * pairs);
        let inputs = s.pairs.as_ptr().add(row * pairs);
        let masks: [__mmask16; G] = std::array::from_fn(|g| {
            let count = (n - (first + g) * FEATURES).min(FEATURES);
            if count == FEATURES {
                !0
            } else {
                (1u16 << count) - 1
            }
        });
        let out = |g: usize, r: usize| s.out.get().add((row + r) * n + (first + g) * FEATURES);
        let mut acc = [[_mm512_setzero_ps(); R]; G];
        if block.start > 0 {
            for g in 0..G {
                for r in 0..R {
                    acc[g][r] = _mm512_maskz_loadu_ps(masks[g], out(g, r));
                }
            }
        }
        for i in block {
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
        for g in 0..G {
            for r in 0..R {
                _mm512_mask_storeu_ps(out(g, r), masks[g], acc[g][r]);
            }
        }
    }
}

/// The tiles on AVX2 and FMA (`Kernel::Avx2Fma`).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Shared, FEATURES};

    /// Features per 256-bit vector: half a line.
    const HALF: usize = FEATURES / 2;
    /// Most rows a register tile takes: 2 halves × 5 rows of accumulators, four widened half
    /// lines and two broadcasts fill the 16 registers (the high-half mask is a memory operand).
    /// Each accumulator takes two dependent FMAs per pair (8 cycles on Zen 3), so ten of them
    /// keep both FMA pipes busy with room to spare (eight ran 10 % slower at 512 rows:
    /// `examples/small_batch_matmul.rs`).
    const ROW_TILE: usize = 5;

    /// Every row of the pass against the tiles of groups `first .. first + count`, a block of
    /// input pairs at a time, up to `ROW_TILE` rows at a time within a block.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; the groups must be inside the tiles.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn unit_rows(s: &Shared, first: usize, count: usize) {
        // SAFETY: the caller checked the features; the row tiles stay below `s.rows`, the
        // groups and blocks inside the tiles.
        unsafe {
            let pairs = s.tiles.k.div_ceil(2);
            let block_pairs = s.block_pairs(ROW_TILE);
            let mut start = 0;
            while start < pairs {
                let block = start..(start + block_pairs).min(pairs);
                for group in first..first + count {
                    let mut row = 0;
                    while row < s.rows {
                        // The rows left in tiles as even as the widest tile allows (16 rows
                        // as 4 × 4, not 5 + 5 + 5 + 1: a one-row tile runs at a fraction).
                        let left = s.rows - row;
                        let tile = left.div_ceil(left.div_ceil(ROW_TILE));
                        let b = block.clone();
                        match tile {
                            5 => rows_tile::<5>(s, group, row, b),
                            4 => rows_tile::<4>(s, group, row, b),
                            3 => rows_tile::<3>(s, group, row, b),
                            2 => rows_tile::<2>(s, group, row, b),
                            _ => rows_tile::<1>(s, group, row, b),
                        }
                        row += tile;
                    }
                }
                start = block.end;
            }
        }
    }

    /// Rows `row .. row + R` against input pairs `block` of group `group`'s tiles: the sums
    /// start from zero at the first pair and from the outputs after it, and go back to the
    /// outputs. Each (row, feature) sum takes a pair's first product, then its second, in its own
    /// lane, pair after pair in order, so it does not depend on `R`, the blocks or the other
    /// rows.
    #[target_feature(enable = "avx2,fma")]
    #[allow(
        clippy::needless_range_loop,
        reason = "indexed loops over const-sized register arrays unroll into registers"
    )]
    unsafe fn rows_tile<const R: usize>(
        s: &Shared,
        group: usize,
        row: usize,
        block: std::ops::Range<usize>,
    ) {
        // SAFETY: rows `row .. row + R` exist in the pass, each `2 · pairs` f32 inputs long;
        // the group's `pairs` lines are inside `lines` and `block` inside `0..pairs` (the lines
        // fetched ahead too: `i + ahead < pairs` below `fetched`); the outputs read and written
        // are this group's features (masked to `n`, or all of them when `whole`) of these rows.
        unsafe {
            let (n, k) = s.tiles.shape();
            let pairs = k.div_ceil(2);
            let stride = 2 * pairs;
            let lines = s.tiles.lines.as_ptr().add(group * pairs).cast::<u32>();
            let inputs = s.inputs.as_ptr().add(row * stride);
            let high_half = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
            // Lanes of each half inside `n` (none for a half past it).
            let masks: [__m256i; 2] = std::array::from_fn(|h| {
                let features = (group * FEATURES + h * HALF) as i32;
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32 - features), lane)
            });
            // Wrapping: a half past `n` may point past the outputs (it is masked off whole).
            let out = |h: usize, r: usize| {
                s.out
                    .get()
                    .wrapping_add((row + r) * n + group * FEATURES + h * HALF)
            };
            // Plain loads and stores where the group lies inside `n`: `vmaskmovps` stores are
            // slow on AMD (plain ones gave ~6 % more GFLOP/s on average on a noisy Zen 3,
            // BENCHMARKS.md).
            let whole = group * FEATURES + FEATURES <= n;
            let mut acc = [[_mm256_setzero_ps(); R]; 2];
            if block.start > 0 {
                for h in 0..2 {
                    for r in 0..R {
                        acc[h][r] = if whole {
                            _mm256_loadu_ps(out(h, r))
                        } else {
                            _mm256_maskload_ps(out(h, r), masks[h])
                        };
                    }
                }
            }
            let step = |i: usize, acc: &mut [[__m256; R]; 2]| {
                let mut firsts = [_mm256_setzero_ps(); 2];
                let mut seconds = [_mm256_setzero_ps(); 2];
                for h in 0..2 {
                    let w = _mm256_load_si256(lines.add(i * FEATURES + h * HALF).cast());
                    firsts[h] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
                    seconds[h] = _mm256_castsi256_ps(_mm256_and_si256(w, high_half));
                }
                for r in 0..R {
                    let x0 = _mm256_broadcast_ss(&*inputs.add(r * stride + 2 * i));
                    let x1 = _mm256_broadcast_ss(&*inputs.add(r * stride + 2 * i + 1));
                    for h in 0..2 {
                        acc[h][r] = _mm256_fmadd_ps(firsts[h], x0, acc[h][r]);
                        acc[h][r] = _mm256_fmadd_ps(seconds[h], x1, acc[h][r]);
                    }
                }
            };
            // Each pair's line of the next block is fetched ahead, so that the next block's
            // first row tile, the one that brings its lines from memory, does not wait on
            // memory while the other tiles of this block compute (16 rows: 4 tiles, the first
            // of them memory-bound without it).
            let ahead = block.len();
            let fetched = pairs.saturating_sub(ahead).clamp(block.start, block.end);
            for i in block.start..fetched {
                _mm_prefetch::<_MM_HINT_T0>(lines.add((i + ahead) * FEATURES).cast());
                step(i, &mut acc);
            }
            for i in fetched..block.end {
                step(i, &mut acc);
            }
            for h in 0..2 {
                for r in 0..R {
                    if whole {
                        _mm256_storeu_ps(out(h, r), acc[h][r]);
                    } else {
                        _mm256_maskstore_ps(out(h, r), masks[h], acc[h][r]);
                    }
                }
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
    fn products_of_the_tiles_whatever_the_batch() {
        for kernel in [Kernel::Bf16Dot, Kernel::Avx2Fma] {
            if !runs(kernel) {
                eprintln!("SKIPPED: this CPU does not run {kernel:?}");
                continue;
            }
            // An odd k (a padded pair) and an even one; n past the last 16-feature tile (and
            // past its first half) and an odd number of groups; rows through every row tile
            // of both kernels, and passes and blocks that split them (one tile's rows take
            // one block).
            for (n, k) in [(37, 201), (26, 64)] {
                let w = weights(n, k);
                let tiles = Bf16Tiles::with_kernel(&w, n, k, kernel).expect("tiles");
                let rows = 27;
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 17 % 89) as f32 - 44.0) / 23.0)
                    .collect();
                // The bf16 kernel multiplies inputs rounded to bf16, the AVX2 one the inputs.
                let input = |v: f32| match kernel {
                    Kernel::Bf16Dot => f64::from(bf16::from_f32(v).to_f32()),
                    Kernel::Avx2Fma => f64::from(v),
                };
                // Passes of 11 rows end in 3-row tiles (11 = 4 + 4 + 3); blocks of 7 pairs split
                // both k, with a partial last block.
                for (pass_rows, block_pairs) in
                    [(rows, BLOCK_PAIRS), (5, BLOCK_PAIRS), (rows, 7), (11, 7)]
                {
                    let all = tiles.in_passes(&x, rows, pass_rows, block_pairs);
                    for r in 0..rows {
                        for f in 0..n {
                            // Exact products of the inputs, summed in f64.
                            let want: f64 = (0..k)
                                .map(|i| input(x[r * k + i]) * f64::from(w[f * k + i].to_f32()))
                                .sum();
                            let got = all[r * n + f];
                            assert!(
                                (f64::from(got) - want).abs() < 1e-4 * want.abs().max(1.0),
                                "{kernel:?} [{n}, {k}], pass {pass_rows}, block {block_pairs}: \
                                 [{r}, {f}] {got} vs {want}"
                            );
                        }
                        let alone = tiles.matmul(&x[r * k..(r + 1) * k], 1);
                        assert_eq!(alone, all[r * n..(r + 1) * n], "{kernel:?} row {r}");
                    }
                }
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
