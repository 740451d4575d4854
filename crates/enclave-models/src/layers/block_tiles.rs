//! Q4_K, Q6_K and Q8_0 weights repacked at load into tiles of eight output features, for
//! products of any number of rows on AVX-512 VNNI, and on CPUs with AVX2 but not VNNI (Zen 2
//! and 3, Intel client chips, Xeons before Cascade Lake) through `group_avx2`.
//! A tile block holds one block (Q8_0: two) of each of eight weight rows: their quants
//! interleaved four bytes at a time (AVX2 Q8_0 tiles: two bytes, see `mod q8_0`), so one
//! `vpdpbusd` multiplies four activation bytes (broadcast) by four weights of each of the eight
//! features and the sums land in the features' lanes; the sub-block scales (and Q4_K's mins)
//! unpacked to a byte per sub-block and feature; `d` (and `dmin`) side by side. A Q4_K block
//! then costs about 30 instructions per feature and activation row, against about 75 in the one-row kernel
//! (`layers/kquants.rs`), which is what bound decoding on Q4_K_M files below llama.cpp's speed.
//!
//! The arithmetic is llama.cpp's (and the one-row kernels'): activations quantized to Q8_K (Q8_0
//! for Q8_0 weights), a block's sums in integers, weighted by the sub-block scales in integers,
//! then by `d·dx` once: Q4_K `d·dx·Σ_s scale_s·(q·x)_s − dmin·dx·Σ_s min_s·Σx_s`, Q6_K
//! `d·dx·Σ_g scale_g·((u − 32)·x)_g` with the 6-bit values `u` unsigned, Q8_0 `d·dx·Σ w·x` with
//! the weights stored offset by 128 (unsigned, as `vpdpbusd` wants them) and `128 Σx` taken off
//! per block; on AVX2 alone the Q8_0 tiles keep the weights signed and multiply in 16-bit
//! pairs, against activations interleaved by row tile (`q8_0_rows_avx2`). A tile block takes
//! 1,184 bytes for the 1,152 of eight Q4_K blocks, 1,696 for the 1,680 of eight Q6_K blocks, 544
//! for the 544 of sixteen Q8_0 blocks.
//!
//! On AVX2 without VNNI, Q5_0 weights (Gemma's 640-wide matrices in a Q4_K_M file) are widened at
//! load into Q8_0 tiles of the same values: 544 bytes for the 352 of sixteen Q5_0 blocks, which
//! costs 10 % at one row and gains 1.2× at four rows, 1.8× at sixteen and 2.7× against the
//! dequantised GEMM at 128, where candle has no SIMD Q5_0 product.
//!
//! Ours because candle 0.11's k-quant products decode at under half the memory bandwidth, its
//! repacked copies take more bytes per weight (a third more for Q4_K), and its Q8_0 product of a
//! few rows reads each weight once per row (`examples/kquant_matmul.rs`).

use candle_core::quantized::GgmlDType;

use super::kquants::{q4k_scales_mins, quantize_rows_q8_k, Q8KActivations, QK_K};
use super::quantized::{quantize_block_q8_0, OutPtr, Q5_0_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK8_0};

/// Output features interleaved in one tile (the lanes of a 256-bit vector).
const FEATURES: usize = 8;
/// Activation rows whose sums are kept in registers together.
const ROW_TILE: usize = 4;

/// Byte offsets within a Q4_K tile block: `d` and `dmin` (f16 per feature), the scales
/// (`[sub-block][feature]`), the mins (`[sub-block pair][feature][2]`, for `vpdpwssd` on
/// pairs), the nibbles (`[chunk][4-byte group][feature][4]`).
mod q4k {
    pub const D: usize = 0;
    pub const DMIN: usize = 16;
    pub const SCALES: usize = 32;
    pub const MINS: usize = 96;
    pub const QS: usize = 160;
    /// 32-byte lines per tile block (1,184 bytes).
    pub const LINES: usize = (QS + super::FEATURES * 128) / 32;
}

/// Byte offsets within a Q6_K tile block: `d` (f16 per feature), the signed scales
/// (`[16-value group pair][feature][2]`), the quants (`[half][4-byte group][3][feature][4]`:
/// per half block and group the two low-nibble chunks and the high bit pairs, in the order the
/// kernel reads them, which keeps the hardware prefetchers on one stream).
mod q6k {
    pub const D: usize = 0;
    pub const SCALES: usize = 32;
    pub const QUANTS: usize = 160;
    /// 32-byte lines per tile block (1,696 bytes).
    pub const LINES: usize = (QUANTS + super::FEATURES * 192) / 32;
}

/// Byte offsets within a Q8_0 tile block of two blocks: `d` (f16 per block and feature), the
/// quants: for the VNNI kernel plus 128 (`[block][4-byte group][feature][4]`), for the AVX2 one
/// signed, each four-byte group's first pairs then its second ones (`[block][4-byte
/// group][pair][feature][2]`), so that a sign extension gives `vpmaddwd` a pair per feature.
mod q8_0 {
    pub const D: usize = 0;
    pub const QS: usize = 32;
    /// 32-byte lines per tile block (544 bytes).
    pub const LINES: usize = (QS + 2 * super::FEATURES * 32) / 32;
}

/// The block formats with tiles. Q5_0 blocks are widened at load into the Q8_0 tiles (the
/// same values, 34 bytes per 32 weights for the file's 22), on AVX2 CPUs without VNNI only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileFormat {
    Q4K,
    Q6K,
    Q8_0,
    Q5_0,
}

impl TileFormat {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            _ => None,
        }
    }

    /// The GGML type of the file's blocks.
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            Self::Q4K => GgmlDType::Q4K,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q5_0 => GgmlDType::Q5_0,
        }
    }

    /// The format whose tile layout and kernels this one's blocks take.
    fn layout(self) -> Self {
        match self {
            Self::Q5_0 => Self::Q8_0,
            format => format,
        }
    }

    /// Values per tile block.
    fn values(self) -> usize {
        match self.layout() {
            Self::Q4K | Self::Q6K => QK_K,
            _ => 2 * QK8_0,
        }
    }

    /// Bytes per block of the file's layout, and values per block.
    fn file_block(self) -> (usize, usize) {
        match self {
            Self::Q4K => (super::kquants::Q4K_BLOCK_BYTES, QK_K),
            Self::Q6K => (super::kquants::Q6K_BLOCK_BYTES, QK_K),
            Self::Q8_0 => (Q8_0_BLOCK_BYTES, QK8_0),
            Self::Q5_0 => (Q5_0_BLOCK_BYTES, QK8_0),
        }
    }

    /// 32-byte lines per tile block.
    fn lines(self) -> usize {
        match self.layout() {
            Self::Q4K => q4k::LINES,
            Self::Q6K => q6k::LINES,
            _ => q8_0::LINES,
        }
    }
}

/// A 32-byte line, so every vector load of the quants is aligned.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Line([u8; 32]);

