//! Linear layers, with our own kernel for products of up to a few hundred rows.
//!
//! candle's CPU matmul runs a one-row product (one decode step) on a single thread and has no
//! bf16 kernel (it widens the whole weight matrix to f32 on every call). Decoding one sequence
//! reads every weight once per token, so it is bound by memory bandwidth; decoding many is
//! bound by arithmetic. This kernel splits the output features across threads, reads bf16
//! weights as they are stored (widening in registers), and on AVX-512 keeps a 4 × 4 tile of
//! (feature, row) accumulators in registers so each load feeds four multiply-adds. Long prefill
//! chunks stay on candle's GEMM, which wins past a few hundred rows.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use half::bf16;
use rayon::prelude::*;

use super::bf16_tiles::Bf16Tiles;
use super::block_tiles::{BlockTiles, TileFormat};
use super::kquants::{self, KQuant};
use super::q8_tiles;
use super::quantized::{self, Q8Weights, QK8_0};

/// Inputs with at most this many rows take our kernel: batched decoding (one row per sequence)
/// and short prefill chunks (bf16 weights on AVX512-BF16 take `layers/bf16_matmul.rs` at any
/// length). Past it, candle's GEMM is faster even after widening bf16 weights
/// (measured crossover 256–512 rows on Zen 4: `examples/small_batch_matmul.rs`, BENCHMARKS.md).
pub const SMALL_BATCH_ROWS: usize = 256;
/// Output features per parallel task: large enough to amortise scheduling, small enough to
/// balance two to a few dozen threads.
const FEATURES_PER_TASK: usize = 64;