/// A block-quantized matrix `[n, k]` in tiles: `n.div_ceil(8)` groups of eight features, each
/// group's tile blocks in order (the last Q8_0 one padded with a zero block when `k / 32` is
/// odd).
pub struct BlockTiles {
    /// The layout (and kernels): Q5_0 weights are held as Q8_0.
    format: TileFormat,
    /// The file's format, which the tiles were packed from.
    source: TileFormat,
    n: usize,
    k: usize,
    /// Tile blocks per group.
    blocks: usize,
    /// Packed for the VNNI kernels (else the AVX2 ones).
    vnni: bool,
    lines: Vec<Line>,
}

impl std::fmt::Debug for BlockTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockTiles")
            .field("format", &self.source)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Whether this CPU runs the tiles of every format (AVX-512 VNNI).
pub fn available() -> bool {
    super::q8_tiles::available()
}

/// Whether this CPU runs `format`'s tiles: Q4_K, Q6_K and Q8_0 on AVX-512 VNNI or AVX2
/// (`group_avx2`), Q5_0 on AVX2 without VNNI: with VNNI its products of many rows take the
/// tiles built per work unit from the file's blocks (`layers/q8_tiles.rs`).
pub fn available_for(format: TileFormat) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = super::quantized::avx2();
        match format {
            TileFormat::Q4K | TileFormat::Q6K | TileFormat::Q8_0 => avx2 || available(),
            TileFormat::Q5_0 => avx2 && !available(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = format;
        false
    }
}

impl BlockTiles {
    /// Repacks `w`, the file's `n` rows of `format` blocks; `None` when the CPU does not run
    /// them (see [`available_for`]) or the shape does not fit (`k` not a positive multiple of the
    /// block size, `w` not `n` rows).
    pub fn new(format: TileFormat, w: &[u8], n: usize, k: usize) -> Option<Self> {
        if !available_for(format) {
            return None;
        }
        Self::packed(format, w, n, k, available())
    }

    /// [`BlockTiles::new`] for the VNNI kernels or the AVX2 ones, which the caller checked the
    /// CPU runs.
    fn packed(format: TileFormat, w: &[u8], n: usize, k: usize, vnni: bool) -> Option<Self> {
        let (block_bytes, block_values) = format.file_block();
        if k == 0
            || !k.is_multiple_of(block_values)
            || w.len() != n * (k / block_values) * block_bytes
        {
            return None;
        }
        let layout = format.layout();
        let blocks = k.div_ceil(layout.values());
        let groups = n.div_ceil(FEATURES);
        let group_lines = blocks * layout.lines();
        let mut lines = vec![Line([0; 32]); groups * group_lines];
        let out = OutPtr(lines.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(groups, |range| {
            for group in range {
                // SAFETY: each group's tile blocks belong to this call alone, inside `lines`,
                // which outlives the pool call.
                let tiles = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.get().add(group * group_lines).cast::<u8>(),
                        group_lines * 32,
                    )
                };
                pack_group(format, w, n, k, group, vnni, tiles);
            }
        });
        Some(Self {
            format: layout,
            source: format,
            n,
            k,
            blocks,
            vnni,
            lines,
        })
    }

    /// The GGML type the tiles were packed from.
    pub fn ggml_dtype(&self) -> GgmlDType {
        self.source.ggml_dtype()
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
        let pass_rows = (PASS_VALUES / self.k.max(1)).max(4 * ROW_TILE);
        self.in_passes(x, rows, pass_rows)
    }

    /// [`BlockTiles::matmul`] in passes of `pass_rows`.
    fn in_passes(&self, x: &[f32], rows: usize, pass_rows: usize) -> Vec<f32> {
        let (n, k, vnni) = (self.n, self.k, self.vnni);
        assert!(
            x.len() >= rows * k,
            "{:?} tiles: [{rows}, {k}] input of {}",
            self.source,
            x.len()
        );
        let mut out = vec![0f32; rows * n];
        if rows == 0 || n == 0 || k == 0 {
            return out;
        }
        let mut first_row = 0;
        while first_row < rows {
            let pass = (rows - first_row).min(pass_rows);
            let x = &x[first_row * k..(first_row + pass) * k];
            let (q8k, q8_0);
            let inputs = match self.format {
                TileFormat::Q4K | TileFormat::Q6K => {
                    q8k = quantize_rows_q8_k(x, pass, k);
                    Inputs::K(&q8k)
                }
                TileFormat::Q8_0 | TileFormat::Q5_0 => {
                    q8_0 = Q8_0Inputs::new(x, pass, k, self.blocks, vnni);
                    Inputs::Q8_0(&q8_0)
                }
            };
            let shared = Shared {
                tiles: self,
                x: inputs,
                rows: pass,
                out: OutPtr(out[first_row * n..].as_mut_ptr()),
            };
            candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(FEATURES), |groups| {
                #[cfg(target_arch = "x86_64")]
                for group in groups {
                    // SAFETY: the tiles exist only where `available_for` saw AVX2, packed for
                    // VNNI only where `available` saw it (or a test on such a CPU asked); each
                    // group writes only its own features' outputs.
                    unsafe {
                        if vnni {
                            group_vnni(&shared, group)
                        } else {
                            group_avx2(&shared, group)
                        }
                    };
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (groups, &shared);
            });
            first_row += pass;
        }
        out
    }
}

/// Activation values a pass keeps for the tiles to share from cache (a byte each, two for the
/// AVX2 Q8_0 kernel).
const PASS_VALUES: usize = 4 << 20;

/// Activations for Q8_0 tiles: quantized to Q8_0 as llama.cpp does, rows padded with zeros to
/// whole tile blocks; `scales[r * blocks + b]`; for the VNNI kernel `quants[r * k_padded + i]`
/// and per block `-128 Σq` (`offsets`, the weights' offset's share of the sums), for the AVX2 one
/// the quants as 16-bit integers, the rows of each row tile interleaved four values at a time
/// (`wide[tile][block][4-value group][row][4]`, zero rows past the last), so a row tile's kernel
/// reads one stream of activations instead of four.
struct Q8_0Inputs {
    scales: Vec<f32>,
    quants: Vec<i8>,
    offsets: Vec<i32>,
    wide: Vec<i16>,
}

thread_local! {
    /// `Q8_0Inputs::wide` kept from one product to the next: a fresh 4.6 MB buffer per
    /// 256-row pass of an 8,960-wide input spent 5 % of a sixteen-request q8_0 run clearing new
    /// pages in the kernel. A thread keeps its largest so far (up to ~8 MB: `PASS_VALUES`
    /// values of two bytes); only the threads that run AVX2 Q8_0 products hold one.
    static WIDE_SCRATCH: std::cell::Cell<Vec<i16>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Drop for Q8_0Inputs {
    fn drop(&mut self) {
        // Past the thread's teardown the buffer is simply freed.
        let _ = WIDE_SCRATCH.try_with(|scratch| scratch.set(std::mem::take(&mut self.wide)));
    }
}

impl Q8_0Inputs {
    /// `x [rows, k]` for `tile_blocks` tile blocks per row, quantized in parallel over rows, for
    /// the VNNI kernel (`quants`, `offsets`) or the AVX2 one (`wide`).
    fn new(x: &[f32], rows: usize, k: usize, tile_blocks: usize, vnni: bool) -> Self {
        let blocks = 2 * tile_blocks;
        let padded = blocks * QK8_0;
        let (vnni_rows, wide_rows) = if vnni {
            (rows, 0)
        } else {
            (0, rows.next_multiple_of(ROW_TILE))
        };
        let mut scales = vec![0f32; rows * blocks];
        let mut quants = vec![0i8; vnni_rows * padded];
        let mut offsets = vec![0i32; vnni_rows * blocks];
        let mut wide = WIDE_SCRATCH
            .try_with(std::cell::Cell::take)
            .unwrap_or_default();
        wide.clear();
        wide.resize(wide_rows * padded, 0);
        let (scales_out, quants_out, offsets_out, wide_out) = (
            OutPtr(scales.as_mut_ptr()),
            OutPtr(quants.as_mut_ptr()),
            OutPtr(offsets.as_mut_ptr()),
            OutPtr(wide.as_mut_ptr()),
        );
        let quantize = |range: std::ops::Range<usize>| {
            let mut block = [0i8; QK8_0];
            for r in range {
                for b in 0..k / QK8_0 {
                    let scale = quantize_block_q8_0(&x[r * k + b * QK8_0..][..QK8_0], &mut block);
                    // SAFETY: row `r`'s entries of each buffer belong to this call alone, the
                    // buffers have the rows the layout needs and outlive the pool call.
                    unsafe {
                        *scales_out.get().add(r * blocks + b) = scale;
                        if vnni {
                            std::ptr::copy_nonoverlapping(
                                block.as_ptr(),
                                quants_out.get().add(r * padded + b * QK8_0),
                                QK8_0,
                            );
                            *offsets_out.get().add(r * blocks + b) =
                                -128 * block.iter().map(|&v| i32::from(v)).sum::<i32>();
                        } else {
                            let to = wide_out.get().add(
                                (r / ROW_TILE * blocks + b) * ROW_TILE * QK8_0 + r % ROW_TILE * 4,
                            );
                            for (i, &v) in block.iter().enumerate() {
                                *to.add(i / 4 * 4 * ROW_TILE + i % 4) = i16::from(v);
                            }
                        }
                    }
                }
            }
        };
        if rows > 1 {
            candle_core::utils::barrier_pool().execute_chunked(rows, quantize);
        } else {
            quantize(0..rows);
        }
        Self {
            scales,
            quants,
            offsets,
            wide,
        }
    }
}

/// Writes the tile blocks of features `8 group .. 8 group + 8` (zeros past `n`), for the VNNI
/// kernels or the AVX2 ones.
fn pack_group(
    format: TileFormat,
    w: &[u8],
    n: usize,
    k: usize,
    group: usize,
    vnni: bool,
    tiles: &mut [u8],
) {
    let (block_bytes, block_values) = format.file_block();
    let row_bytes = k / block_values * block_bytes;
    let tile_bytes = format.lines() * 32;
    for (t, tile) in tiles.chunks_exact_mut(tile_bytes).enumerate() {
        for j in 0..FEATURES.min(n - group * FEATURES) {
            let row = &w[(group * FEATURES + j) * row_bytes..][..row_bytes];
            match format {
                TileFormat::Q4K => pack_q4k(&row[t * block_bytes..][..block_bytes], j, tile),
                TileFormat::Q6K => pack_q6k(&row[t * block_bytes..][..block_bytes], j, tile),
                TileFormat::Q8_0 | TileFormat::Q5_0 => {
                    // Blocks 2t and 2t + 1; the second is absent (zero) past an odd count.
                    for half in 0..2 {
                        let Some(block) = row
                            .get((2 * t + half) * block_bytes..)
                            .and_then(|rest| rest.get(..block_bytes))
                        else {
                            continue;
                        };
                        if format == TileFormat::Q5_0 {
                            pack_q8_0(&q5_0_as_q8_0(block), half, j, vnni, tile);
                        } else {
                            pack_q8_0(block, half, j, vnni, tile);
                        }
                    }
                }
            }
        }
    }
}

/// Feature `j`'s Q8_0 block (f16 `d`, 32 signed quants) as block `half` of its tile block, for
/// the VNNI kernel or the AVX2 one.
fn pack_q8_0(block: &[u8], half: usize, j: usize, vnni: bool, tile: &mut [u8]) {
    use q8_0::*;
    tile[D + 16 * half + 2 * j..][..2].copy_from_slice(&block[0..2]);
    for i in 0..8 {
        let group = &block[2 + 4 * i..2 + 4 * i + 4];
        let line = QS + (8 * half + i) * 32;
        if vnni {
            for (t, &q) in tile[line + 4 * j..][..4].iter_mut().zip(group) {
                *t = q ^ 0x80;
            }
        } else {
            tile[line + 2 * j..][..2].copy_from_slice(&group[..2]);
            tile[line + 16 + 2 * j..][..2].copy_from_slice(&group[2..]);
        }
    }
}

/// A Q5_0 block (f16 `d`, the 32 fifth bits, 16 bytes of nibbles) as the Q8_0 block of the
/// same values: value `j < 16` is byte `j`'s low nibble, value `j + 16` its high one, each
/// topped up by its fifth bit as bit 4, minus 16.
fn q5_0_as_q8_0(block: &[u8]) -> [u8; Q8_0_BLOCK_BYTES] {
    let mut q8_0 = [0u8; Q8_0_BLOCK_BYTES];
    q8_0[..2].copy_from_slice(&block[..2]);
    let fifth = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let value = |nibble: u8, bit: usize| {
        let fifth_bit = ((fifth >> bit) & 1) as u8;
        (nibble | (fifth_bit << 4)) as i8 - 16
    };
    for (j, &byte) in block[6..22].iter().enumerate() {
        q8_0[2 + j] = value(byte & 0x0F, j) as u8;
        q8_0[18 + j] = value(byte >> 4, j + 16) as u8;
    }
    q8_0
}

/// Feature `j`'s Q4_K block into its tile block.
fn pack_q4k(block: &[u8], j: usize, tile: &mut [u8]) {
    use q4k::*;
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

/// Feature `j`'s Q6_K block (`ql[128]`, `qh[64]`, `scales[16]`, `d`) into its tile block.
fn pack_q6k(block: &[u8], j: usize, tile: &mut [u8]) {
    use q6k::*;
    tile[D + 2 * j..D + 2 * j + 2].copy_from_slice(&block[208..210]);
    for g in 0..16 {
        tile[SCALES + 16 * (g / 2) + 2 * j + g % 2] = block[192 + g];
    }
    for h in 0..2 {
        for i in 0..8 {
            // Low nibbles of chunks 2h and 2h + 1, then the high bit pairs of half h.
            for (v, from) in [64 * h, 64 * h + 32, 128 + 32 * h].into_iter().enumerate() {
                let to = QUANTS + ((8 * h + i) * 3 + v) * 32 + 4 * j;
                tile[to..to + 4].copy_from_slice(&block[from + 4 * i..from + 4 * i + 4]);
            }
        }
    }
}

/// A pass's quantized activations.
#[derive(Clone, Copy)]
enum Inputs<'a> {
    K(&'a Q8KActivations),
    Q8_0(&'a Q8_0Inputs),
}

/// What every work unit of a pass reads.
struct Shared<'a> {
    tiles: &'a BlockTiles,
    x: Inputs<'a>,
    /// Rows in this pass.
    rows: usize,
    /// The pass's first output row.
    out: OutPtr,
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Every activation row of the pass against the tiles of group `group`, with the kernels
/// `$q4k`, `$q8_0` and `$q6k`.
macro_rules! group_rows {
    ($name:ident, $features:literal, $q4k:ident, $q8_0:ident, $q6k:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(s: &Shared, group: usize) {
            // SAFETY: the caller checked the features; rows are below `s.rows`.
            unsafe {
                let mut row = 0;
                while row < s.rows {
                    let tile_rows = (s.rows - row).min(ROW_TILE);
                    let acc = match (s.tiles.format, s.x) {
                        (TileFormat::Q4K, Inputs::K(x)) => match tile_rows {
                            1 => widen($q4k::<1>(s, x, group, row)),
                            2 => widen($q4k::<2>(s, x, group, row)),
                            3 => widen($q4k::<3>(s, x, group, row)),
                            _ => $q4k::<4>(s, x, group, row),
                        },
                        (TileFormat::Q6K, Inputs::K(x)) => match tile_rows {
                            1 => widen($q6k::<1>(s, x, group, row)),
                            2 => widen($q6k::<2>(s, x, group, row)),
                            3 => widen($q6k::<3>(s, x, group, row)),
                            _ => $q6k::<4>(s, x, group, row),
                        },
                        (TileFormat::Q8_0, Inputs::Q8_0(x)) => match tile_rows {
                            1 => widen($q8_0::<1>(s, x, group, row)),
                            2 => widen($q8_0::<2>(s, x, group, row)),
                            3 => widen($q8_0::<3>(s, x, group, row)),
                            _ => $q8_0::<4>(s, x, group, row),
                        },
                        _ => unreachable!("tiles only of the kernels' formats, inputs for them"),
                    };
                    store(s, group, row, &acc[..tile_rows]);
                    row += tile_rows;
                }
            }
        }
    };
}

group_rows!(
    group_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    q4k_rows_vnni,
    q8_0_rows_vnni,
    q6k_rows_vnni
);
group_rows!(
    group_avx2,
    "avx2,fma,f16c",
    q4k_rows_avx2,
    q8_0_rows_avx2,
    q6k_rows_avx2
);

/// `R` rows of sums padded to a full row tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn widen<const R: usize>(acc: [__m256; R]) -> [__m256; ROW_TILE] {
    // SAFETY: all-zero bits are a valid `__m256`.
    std::array::from_fn(|r| {
        if r < R {
            acc[r]
        } else {
            unsafe { std::mem::zeroed() }
        }
    })
}

/// Writes the sums of activation rows `row ..` for group `group`'s features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn store(s: &Shared, group: usize, row: usize, acc: &[__m256]) {
    // SAFETY: the caller's rows exist in this pass and the group's features below `n` are
    // this unit's alone.
    unsafe {
        let n = s.tiles.n;
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

/// Q4_K: activation rows `row .. row + R` against the tiles of group `group`. Per 64-value chunk the
/// low nibbles hold sub-block `2c` and the high ones `2c + 1`; each sub-block's sums
/// (`vpdpbusd`, unsigned nibbles by signed activations, at most 32·15·128) are weighted by its
/// scales (`vpmulld`), the mins by the activations' 32-value sums in 16-bit pairs (`vpdpwssd`).
/// `$dot` adds a four-byte group's products to a sub-block's running sums and `$sums` turns
/// those into 32-bit sums per feature: `vpdpbusd` and nothing on VNNI; on AVX2 `vpmaddubsw` into
/// 16-bit sums and one `vpmaddwd` by ones per sub-block. `$dpwssd` is that instruction or its
/// AVX2 sequence.
macro_rules! q4k_rows_kernel {
    ($name:ident, $features:literal, $dot:path, $sums:path, $dpwssd:path) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(
            s: &Shared,
            x: &Q8KActivations,
            group: usize,
            row: usize,
        ) -> [__m256; R] {
            // SAFETY: rows `row .. row + R` exist (the caller's loop), each with `k` quants,
            // `blocks` scales and `8 blocks` sums; the group's tile blocks are inside `lines`; the
            // outputs written are this group's features of those rows.
            unsafe {
                use q4k::*;
                let k = s.tiles.k;
                let blocks = k / QK_K;
                let low_nibbles = _mm256_set1_epi8(0x0F);
                let tiles = s
                    .tiles
                    .lines
                    .as_ptr()
                    .add(group * blocks * LINES)
                    .cast::<u8>();
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..blocks {
                    let tile = tiles.add(b * LINES * 32);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(D).cast()));
                    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(DMIN).cast()));
                    let xq: [*const u8; R] =
                        std::array::from_fn(|r| x.qs.as_ptr().add((row + r) * k + b * QK_K).cast());
                    let mut dot = [_mm256_setzero_si256(); R];
                    for c in 0..4 {
                        let mut low = [_mm256_setzero_si256(); R];
                        let mut high = [_mm256_setzero_si256(); R];
                        for i in 0..8 {
                            let bits = _mm256_load_si256(tile.add(QS + (8 * c + i) * 32).cast());
                            let w_low = _mm256_and_si256(bits, low_nibbles);
                            let w_high = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low_nibbles);
                            for r in 0..R {
                                let at = xq[r].add(64 * c + 4 * i);
                                let x_low = _mm256_set1_epi32((at as *const i32).read_unaligned());
                                let x_high =
                                    _mm256_set1_epi32((at.add(32) as *const i32).read_unaligned());
                                low[r] = $dot(low[r], w_low, x_low);
                                high[r] = $dot(high[r], w_high, x_high);
                            }
                        }
                        for r in 0..R {
                            low[r] = $sums(low[r]);
                            high[r] = $sums(high[r]);
                        }
                        let scale_low =
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(tile.add(SCALES + 16 * c).cast()));
                        let scale_high = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            tile.add(SCALES + 16 * c + 8).cast(),
                        ));
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
                        let sums = x.sums32.as_ptr().add(at * 8);
                        let mut min_dot = _mm256_setzero_si256();
                        for (p, &pair) in mins.iter().enumerate() {
                            let x_sums =
                                _mm256_set1_epi32((sums.add(2 * p) as *const i32).read_unaligned());
                            min_dot = $dpwssd(min_dot, pair, x_sums);
                        }
                        let dx = _mm256_set1_ps(*x.d.get_unchecked(at));
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dot[r]),
                            _mm256_mul_ps(d, dx),
                            acc[r],
                        );
                        acc[r] = _mm256_fnmadd_ps(
                            _mm256_cvtepi32_ps(min_dot),
                            _mm256_mul_ps(dmin, dx),
                            acc[r],
                        );
                    }
                }
                acc
            }
        }
    };
}