/// `y = x W^T + b`, with `W` stored `[out_features, in_features]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    /// Set when the weight is held in a block-quantized GGML type (Q8_0, Q4_K, …) without tiles
    /// (`tiles` below): then `weight` is an empty placeholder and products go through
    /// `forward_quantized`'s routes, which quantize the activations per block as llama.cpp does.
    quantized: Option<QMatMul>,
    /// A Q4_K, Q6_K or Q8_0 weight repacked into tiles of eight features
    /// (`layers/block_tiles.rs`), on CPUs with AVX-512 VNNI or AVX2 (and a Q5_0 weight, widened
    /// to Q8_0, with AVX2 but not VNNI): then they are the layer's only copy of the weight
    /// (`quantized` is `None`) and every product takes them.
    tiles: Option<Arc<BlockTiles>>,
    /// A bf16 weight repacked into tiles of sixteen features (`layers/bf16_tiles.rs`) by
    /// [`Linear::pack_bf16`]: then `weight` is an empty placeholder and every product takes them.
    bf16_tiles: Option<Arc<Bf16Tiles>>,
    bias: Option<Tensor>,
    /// The checkpoint name of the weight (`model.layers.0.mlp.up_proj.weight`), so a loader can
    /// find its quantized form.
    name: String,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            quantized: None,
            tiles: None,
            bf16_tiles: None,
            bias,
            name: String::new(),
        }
    }

    /// Names the weight (see [`Linear::name`]).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The checkpoint name of the weight; empty when built from a bare tensor.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the weight by its block-quantized form (same shape), dropping the dense copy.
    /// Where tiles are built (see [`Linear::tiles`]) they replace the blocks too, so the layer
    /// holds its weight once.
    pub fn set_quantized(&mut self, weight: Arc<QTensor>) -> Result<()> {
        if weight.shape().dims() != self.weight.dims() {
            candle_core::bail!(
                "{}: quantized weight {:?} does not match {:?}",
                self.name,
                weight.shape().dims(),
                self.weight.dims()
            );
        }
        self.weight = Tensor::zeros(0, self.weight.dtype(), self.weight.device())?;
        self.tiles = None;
        self.quantized = None;
        let format = TileFormat::from_ggml(weight.dtype()).filter(|_| weight.device().is_cpu());
        if let Some(format) = format {
            let (n, k) = weight.shape().dims2()?;
            self.tiles = BlockTiles::new(format, &weight.data()?, n, k).map(Arc::new);
        }
        if self.tiles.is_none() {
            self.quantized = Some(QMatMul::from_arc(weight)?);
        }
        Ok(())
    }

    /// The dense weight, `None` once quantized or packed.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        (self.quantized.is_none() && self.tiles.is_none() && self.bf16_tiles.is_none())
            .then_some(&self.weight)
    }

    /// Repacks a bf16 weight on a CPU with AVX512-BF16, or AVX2 and FMA, into tiles of sixteen
    /// features (`layers/bf16_tiles.rs`), dropping the dense copy; other weights are left as
    /// they are.
    /// Quantize first: a packed layer has no dense weight to quantize.
    pub fn pack_bf16(&mut self) -> Result<()> {
        if self.dense_weight().is_none()
            || self.weight.dtype() != DType::BF16
            || !self.weight.device().is_cpu()
            || !super::bf16_tiles::available()
        {
            return Ok(());
        }
        let (n, k) = self.weight.dims2()?;
        let weight = self.weight.contiguous()?;
        let tiles = {
            // Packed from the tensor's own storage: a copy of the largest matrix (the output
            // head) would add its size to the load's peak memory.
            let (storage, layout) = weight.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(CpuStorage::BF16(values)), Some((start, end))) => {
                    Bf16Tiles::new(&values[start..end], n, k)
                }
                _ => None,
            }
        };
        if let Some(tiles) = tiles {
            self.weight = Tensor::zeros(0, DType::BF16, self.weight.device())?;
            self.bf16_tiles = Some(Arc::new(tiles));
        }
        Ok(())
    }

    /// Whether [`Linear::pack_bf16`] packed the weight.
    pub fn is_bf16_packed(&self) -> bool {
        self.bf16_tiles.is_some()
    }

    /// The GGML type of a quantized weight, `None` for a dense one.
    pub fn quantized_dtype(&self) -> Option<candle_core::quantized::GgmlDType> {
        if let Some(tiles) = &self.tiles {
            return Some(tiles.ggml_dtype());
        }
        match &self.quantized {
            Some(QMatMul::QTensor(q)) => Some(q.dtype()),
            _ => None,
        }
    }

    /// Bytes held by the weight and bias.
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let weight = match &self.quantized {
            Some(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Some(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => bytes(t),
            None => {
                bytes(&self.weight)
                    + self.tiles.as_ref().map_or(0, |t| t.bytes())
                    + self.bf16_tiles.as_ref().map_or(0, |t| t.bytes())
            }
        };
        weight + self.bias.as_ref().map_or(0, bytes)
    }

    /// Loads `weight` in the builder's dtype and `bias` in `activations`, the dtype the
    /// layer's output has (f32 on CPU, see [`crate::activation_dtype`]).
    pub fn load(
        in_features: usize,
        out_features: usize,
        bias: bool,
        activations: DType,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias {
            Some(vb.to_dtype(activations).get(out_features, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias).with_name(format!("{}.weight", vb.prefix())))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x W^T` (no bias) through our kernel whatever the number of rows (benchmarks compare it
    /// with the GEMM path).
    pub fn forward_small_batch(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op2_no_bwd(&self.weight.contiguous()?, &SmallBatchMatmul)
    }

    /// `x W^T` (no bias) through candle's GEMM, weights widened to `x`'s dtype as the prefill
    /// path does.
    pub fn forward_gemm(&self, x: &Tensor) -> Result<Tensor> {
        let weight = widen(&self.weight, x.dtype())?;
        candle_nn::Linear::new(weight, None).forward(x)
    }

    fn takes_small_batch_kernel(&self, x: &Tensor) -> bool {
        let in_features = self.weight.dim(1).unwrap_or(0);
        // bf16 weights on AVX512-BF16 take our `vdpbf16ps` kernel at any length: it runs at
        // twice the rate of candle's f32 GEMM on widened weights.
        let bf16_dot = self.weight.dtype() == DType::BF16 && super::bf16_matmul::available();
        x.device().is_cpu()
            && in_features > 0
            && (bf16_dot || x.elem_count() / in_features <= SMALL_BATCH_ROWS)
            && matches!(self.weight.dtype(), DType::F32 | DType::BF16)
            && matches!(x.dtype(), DType::F32 | DType::BF16)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if let Some(tiles) = &self.tiles {
            forward_tiles(tiles.shape(), x, |xs, rows| tiles.matmul(xs, rows))?
        } else if let Some(tiles) = &self.bf16_tiles {
            forward_tiles(tiles.shape(), x, |xs, rows| tiles.matmul(xs, rows))?
        } else if let Some(quantized) = &self.quantized {
            forward_quantized(quantized, x)?
        } else if self.takes_small_batch_kernel(x) {
            x.contiguous()?
                .apply_op2_no_bwd(&self.weight.contiguous()?, &SmallBatchMatmul)?
        } else if self.weight.dtype() != x.dtype() {
            // Reduced-precision weights, f32 activations (CPU): widen for the GEMM, on all
            // threads; a prefill step is compute-bound, so the extra pass is cheap.
            let weight = widen(&self.weight, x.dtype())?;
            candle_nn::Linear::new(weight, None).forward(x)?
        } else {
            candle_nn::Linear::new(self.weight.clone(), None).forward(x)?
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

/// Past this many rows a product with weights of a type candle has no SIMD code for (Q4_1,
/// Q5_0, Q5_1) dequantises the weight and runs the GEMM, which beats scalar dot products once
/// the extra pass over the weight is shared by enough rows.
pub const QUANTIZED_GEMV_ROWS: usize = 16;
/// Matrices this large (elements) are never dequantised per call — an output head over a big
/// vocabulary would be rewritten in f32 every decoding step (671 MB for Gemma 3's) — and take
/// the integer kernel up to [`SMALL_BATCH_ROWS`] rows instead.
const DEQUANTIZE_LIMIT: usize = 1 << 24;

/// Q8_0 matrices smaller than this (elements) are dequantised for prompts: on Gemma 3 270M's
/// 640-wide layers candle's multi-row Q8_0 product runs at a fraction of the f32 GEMM's speed,
/// while on a 1.5B model's 1536 × 8960 layers it is 1.5× faster than dequantising.
const SMALL_Q8_0_ELEMENTS: usize = 1 << 22;

/// On a CPU with AVX-512 VNNI, Q5_0 products of at most this many rows take the one-row kernel
/// (`layers/quantized.rs`), more the tiles built per work unit (`layers/q8_tiles.rs`). (With
/// AVX2 alone Q5_0 weights are widened into load-time tiles and never come here.)
pub const Q5_0_ROW_KERNEL_ROWS: usize = 8;

/// Q4_K and Q6_K products of at most this many rows take our kernel on the file's own blocks
/// (`layers/kquants.rs`): it streams them at up to the memory bandwidth, where candle's
/// repacked tiles read a third more bytes; past 4 rows candle's tiles, which share each decoded
/// weight among more rows, are faster (`examples/kquant_matmul.rs`, BENCHMARKS.md).
pub const BLOCK_GEMV_ROWS: usize = 4;

/// Whether candle 0.11 has a SIMD dot product for this type on x86 (AVX2): Q4_0, Q8_0 and the
/// k-quants. Q4_1, Q5_0 and Q5_1 run its scalar code.
fn candle_has_simd(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::Q8K
    )
}

/// `x Wᵀ` for block-quantized `W`, by route (Q4_K, Q6_K and Q8_0 weights on a CPU with AVX-512
/// VNNI or AVX2, and Q5_0 with AVX2 alone, never come here: they take their tiles, see
/// [`forward_tiles`]):
/// - our one-row kernels for up to [`BLOCK_GEMV_ROWS`] rows of Q4_K and Q6_K weights
///   (`layers/kquants.rs`), up to [`Q5_0_ROW_KERNEL_ROWS`] rows of Q5_0 (up to
///   [`QUANTIZED_GEMV_ROWS`] without AVX2) and up to [`SMALL_BATCH_ROWS`] of a Q8_0
///   matrix too large to dequantise (an output head; `layers/quantized.rs`): they stream the
///   file's blocks at up to the memory bandwidth;
/// - our tiled kernel built per work unit (`layers/q8_tiles.rs`, AVX-512 VNNI) for more rows of
///   Q5_0: eight weight rows interleaved so each block's integer sums cover eight features;
/// - candle's product for the other rows of the types it has SIMD code for: it quantizes the
///   activations per block as llama.cpp does and reads each weight block once for a tile of
///   rows (Q4_K, Q6_K past 4 rows; Q8_0 layers);
/// - the GEMM on the dequantised weight for more than [`QUANTIZED_GEMV_ROWS`] rows of the types
///   candle computes in scalar code (Q4_1, Q5_1, and Q5_0 without AVX2) and of small
///   Q8_0 matrices.
///
/// Within a route a row's bits do not depend on the other rows of the batch.
fn forward_quantized(weight: &QMatMul, x: &Tensor) -> Result<Tensor> {
    let QMatMul::QTensor(q) = weight else {
        return weight.forward(x);
    };
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (n, k) = q.shape().dims2()?;
    if x.dims().last() != Some(&k) {
        candle_core::bail!(
            "quantized linear: input {:?} vs weight [{n}, {k}]",
            x.dims()
        );
    }
    let rows = x.elem_count() / k.max(1);
    let dtype_q = q.dtype();
    let cpu = x.device().is_cpu();
    let k_quant = KQuant::from_ggml(dtype_q)
        .filter(|_| cpu && k.is_multiple_of(kquants::QK_K) && rows <= BLOCK_GEMV_ROWS);
    let q8_format = Q8Weights::from_ggml(dtype_q).filter(|_| cpu && k.is_multiple_of(QK8_0));
    let head = n * k >= DEQUANTIZE_LIMIT;
    // Past this many rows the per-unit tiles beat the one-row kernel (`examples/kquant_matmul.rs`):
    // building a tile costs about one row's product. Q8_0 never takes them: on CPUs that have
    // them its tiles are built at load.
    let q5_0_tiles = q8_format
        .filter(|&format| format == Q8Weights::Q5_0)
        .filter(|_| rows > Q5_0_ROW_KERNEL_ROWS && q8_tiles::available());
    let q8_rows = q8_format.filter(|&format| match format {
        Q8Weights::Q5_0 => rows <= QUANTIZED_GEMV_ROWS,
        // Up to 16 rows a layer's matrices stay on candle's repacked tiles: ours is 4-34 %
        // faster on them alone (`examples/kquant_matmul.rs`) but decoding the Qwen-1.5B
        // shape end to end was 5-8 % slower with it. An output head is 1.3-3x faster on ours.
        Q8Weights::Q8_0 => head && rows <= SMALL_BATCH_ROWS,
    });
    let y = if let Some(kind) = k_quant {
        on_block_kernel(q, &x, |xs, w| {
            kquants::matmul_k_quant(kind, xs, rows, k, w, n)
        })?
    } else if let Some(format) = q5_0_tiles {
        on_block_kernel(q, &x, |xs, w| {
            q8_tiles::matmul_q8_tiles(format, xs, rows, k, w, n)
                .unwrap_or_else(|| quantized::matmul_q8_blocks(format, xs, rows, k, w, n))
        })?
    } else if let Some(format) = q8_rows {
        on_block_kernel(q, &x, |xs, w| {
            quantized::matmul_q8_blocks(format, xs, rows, k, w, n)
        })?
    } else if !cpu
        || rows <= QUANTIZED_GEMV_ROWS
        || (candle_has_simd(dtype_q)
            && (dtype_q != GgmlDType::Q8_0 || n * k >= SMALL_Q8_0_ELEMENTS))
    {
        weight.forward(&x)?
    } else {
        let dense = q.dequantize(x.device())?;
        candle_nn::Linear::new(dense, None).forward(&x)?
    };
    y.to_dtype(dtype)
}

/// `x Wᵀ` on load-time tiles: every row count. On AVX-512 VNNI they beat our one-row kernels and
/// candle's product from one row to a whole prompt chunk; on AVX2 (Q4_K, Q8_0) they match them
/// at one row (a large Q8_0 output head ran at 0.94×, within noise) and beat them 1.3–7× from
/// four rows on; Q6_K runs at 1.0–1.2× our one-row kernel up to 4 rows and 1.2–1.5× candle's
/// from 16; Q5_0 widened to Q8_0 runs at 0.9× its one-row kernel at one row (it reads 34
/// bytes per 32 weights for the file's 22), 1.2× at 4 rows, 1.8× at 16, and 2.7× the
/// dequantised GEMM at 128 (`examples/kquant_matmul.rs`, BENCHMARKS.md).
fn forward_tiles(
    (n, k): (usize, usize),
    x: &Tensor,
    product: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    if x.dims().last() != Some(&k) {
        candle_core::bail!("tiled linear: input {:?} vs weight [{n}, {k}]", x.dims());
    }
    let rows = x.elem_count() / k.max(1);
    let out = product(&x.flatten_all()?.to_vec1::<f32>()?, rows);
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, x.device())?.to_dtype(dtype)
}

/// Runs one of our block kernels: `product` gets the f32 input flattened and the weight's bytes
/// in the file's layout, and returns `[rows, n]`.
fn on_block_kernel(
    q: &QTensor,
    x: &Tensor,
    product: impl FnOnce(&[f32], &[u8]) -> Vec<f32>,
) -> Result<Tensor> {
    let (n, _) = q.shape().dims2()?;
    let data = q.data()?;
    let out = product(&x.flatten_all()?.to_vec1::<f32>()?, &data);
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, x.device())
}

/// `weight` converted to `dtype`; bf16 to f32 in parallel (candle's conversion is serial).
fn widen(weight: &Tensor, dtype: DType) -> Result<Tensor> {
    if weight.dtype() != DType::BF16 || dtype != DType::F32 || !weight.device().is_cpu() {
        return weight.to_dtype(dtype);
    }
    let weight = weight.contiguous()?;
    let (storage, layout) = weight.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::BF16(data)) = &*storage else {
        return weight.to_dtype(dtype);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return weight.to_dtype(dtype);
    };
    let mut out = vec![0f32; end - start];
    out.par_chunks_mut(1 << 16)
        .zip(data[start..end].par_chunks(1 << 16))
        .for_each(|(dst, src)| {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.widen();
            }
        });
    Tensor::from_vec(out, weight.shape(), weight.device())
}

/// `x [.., k] @ w[n, k]^T -> [.., n]` for a handful of rows of `x`.
struct SmallBatchMatmul;

impl CustomOp2 for SmallBatchMatmul {
    fn name(&self) -> &'static str {
        "small-batch-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        x_layout: &Layout,
        ws: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((w0, w1))) =
            (x_layout.contiguous_offsets(), w_layout.contiguous_offsets())
        else {
            candle_core::bail!("small-batch-matmul needs contiguous inputs")
        };
        let (n, k) = w_layout.shape().dims2()?;
        let x_dims = x_layout.shape().dims();
        if x_dims.last() != Some(&k) {
            candle_core::bail!(
                "small-batch-matmul: input {:?} vs weight [{n}, {k}]",
                x_dims
            );
        }
        let x: Vec<f32> = match xs {
            CpuStorage::F32(v) => v[x0..x1].to_vec(),
            CpuStorage::BF16(v) => v[x0..x1].iter().map(|h| h.to_f32()).collect(),
            _ => candle_core::bail!("small-batch-matmul: unsupported input dtype"),
        };
        let rows = x.len() / k;
        let out = match ws {
            CpuStorage::F32(w) => matmul_rows(&x, rows, &w[w0..w1], n, k),
            CpuStorage::BF16(w) => {
                match super::bf16_matmul::matmul_bf16(&x, rows, &w[w0..w1], n, k) {
                    Some(out) => out,
                    None => matmul_rows(&x, rows, &w[w0..w1], n, k),
                }
            }
            _ => candle_core::bail!("small-batch-matmul: unsupported weight dtype"),
        };
        let mut dims = x_dims.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let storage = match xs {
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(out.iter().map(|&v| bf16::from_f32(v)).collect())
            }
            _ => CpuStorage::F32(out),
        };
        Ok((storage, Shape::from(dims)))
    }
}

/// A weight element the kernel can widen to f32.
pub trait WeightElem: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// Sixteen consecutive weights widened to f32.
    ///
    /// # Safety
    /// AVX-512F must be available and `ptr..ptr + 16` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable f32 and AVX-512F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(ptr) }
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable bf16 (32 bytes) and AVX-512F. A bf16 is the
        // top half of an f32: zero-extend to 32 bits and shift left by 16.
        unsafe {
            let half = _mm256_loadu_si256(ptr.cast::<__m256i>());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        }
    }
}

/// The register-tiled AVX-512 kernel: tiles of up to 4 features × 4 rows keep 16 accumulators
/// in registers, so each 16-wide load of weights feeds 4 rows and each load of inputs feeds 4
/// features (the per-row dot products it replaces re-read every weight per row).
///
/// Every (row, feature) pair is computed the same way whatever its tile — one 16-lane
/// accumulator over `k` in steps of 16, a fixed reduction, then the tail — so a sequence's
/// output does not depend on which other sequences share the batch, as long as the batch stays
/// on this kernel (at most [`SMALL_BATCH_ROWS`] packed rows; longer steps go to candle's GEMM,
/// whose summation order differs).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::WeightElem;

    /// Input rows swept per pass over a task's weights (16 rows of 8960 f32 are 573 KB).
    const ROW_CHUNK: usize = 16;

    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_block<W: WeightElem>(
        x: &[f32],
        rows: usize,
        w: &[W],
        k: usize,
        out: &mut [f32],
    ) {
        let n = w.len() / k;
        assert!(x.len() >= rows * k && out.len() >= n * rows);
        // One row (plain decoding): 8 features per tile for enough independent FMA chains.
        let feature_tile = if rows == 1 { 8 } else { 4 };
        // Rows in chunks whose inputs stay in L2 while the task's weights are swept over them.
        for r0 in (0..rows).step_by(ROW_CHUNK) {
            let chunk_end = (r0 + ROW_CHUNK).min(rows);
            let mut o = 0;
            while o < n {
                let nf = (n - o).min(feature_tile);
                let mut r = r0;
                while r < chunk_end {
                    let nr = (chunk_end - r).min(4);
                    // SAFETY: o + nf <= n and r + nr <= rows, so every pointer the tile forms
                    // stays inside `w`, `x` and `out` (checked by the assert above).
                    unsafe { tiles(x, w, k, rows, out, o, nf, r, nr) };
                    r += nr;
                }
                o += nf;
            }
        }
    }

    /// Dispatches a tile of `nf` features × `nr` rows to its monomorphised kernel.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, reason = "the tile's coordinates")]
    unsafe fn tiles<W: WeightElem>(
        x: &[f32],
        w: &[W],
        k: usize,
        rows: usize,
        out: &mut [f32],
        o: usize,
        nf: usize,
        r: usize,
        nr: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match (nf, nr) {
                (8, 1) => tile::<W, 8, 1>(x, w, k, rows, out, o, r),
                (4, 4) => tile::<W, 4, 4>(x, w, k, rows, out, o, r),
                (4, 3) => tile::<W, 4, 3>(x, w, k, rows, out, o, r),
                (4, 2) => tile::<W, 4, 2>(x, w, k, rows, out, o, r),
                (4, 1) => tile::<W, 4, 1>(x, w, k, rows, out, o, r),
                (_, nr) => {
                    for f in 0..nf {
                        match nr {
                            4 => tile::<W, 1, 4>(x, w, k, rows, out, o + f, r),
                            3 => tile::<W, 1, 3>(x, w, k, rows, out, o + f, r),
                            2 => tile::<W, 1, 2>(x, w, k, rows, out, o + f, r),
                            _ => tile::<W, 1, 1>(x, w, k, rows, out, o + f, r),
                        }
                    }
                }
            }
        }
    }

    /// Features `o..o + NF` for rows `r..r + NR`, written to `out[feature * rows + row]`.
    #[inline(always)]
    #[allow(
        clippy::needless_range_loop,
        reason = "indexed loops over const-sized register arrays unroll into registers"
    )]
    unsafe fn tile<W: WeightElem, const NF: usize, const NR: usize>(
        x: &[f32],
        w: &[W],
        k: usize,
        rows: usize,
        out: &mut [f32],
        o: usize,
        r: usize,
    ) {
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let k16 = k / 16 * 16;
        // SAFETY (whole body): the caller guarantees features o..o+NF < n and rows r..r+NR <
        // rows, so offsets below stay within `w` ([n, k]) and `x` ([rows, k]); AVX-512F is on.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR]; NF];
            let mut i = 0;
            while i < k16 {
                let mut wv = [_mm512_setzero_ps(); NF];
                for (f, v) in wv.iter_mut().enumerate() {
                    *v = W::load16(wp.add((o + f) * k + i));
                }
                for rr in 0..NR {
                    let xv = _mm512_loadu_ps(xp.add((r + rr) * k + i));
                    for f in 0..NF {
                        acc[f][rr] = _mm512_fmadd_ps(xv, wv[f], acc[f][rr]);
                    }
                }
                i += 16;
            }
            for f in 0..NF {
                for rr in 0..NR {
                    let mut sum = _mm512_reduce_add_ps(acc[f][rr]);
                    for j in k16..k {
                        sum += *xp.add((r + rr) * k + j) * (*wp.add((o + f) * k + j)).widen();
                    }
                    out[(o + f) * rows + r + rr] = sum;
                }
            }
        }
    }
}

/// `out[r, o] = sum_i x[r, i] * w[o, i]`, rows of `x` being `k` long, `w` being `[n, k]`.
pub fn matmul_rows<W: WeightElem>(x: &[f32], rows: usize, w: &[W], n: usize, k: usize) -> Vec<f32> {
    if rows == 0 || n == 0 {
        return Vec::new();
    }
    // Computed feature-major so each task owns a contiguous slice; transposed after if needed.
    let mut out_t = vec![0f32; n * rows];
    out_t
        .par_chunks_mut(FEATURES_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * FEATURES_PER_TASK;
            let features = chunk.len() / rows;
            let w_block = &w[first * k..(first + features) * k];
            dot_block(x, rows, w_block, k, chunk);
        });
    if rows == 1 {
        return out_t;
    }
    let mut out = vec![0f32; n * rows];
    for o in 0..n {
        for r in 0..rows {
            out[r * n + o] = out_t[o * rows + r];
        }
    }
    out
}

/// Dispatches to the widest vector unit this CPU has (checked at run time).
fn dot_block<W: WeightElem>(x: &[f32], rows: usize, w: &[W], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { dot_block_avx512(x, rows, w, k, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_block_avx2(x, rows, w, k, out) };
        }
    }
    dot_block_generic(x, rows, w, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_block_avx512<W: WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    k: usize,
    out: &mut [f32],
) {
    // SAFETY: the caller checked AVX-512F; slices are bounds-checked inside.
    unsafe { avx512::dot_block(x, rows, w, k, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_avx2<W: WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    k: usize,
    out: &mut [f32],
) {
    dot_block_generic(x, rows, w, k, out)
}

/// The portable kernel (and AVX2): each weight row is read from memory once and used for every
/// input row while in L1.
#[inline(always)]
fn dot_block_generic<W: WeightElem>(x: &[f32], rows: usize, w: &[W], k: usize, out: &mut [f32]) {
    for (o, w_row) in w.chunks_exact(k).enumerate() {
        for r in 0..rows {
            out[o * rows + r] = dot(&x[r * k..(r + 1) * k], w_row);
        }
    }
}

const LANES: usize = 32;

/// A dot product with independent lane accumulators, which the compiler vectorises (a single
/// running sum would serialise on the add latency).
#[inline(always)]
fn dot<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    let mut acc = [0f32; LANES];
    let x_chunks = x.chunks_exact(LANES);
    let w_chunks = w.chunks_exact(LANES);
    let (x_rest, w_rest) = (x_chunks.remainder(), w_chunks.remainder());
    for (xc, wc) in x_chunks.zip(w_chunks) {
        for i in 0..LANES {
            acc[i] += xc[i] * wc[i].widen();
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in x_rest.iter().zip(w_rest) {
        sum += a * b.widen();
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(x: &Tensor, w: &Tensor) -> Vec<f32> {
        let x = x.to_dtype(DType::F32).unwrap();
        let w = w.to_dtype(DType::F32).unwrap();
        x.broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn small_batch_kernel_matches_matmul() {
        let dev = Device::Cpu;
        for (rows, k, n) in [
            (1, 64, 130),
            (1, 1000, 7),
            (3, 37, 200),
            (8, 96, 65),
            (5, 70, 33),
            (13, 64, 17),
            (64, 100, 9),
        ] {
            for dtype in [DType::F32, DType::BF16] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let layer = Linear::new(w.clone(), None);
                assert!(layer.takes_small_batch_kernel(&x));
                let ours: Vec<f32> = layer
                    .forward(&x)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let expected = reference(&x, &w);
                // bf16 output rounding is relative 2^-8; f32 differs only by summation order.
                let tol = if dtype == DType::BF16 { 1e-2 } else { 1e-4 };
                for (a, b) in ours.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(1.0),
                        "{rows}x{k}x{n} {dtype:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// A row's output is bit-identical whether it is computed alone or among other rows, at any
    /// position of the batch (what makes batched serving give each request's own tokens).
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let (k, n) = (1000, 37);
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let layer = Linear::new(w, None);
            let xs = Tensor::randn(0f32, 1.0, (1, 64, k), &dev).unwrap();
            let row = |t: &Tensor, i: usize| -> Vec<f32> {
                t.get(0).unwrap().get(i).unwrap().to_vec1().unwrap()
            };
            let alone: Vec<Vec<f32>> = (0..64)
                .map(|i| row(&layer.forward(&xs.narrow(1, i, 1).unwrap()).unwrap(), 0))
                .collect();
            for batch in [2, 3, 4, 5, 7, 16, 17, 64] {
                let out = layer.forward(&xs.narrow(1, 0, batch).unwrap()).unwrap();
                for (i, want) in alone.iter().enumerate().take(batch) {
                    assert_eq!(&row(&out, i), want, "{dtype:?}: row {i} of {batch}");
                }
            }
        }
    }

    /// A bf16 layer packed into tiles (AVX512-BF16 or AVX2 CPUs) computes the unpacked layer's
    /// product up to f32 summation order, with its bias, whatever the batch; elsewhere packing
    /// leaves it as it is.
    #[test]
    fn packed_bf16_layers_give_the_unpacked_products() {
        let dev = Device::Cpu;
        let (k, n) = (301, 45);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let plain = Linear::new(w, Some(b));
        let mut packed = plain.clone();
        packed.pack_bf16().unwrap();
        assert_eq!(
            packed.dense_weight().is_none(),
            crate::layers::bf16_tiles::available()
        );
        let xs = Tensor::randn(0f32, 1.0, (1, 40, k), &dev).unwrap();
        let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let want = flat(plain.forward(&xs).unwrap());
        let got = flat(packed.forward(&xs).unwrap());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        for rows in [1, 3, 8, 9, 17] {
            let part = flat(packed.forward(&xs.narrow(1, 0, rows).unwrap()).unwrap());
            assert_eq!(part, got[..rows * n], "first {rows} rows");
        }
    }

    #[test]
    fn bias_is_added_and_long_inputs_use_gemm() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 16), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let layer = Linear::new(w.clone(), Some(b.clone()));
        for rows in [1, 300] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 16), &dev).unwrap();
            assert_eq!(layer.takes_small_batch_kernel(&x), rows <= SMALL_BATCH_ROWS);
            let ours: Vec<f32> = layer
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let expected = x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (a, e) in ours.iter().zip(&expected) {
                assert!((a - e).abs() < 1e-4);
            }
        }
    }

    /// Every route a quantized product takes (one row, 2–16 rows, a chunk, a long chunk; Q8_0,
    /// a k-quant and Q5_0, which candle computes in scalar code) gives the product of the
    /// dequantised weight up to activation rounding; within a route a row's bits do not depend
    /// on the batch.
    #[test]
    fn quantized_products_agree_across_row_counts_and_types() {
        use crate::layers::block_tiles::available_for;
        let tiles_for = |dtype| TileFormat::from_ggml(dtype).is_some_and(available_for);
        let dev = Device::Cpu;
        let (n, k) = (48, 256);
        let dense = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5_0] {
            let q = Arc::new(QTensor::quantize(&dense, dtype).unwrap());
            let dequantised = q.dequantize(&dev).unwrap();
            let mut layer = Linear::new(dense.clone(), None);
            layer.set_quantized(q).unwrap();
            assert_eq!(layer.quantized_dtype(), Some(dtype));
            let long = SMALL_BATCH_ROWS + 4;
            let x = Tensor::randn(0f32, 1.0, (1, long, k), &dev).unwrap();
            let exact = reference(&x, &dequantised);
            let alone_rows = 20;
            let alone: Vec<f32> = (0..alone_rows)
                .flat_map(|r| {
                    layer
                        .forward(&x.narrow(1, r, 1).unwrap())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect();
            let mut tiled: Option<Vec<f32>> = None;
            for rows in [
                1,
                BLOCK_GEMV_ROWS,
                5,
                9,
                QUANTIZED_GEMV_ROWS,
                17,
                alone_rows,
                long,
            ] {
                let part = x.narrow(1, 0, rows).unwrap();
                let got: Vec<f32> = layer
                    .forward(&part)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got.len(), rows * n);
                // Routes: Q4_K and Q8_0 the load-time tiles with AVX2 or AVX-512 VNNI, Q5_0 with
                // AVX2 but not VNNI (a row's bits as alone at any count); without them Q4_K
                // ours up to 4 rows and candle's past, this small Q8_0 matrix candle's up to 16
                // rows and the dequantised GEMM past; Q5_0 with VNNI ours up to 8 and the
                // per-unit tiles past (without AVX2, ours up to 16).
                let tiles = q8_tiles::available();
                let (one_row_route, tiles_route) = match dtype {
                    _ if tiles_for(dtype) => (rows <= alone_rows, false),
                    GgmlDType::Q4K => (rows <= BLOCK_GEMV_ROWS, false),
                    GgmlDType::Q5_0 if tiles => {
                        (rows <= Q5_0_ROW_KERNEL_ROWS, rows > Q5_0_ROW_KERNEL_ROWS)
                    }
                    _ => (rows <= QUANTIZED_GEMV_ROWS, false),
                };
                if one_row_route {
                    // Within our kernels a row gets the bits it gets alone.
                    assert_eq!(got, alone[..rows * n], "{dtype:?} rows {rows}");
                }
                if tiles_route {
                    // ... and on the tiles the bits it gets in any other tiled batch.
                    match &tiled {
                        Some(first) => {
                            assert_eq!(got[..first.len()], first[..], "{dtype:?} tiled rows {rows}")
                        }
                        None => tiled = Some(got.clone()),
                    }
                }
                for (i, (a, b)) in got.iter().zip(&exact).enumerate() {
                    // |x·w| sums 256 products of ~0.05·1: 8-bit activations move it by < 2 %.
                    assert!(
                        (a - b).abs() < 0.05,
                        "{dtype:?} rows {rows} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }
}