q4k_rows_kernel!(
    q4k_rows_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    _mm256_dpbusd_epi32,
    already_32_bit,
    _mm256_dpwssd_epi32
);
q4k_rows_kernel!(
    q4k_rows_avx2,
    "avx2,fma,f16c",
    dot_16_bit_avx2,
    pairs_to_32_bit_avx2,
    dpwssd_avx2
);

/// `vpdpbusd`'s sums need no widening.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn already_32_bit(sums: __m256i) -> __m256i {
    sums
}

/// A four-byte group's products (unsigned nibbles by signed activations) added to 16-bit sums
/// of pairs (`vpmaddubsw`, `vpaddw`): exact for Q4_K's eight groups per sub-block, each pair at
/// most 2·15·127 and eight of them 30,480 (as llama.cpp's repacked AVX2 Q4_K GEMM,
/// `ggml_gemm_q4_K_8x8_q8_K`, does). One multiply per group where `vpdpbusd`'s AVX2 sequence
/// takes two.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_16_bit_avx2(acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_add_epi16(acc, _mm256_maddubs_epi16(unsigned, signed))
}

/// Adjacent 16-bit sums into one 32-bit sum per four-byte lane (`vpmaddwd` by ones).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pairs_to_32_bit_avx2(sums: __m256i) -> __m256i {
    _mm256_madd_epi16(sums, _mm256_set1_epi16(1))
}

/// `vpdpwssd` on AVX2: `vpmaddwd`, then an add (the same wrapping sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dpwssd_avx2(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
}

/// Q6_K: activation rows `row .. row + R` against the tiles of group `group`. Per half block
/// and 4-byte group the low nibbles (two chunks) and high bit pairs rebuild four vectors of
/// unsigned 6-bit values, one per quarter of the half; each 16-value group's sums (`vpdpbusd`,
/// at most 16·63·128) are weighted by its signed scales (`vpmulld`), and the offset of 32 is
/// taken off once per block through the activations' 16-value sums (`vpdpwssd` on scale pairs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn q6k_rows_vnni<const R: usize>(
    s: &Shared,
    x: &Q8KActivations,
    group: usize,
    row: usize,
) -> [__m256; R] {
    // SAFETY: as for `q4k_rows_vnni`, with `16 blocks` 16-value sums per row.
    unsafe {
        use q6k::*;
        let k = s.tiles.k;
        let blocks = k / QK_K;
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let bits45 = _mm256_set1_epi8(0x30);
        let tiles = s
            .tiles
            .lines
            .as_ptr()
            .add(group * blocks * LINES)
            .cast::<u8>();
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let tile = tiles.add(b * LINES * 32);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(D).cast()));
            let xq: [*const u8; R] =
                std::array::from_fn(|r| x.qs.as_ptr().add((row + r) * k + b * QK_K).cast());
            // Scale pairs (groups 2p, 2p + 1) per feature, 16 bits each.
            let pairs: [__m256i; 8] = std::array::from_fn(|p| {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(tile.add(SCALES + 16 * p).cast()))
            });
            let mut dot = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                for half in 0..2 {
                    // Sums of quarter j's 16-value group `8h + 2j + half`.
                    let mut quarters = [[_mm256_setzero_si256(); 4]; R];
                    for i in 4 * half..4 * half + 4 {
                        let line = tile.add(QUANTS + (8 * h + i) * 96);
                        let low_a = _mm256_load_si256(line.cast());
                        let low_b = _mm256_load_si256(line.add(32).cast());
                        let high = _mm256_load_si256(line.add(64).cast());
                        let u = [
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
                        for r in 0..R {
                            for (j, &weights) in u.iter().enumerate() {
                                let at = xq[r].add(128 * h + 32 * j + 4 * i);
                                let four = _mm256_set1_epi32((at as *const i32).read_unaligned());
                                quarters[r][j] = _mm256_dpbusd_epi32(quarters[r][j], weights, four);
                            }
                        }
                    }
                    for j in 0..4 {
                        // Group 8h + 2j + half: the low (even) or high (odd) 16 bits of pair
                        // 4h + j, sign-extended.
                        let pair = pairs[4 * h + j];
                        let scale = if half == 0 {
                            _mm256_srai_epi32(_mm256_slli_epi32(pair, 16), 16)
                        } else {
                            _mm256_srai_epi32(pair, 16)
                        };
                        for r in 0..R {
                            dot[r] =
                                _mm256_add_epi32(dot[r], _mm256_mullo_epi32(quarters[r][j], scale));
                        }
                    }
                }
            }
            for r in 0..R {
                let at = (row + r) * blocks + b;
                let bsums = x.bsums.as_ptr().add(at * 16);
                let mut offset = _mm256_setzero_si256();
                for (p, &pair) in pairs.iter().enumerate() {
                    let x_sums =
                        _mm256_set1_epi32((bsums.add(2 * p) as *const i32).read_unaligned());
                    offset = _mm256_dpwssd_epi32(offset, pair, x_sums);
                }
                let dot = _mm256_sub_epi32(dot[r], _mm256_slli_epi32(offset, 5));
                let dx = _mm256_set1_ps(*x.d.get_unchecked(at));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, dx), acc[r]);
            }
        }
        acc
    }
}

/// Quarter `j` of a Q6_K half block's 4-byte group at `line` (its two low-nibble chunks, then its
/// high bit pairs): eight features' four unsigned 6-bit values.
///
/// # Safety
/// The CPU has AVX2; `line` is a tile's 32-byte-aligned group of three readable lines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q6k_quarter(line: *const u8, j: usize) -> __m256i {
    // SAFETY: as the caller promised.
    unsafe {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let bits45 = _mm256_set1_epi8(0x30);
        let low = _mm256_load_si256(line.add(32 * (j % 2)).cast());
        let high = _mm256_load_si256(line.add(64).cast());
        let (low, high) = match j {
            0 => (low, _mm256_slli_epi16(high, 4)),
            1 => (low, _mm256_slli_epi16(high, 2)),
            2 => (_mm256_srli_epi16(low, 4), high),
            _ => (_mm256_srli_epi16(low, 4), _mm256_srli_epi16(high, 2)),
        };
        _mm256_or_si256(
            _mm256_and_si256(low, low_nibbles),
            _mm256_and_si256(high, bits45),
        )
    }
}

/// Q6_K on AVX2 alone: `q6k_rows_vnni`'s walk, each `vpdpbusd` replaced by `vpmaddubsw` into
/// 16-bit pair sums over two 4-byte groups (at most 4·63·127 = 32,004) that one `vpmaddwd`
/// widens and weights by the 16-value group's scale at once, as llama.cpp's AVX2 Q6_K product
/// does: 1.5 multiplies per group and row where the `vpdpbusd` sequence would take two and a
/// `vpmulld`. The same integer sums as on VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_rows_avx2<const R: usize>(
    s: &Shared,
    x: &Q8KActivations,
    group: usize,
    row: usize,
) -> [__m256; R] {
    // SAFETY: as for `q6k_rows_vnni`.
    unsafe {
        use q6k::*;
        let k = s.tiles.k;
        let blocks = k / QK_K;
        // Per feature's 32-bit lane, its even (low) or odd (high) group's scale in both halves.
        let even = _mm256_setr_epi8(
            0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9,
            12, 13, 12, 13,
        );
        let odd = _mm256_add_epi8(even, _mm256_set1_epi8(2));
        let tiles = s
            .tiles
            .lines
            .as_ptr()
            .add(group * blocks * LINES)
            .cast::<u8>();
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let tile = tiles.add(b * LINES * 32);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(D).cast()));
            let xq: [*const u8; R] =
                std::array::from_fn(|r| x.qs.as_ptr().add((row + r) * k + b * QK_K).cast());
            let pairs: [__m256i; 8] = std::array::from_fn(|p| {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(tile.add(SCALES + 16 * p).cast()))
            });
            let mut dot = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                for half in 0..2 {
                    for i in (4 * half..4 * half + 4).step_by(2) {
                        let line = tile.add(QUANTS + (8 * h + i) * 96);
                        for j in 0..4 {
                            // Group 8h + 2j + half: the even or odd half of scale pair 4h + j.
                            let select = if half == 0 { even } else { odd };
                            let scale = _mm256_shuffle_epi8(pairs[4 * h + j], select);
                            let u0 = q6k_quarter(line, j);
                            let u1 = q6k_quarter(line.add(96), j);
                            for r in 0..R {
                                let at = xq[r].add(128 * h + 32 * j + 4 * i);
                                let x0 = _mm256_set1_epi32((at as *const i32).read_unaligned());
                                let x1 =
                                    _mm256_set1_epi32((at.add(4) as *const i32).read_unaligned());
                                let sums = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(u0, x0),
                                    _mm256_maddubs_epi16(u1, x1),
                                );
                                dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(sums, scale));
                            }
                        }
                    }
                }
            }
            for r in 0..R {
                let at = (row + r) * blocks + b;
                let bsums = x.bsums.as_ptr().add(at * 16);
                let mut offset = _mm256_setzero_si256();
                for (p, &pair) in pairs.iter().enumerate() {
                    let x_sums =
                        _mm256_set1_epi32((bsums.add(2 * p) as *const i32).read_unaligned());
                    offset = _mm256_add_epi32(offset, _mm256_madd_epi16(pair, x_sums));
                }
                let dot = _mm256_sub_epi32(dot[r], _mm256_slli_epi32(offset, 5));
                let dx = _mm256_set1_ps(*x.d.get_unchecked(at));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, dx), acc[r]);
            }
        }
        acc
    }
}

/// Q8_0: activation rows `row .. row + R` against the tiles of group `group`. Per block the
/// sums start at `-128 Σx` (the weights' offset), take eight `vpdpbusd` (weights plus 128 by
/// signed activations, at most 32·255·127), and are scaled by `d·dx` into the rows' totals.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn q8_0_rows_vnni<const R: usize>(
    s: &Shared,
    x: &Q8_0Inputs,
    group: usize,
    row: usize,
) -> [__m256; R] {
    // SAFETY: rows `row .. row + R` exist (the caller's loop), each with `2 blocks` padded
    // blocks of quants, scales and offsets; the group's tile blocks are inside `lines`.
    unsafe {
        use q8_0::*;
        let blocks = 2 * s.tiles.blocks;
        let tiles = s
            .tiles
            .lines
            .as_ptr()
            .add(group * s.tiles.blocks * LINES)
            .cast::<u8>();
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let tile = tiles.add(b / 2 * LINES * 32);
            let half = b % 2;
            let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(D + 16 * half).cast()));
            let mut sums: [__m256i; R] = std::array::from_fn(|r| {
                _mm256_set1_epi32(*x.offsets.get_unchecked((row + r) * blocks + b))
            });
            for i in 0..8 {
                let weights = _mm256_load_si256(tile.add(QS + (8 * half + i) * 32).cast());
                for (r, sum) in sums.iter_mut().enumerate() {
                    let at = x
                        .quants
                        .as_ptr()
                        .add((row + r) * blocks * QK8_0 + b * QK8_0 + 4 * i);
                    let four = _mm256_set1_epi32((at as *const i32).read_unaligned());
                    *sum = _mm256_dpbusd_epi32(*sum, weights, four);
                }
            }
            for (r, sum) in sums.iter().enumerate() {
                let dx = _mm256_set1_ps(*x.scales.get_unchecked((row + r) * blocks + b));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*sum), _mm256_mul_ps(d, dx), acc[r]);
            }
        }
        acc
    }
}

/// [`q8_0_rows_vnni`] on AVX2, in 16-bit products: a four-byte group's first weight pairs and
/// its second ones (the AVX2 tile layout) widen to i16, one pair per feature, and `vpmaddwd`
/// takes them by a row's first and second activation pairs (`wide`, 32-bit broadcasts): 32
/// products in two multiplies, where llama.cpp's `|w|·(x·sign(w))` in bytes (`vpsignb`,
/// `vpmaddubsw`, and `vpmaddwd` to widen) takes three on the same two pipes (Zen 3). The row
/// tile's activations are one interleaved stream: read from four row-major rows, a C model of
/// this loop took 12 cycles per four-byte group on Zen 3, interleaved 7. The sums are the same
/// integers as `vpdpbusd`'s, scaled in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_rows_avx2<const R: usize>(
    s: &Shared,
    x: &Q8_0Inputs,
    group: usize,
    row: usize,
) -> [__m256; R] {
    // SAFETY: as in `q8_0_rows_vnni`, with `wide` holding whole row tiles of quants and `row`
    // the first row of one (the caller steps by `ROW_TILE`).
    debug_assert_eq!(row % ROW_TILE, 0);
    unsafe {
        use q8_0::*;
        let blocks = 2 * s.tiles.blocks;
        let tiles = s
            .tiles
            .lines
            .as_ptr()
            .add(group * s.tiles.blocks * LINES)
            .cast::<u8>();
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let tile = tiles.add(b / 2 * LINES * 32);
            let half = b % 2;
            let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.add(D + 16 * half).cast()));
            let mut sums = [_mm256_setzero_si256(); R];
            for i in 0..8 {
                let line = tile.add(QS + (8 * half + i) * 32);
                let firsts = _mm256_cvtepi8_epi16(_mm_load_si128(line.cast()));
                let seconds = _mm256_cvtepi8_epi16(_mm_load_si128(line.add(16).cast()));
                for (r, sum) in sums.iter_mut().enumerate() {
                    let at = x
                        .wide
                        .as_ptr()
                        .add(((row / ROW_TILE * blocks + b) * 8 + i) * 4 * ROW_TILE + 4 * r)
                        .cast::<i32>();
                    let products = _mm256_add_epi32(
                        _mm256_madd_epi16(firsts, _mm256_set1_epi32(at.read_unaligned())),
                        _mm256_madd_epi16(seconds, _mm256_set1_epi32(at.add(1).read_unaligned())),
                    );
                    *sum = _mm256_add_epi32(*sum, products);
                }
            }
            for (r, sum) in sums.iter().enumerate() {
                let dx = _mm256_set1_ps(*x.scales.get_unchecked((row + r) * blocks + b));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*sum), _mm256_mul_ps(d, dx), acc[r]);
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::kquants::{matmul_k_quant, KQuant, Q4K_BLOCK_BYTES, Q6K_BLOCK_BYTES};
    use crate::layers::quantized::{matmul_q8_blocks, test_weights, Q8Weights};

    const FORMATS: [(GgmlDType, TileFormat); 4] = [
        (GgmlDType::Q4K, TileFormat::Q4K),
        (GgmlDType::Q6K, TileFormat::Q6K),
        (GgmlDType::Q8_0, TileFormat::Q8_0),
        (GgmlDType::Q5_0, TileFormat::Q5_0),
    ];

    /// The one-row kernels' product, which the tiles must match.
    fn one_row_kernels(
        format: TileFormat,
        x: &[f32],
        rows: usize,
        k: usize,
        w: &[u8],
        n: usize,
    ) -> Vec<f32> {
        match format {
            TileFormat::Q4K => matmul_k_quant(KQuant::Q4K, x, rows, k, w, n),
            TileFormat::Q6K => matmul_k_quant(KQuant::Q6K, x, rows, k, w, n),
            TileFormat::Q8_0 => matmul_q8_blocks(Q8Weights::Q8_0, x, rows, k, w, n),
            TileFormat::Q5_0 => matmul_q8_blocks(Q8Weights::Q5_0, x, rows, k, w, n),
        }
    }

    #[test]
    fn tiles_give_the_one_row_kernels_products() {
        // 21 features: two whole tiles and a partial one; rows past one row tile and a tail;
        // for Q8_0 also an odd number of blocks (a padded tile block).
        for (dtype, format, k) in FORMATS
            .iter()
            .map(|&(dtype, format)| (dtype, format, 512))
            .chain([
                (GgmlDType::Q8_0, TileFormat::Q8_0, 160),
                (GgmlDType::Q5_0, TileFormat::Q5_0, 160),
            ])
        {
            // Q5_0 widened into Q8_0 tiles also where VNNI keeps the file's blocks instead.
            #[cfg(target_arch = "x86_64")]
            let widened_q5_0 = format == TileFormat::Q5_0 && crate::layers::quantized::avx2();
            #[cfg(not(target_arch = "x86_64"))]
            let widened_q5_0 = false;
            if !available_for(format) && !widened_q5_0 {
                eprintln!("SKIPPED: this CPU runs no {format:?} tiles");
                continue;
            }
            let n = 21;
            let (w, _, _) = test_weights(n, k, dtype, 3);
            let Some(tiles) = BlockTiles::packed(format, &w, n, k, available()) else {
                panic!("no tiles for a [{n}, {k}] {format:?} matrix");
            };
            for (rows, pass_rows) in [(1, 16), (4, 16), (7, 16), (33, 64), (33, 8)] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 53 % 127) as f32 - 63.0) / 9.0)
                    .collect();
                let want = one_row_kernels(format, &x, rows, k, &w, n);
                let got = tiles.in_passes(&x, rows, pass_rows);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{format:?} k {k} rows {rows} in {pass_rows} [{}, {}]: {a} vs {b}",
                        i / n,
                        i % n
                    );
                }
            }
        }
    }

    #[test]
    fn extreme_q6_k_values_keep_exact_integer_sums() {
        if !available_for(TileFormat::Q6K) {
            eprintln!("SKIPPED: this CPU runs no Q6_K tiles");
            return;
        }
        // One feature, one block: 6-bit values 0 and 63 (-32 and 31), scales ±127 and -128,
        // activations ±127 after quantization; with d = 1 the product is the exact integer sum.
        let mut block = vec![0u8; Q6K_BLOCK_BYTES];
        let u = |i: usize| if i.is_multiple_of(3) { 63u8 } else { 0 };
        for i in 0..QK_K {
            let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
            let (low, high) = (u(i) & 0x0F, u(i) >> 4);
            block[64 * h + 32 * (j % 2) + l] |= if j < 2 { low } else { low << 4 };
            block[128 + 32 * h + l] |= high << (2 * j);
        }
        for g in 0..16 {
            block[192 + g] = [127i8, -128, -127, 5][g % 4] as u8;
        }
        block[208..210].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        let x: Vec<f32> = (0..QK_K)
            .map(|i| if i % 2 == 0 { 127.0 } else { -127.0 })
            .collect();
        // Where VNNI exists, the AVX2 kernel too (the packing is the same).
        let both = [available(), false].map(|vnni| {
            BlockTiles::packed(TileFormat::Q6K, &block, 1, QK_K, vnni).expect("one Q6_K block")
        });
        let exact: i64 = (0..QK_K)
            .map(|i| {
                let scale = i64::from([127i8, -128, -127, 5][(i / 16) % 4]);
                let x = if i % 2 == 0 { 127 } else { -127 };
                scale * (i64::from(u(i)) - 32) * x
            })
            .sum();
        for tiles in both {
            assert_eq!(tiles.matmul(&x, 1)[0], exact as f32, "vnni {}", tiles.vnni);
        }
    }

    /// Q6_K values 63 against activations of one sign (they quantize to -127): each 16-bit sum
    /// of the AVX2 kernel adds four products of 63·127 (32,004) and must stay exact (as on VNNI).
    #[test]
    fn q6_k_sixteen_bit_sums_stay_exact() {
        if !available_for(TileFormat::Q6K) {
            eprintln!("SKIPPED: this CPU runs no Q6_K tiles");
            return;
        }
        // One feature, one block: every 6-bit value 63 (31 after the offset), every scale 127,
        // d = 1.
        let mut block = vec![0u8; Q6K_BLOCK_BYTES];
        block[..192].fill(0xFF);
        block[192..208].fill(127);
        block[208..210].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        let x = vec![127.0f32; QK_K];
        let exact = (QK_K * 127 * 31 * 127) as f32;
        for vnni in [available(), false] {
            let Some(tiles) = BlockTiles::packed(TileFormat::Q6K, &block, 1, QK_K, vnni) else {
                panic!("no tiles");
            };
            assert_eq!(tiles.matmul(&x, 1)[0], exact, "vnni {vnni}");
        }
    }

    /// Q4_K nibbles 15 against activations that quantize to -127: each 16-bit sum of the AVX2
    /// kernel reaches eight groups' pairs, 8·2·15·127 = 30,480, and must stay exact (as on VNNI).
    #[test]
    fn extreme_q4_k_values_keep_exact_integer_sums() {
        if !available_for(TileFormat::Q4K) {
            eprintln!("SKIPPED: this CPU runs no Q4_K tiles");
            return;
        }
        // One feature, one block: d = 1, every sub-block's scale 1 and min 0, every nibble 15.
        let mut block = vec![0u8; Q4K_BLOCK_BYTES];
        block[0..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
        block[4..8].fill(1); // scales of sub-blocks 0-3 (their mins, bytes 8-11, stay 0)
        block[12..16].fill(0x01); // scale 1, min 0 of sub-blocks 4-7
        block[16..].fill(0xFF);
        let x = vec![127.0f32; QK_K];
        let exact = (QK_K * 15 * 127) as f32;
        // Where VNNI exists, the AVX2 kernel too (the packing is the same).
        for vnni in [available(), false] {
            let Some(tiles) = BlockTiles::packed(TileFormat::Q4K, &block, 1, QK_K, vnni) else {
                panic!("no tiles");
            };
            assert_eq!(tiles.matmul(&x, 1)[0], exact, "vnni {vnni}");
        }
    }

    /// Q8_0 weights -128 and 127 against activations ±127 (after quantization): the integer
    /// sums stay exact on every kernel (`vpdpbusd`'s unsigned weights reach 255, the AVX2
    /// kernel's 16-bit pairs of products 2·128·127).
    #[test]
    fn extreme_q8_0_values_keep_exact_integer_sums() {
        if !available_for(TileFormat::Q8_0) {
            eprintln!("SKIPPED: this CPU runs no Q8_0 tiles");
            return;
        }
        let k = 2 * QK8_0;
        let weight = |i: usize| if i % 4 < 2 { -128i8 } else { 127 };
        // Pairs of -128 by -127 (the largest) and of -128 by 127 (the smallest).
        let activation = |i: usize| if i % 16 < 5 { -127.0f32 } else { 127.0 };
        let mut w = Vec::new();
        for b in 0..k / QK8_0 {
            w.extend(half::f16::from_f32(1.0).to_bits().to_le_bytes());
            w.extend((0..QK8_0).map(|i| weight(b * QK8_0 + i) as u8));
        }
        let x: Vec<f32> = (0..k).map(activation).collect();
        let exact: i64 = (0..k)
            .map(|i| i64::from(weight(i)) * activation(i) as i64)
            .sum();
        // Where VNNI exists, the AVX2 packing too.
        for vnni in [available(), false] {
            let Some(tiles) = BlockTiles::packed(TileFormat::Q8_0, &w, 1, k, vnni) else {
                panic!("no tiles");
            };
            assert_eq!(tiles.matmul(&x, 1)[0], exact as f32, "vnni {vnni}");
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let (n, k) = (13, 256);
        for (dtype, format) in FORMATS {
            if !available_for(format) {
                continue;
            }
            let (w, _, _) = test_weights(n, k, dtype, 5);
            let Some(tiles) = BlockTiles::new(format, &w, n, k) else {
                panic!("no tiles");
            };
            let x: Vec<f32> = (0..9 * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0)
                .collect();
            let all = tiles.matmul(&x, 9);
            for r in 0..9 {
                let alone = tiles.matmul(&x[r * k..(r + 1) * k], 1);
                assert_eq!(&all[r * n..(r + 1) * n], &alone[..], "{format:?} row {r}");
            }
        }
    }

    /// Where both run, the AVX2 kernels give the VNNI ones' bits: the same integer sums, scaled
    /// and summed in the same order. Without VNNI the AVX2 kernels are the ones the other tests
    /// check against the one-row kernels.
    #[test]
    fn avx2_kernels_give_the_vnni_kernels_bits() {
        if !available() {
            eprintln!("SKIPPED: this CPU lacks AVX-512 VNNI");
            return;
        }
        let n = 21;
        // For Q8_0 also an odd block count (a padded tile block); passes past one row tile and
        // of a row count that is not a whole number of tiles.
        for (dtype, format, k) in [
            (GgmlDType::Q4K, TileFormat::Q4K, 512),
            (GgmlDType::Q6K, TileFormat::Q6K, 512),
            (GgmlDType::Q8_0, TileFormat::Q8_0, 512),
            (GgmlDType::Q8_0, TileFormat::Q8_0, 160),
            (GgmlDType::Q5_0, TileFormat::Q5_0, 160),
        ] {
            let (w, _, _) = test_weights(n, k, dtype, 7);
            let (Some(vnni), Some(avx2)) = (
                BlockTiles::packed(format, &w, n, k, true),
                BlockTiles::packed(format, &w, n, k, false),
            ) else {
                panic!("no tiles");
            };
            for (rows, pass_rows) in [(7, 16), (33, 8), (33, 6)] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 37 % 113) as f32 - 56.0) / 7.0)
                    .collect();
                assert_eq!(
                    vnni.in_passes(&x, rows, pass_rows),
                    avx2.in_passes(&x, rows, pass_rows),
                    "{format:?} k {k} rows {rows} in {pass_rows}"
                );
            }
        }
    }

    /// The Q5_0 blocks widened for the Q8_0 tiles hold the values candle decodes from them.
    #[test]
    fn q5_0_blocks_become_q8_0_blocks_of_the_same_values() {
        let (n, k) = (3, 256);
        let (w, dequantised, _) = test_weights(n, k, GgmlDType::Q5_0, 11);
        let mut fifth_bits_seen = [false; 2];
        for (b, block) in w.chunks_exact(Q5_0_BLOCK_BYTES).enumerate() {
            let q8_0 = q5_0_as_q8_0(block);
            assert_eq!(q8_0[..2], block[..2], "block {b}: d");
            let d = half::f16::from_le_bytes([q8_0[0], q8_0[1]]).to_f32();
            for (i, &q) in q8_0[2..].iter().enumerate() {
                let q = q as i8;
                assert!((-16..16).contains(&q), "block {b} value {i}: {q}");
                fifth_bits_seen[usize::from(q >= 0)] = true;
                assert_eq!(
                    d * f32::from(q),
                    dequantised[b * QK8_0 + i],
                    "block {b} value {i}"
                );
            }
        }
        assert_eq!(fifth_bits_seen, [true, true]);
    }

    #[test]
    fn shapes_that_do_not_fit_get_no_tiles() {
        let (w, _, _) = test_weights(8, 256, GgmlDType::Q4K, 1);
        assert!(BlockTiles::new(TileFormat::Q4K, &w, 9, 256).is_none());
        assert!(BlockTiles::new(TileFormat::Q4K, &w[..w.len() - 1], 8, 256).is_none());
        assert!(BlockTiles::new(TileFormat::Q4K, &w, 8, 128).is_none());
        assert!(BlockTiles::packed(TileFormat::Q6K, &w, 8, 256, false).is_none());
        assert!(BlockTiles::new(TileFormat::Q8_0, &w, 8, 250).is_none());
        let (w, _, _) = test_weights(8, 64, GgmlDType::Q5_0, 1);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            BlockTiles::new(TileFormat::Q5_0, &w, 8, 64).is_some(),
            crate::layers::quantized::avx2() && !available(),
            "Q5_0 tiles exactly on AVX2 without VNNI"
        );
        assert!(BlockTiles::packed(TileFormat::Q5_0, &w, 8, 64, false).is_some());
        assert!(BlockTiles::packed(TileFormat::Q5_0, &w[..w.len() - 1], 8, 64, false).is_none());
        assert!(BlockTiles::packed(TileFormat::Q5_0, &w, 8, 48, false).is_none());
    }
}
