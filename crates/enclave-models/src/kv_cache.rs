//! The paged KV cache: fixed-size blocks of token slots in one pool per layer, addressed through
//! each sequence's block table.
//!
//! A model writes the keys and values (or MLA latents) of the tokens it runs into the slots the
//! caller's block tables name, and reads a sequence's context back through the same table, so
//! sequences can share blocks (a common prefix) and the caller decides which blocks exist. The
//! model never allocates blocks; the serving engine's block manager does. [`KvCache`] is the
//! single-sequence convenience on top: it owns a pool that grows as the sequence does.

use candle_core::{DType, Device, Result, Tensor};

/// What one cached token holds per layer: two rows of `k_width` and `v_width` values
/// (keys and values; for MLA the latent and the rotary key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub k_width: usize,
    pub v_width: usize,
    pub dtype: DType,
}

impl KvLayout {
    /// Bytes one cached token occupies over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.num_layers * (self.k_width + self.v_width) * self.dtype.size_in_bytes()
    }
}

/// Block pools of every layer: `[num_blocks * block_size, width]` tensors, written in place.
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    layout: KvLayout,
    block_size: usize,
    num_blocks: usize,
    layers: Vec<(Tensor, Tensor)>,
    device: Device,
}

impl PagedKvCache {
    /// Allocates `num_blocks` blocks of `block_size` token slots.
    pub fn new(
        layout: KvLayout,
        block_size: usize,
        num_blocks: usize,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 {
            candle_core::bail!("kv cache block size must be positive");
        }
        let slots = block_size * num_blocks;
        let layers = (0..layout.num_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((slots, layout.k_width), layout.dtype, device)?,
                    Tensor::zeros((slots, layout.v_width), layout.dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layout,
            block_size,
            num_blocks,
            layers,
            device: device.clone(),
        })
    }

    /// As many blocks as fit in `bytes`.
    pub fn with_budget(
        layout: KvLayout,
        block_size: usize,
        bytes: usize,
        device: &Device,
    ) -> Result<Self> {
        let per_block = layout.bytes_per_token() * block_size;
        Self::new(layout, block_size, bytes / per_block.max(1), device)
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes of each block over all layers.
    pub fn bytes_per_block(&self) -> usize {
        self.layout.bytes_per_token() * self.block_size
    }

    /// Bytes each token slot occupies in the pools actually allocated, summed over layers.
    pub fn stored_bytes_per_token(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| {
                (k.dim(1).unwrap_or(0) + v.dim(1).unwrap_or(0)) * k.dtype().size_in_bytes()
            })
            .sum()
    }

    /// Grows the pools to `num_blocks`, keeping what the existing blocks hold.
    pub fn grow(&mut self, num_blocks: usize) -> Result<()> {
        if num_blocks <= self.num_blocks {
            return Ok(());
        }
        let bigger = Self::new(self.layout, self.block_size, num_blocks, &self.device)?;
        for ((old_k, old_v), (new_k, new_v)) in self.layers.iter().zip(&bigger.layers) {
            new_k.slice_set(old_k, 0, 0)?;
            new_v.slice_set(old_v, 0, 0)?;
        }
        *self = bigger;
        Ok(())
    }

    /// Slot indices of positions `start..end` of a sequence with `block_table`.
    pub(crate) fn slots(&self, block_table: &[u32], start: usize, end: usize) -> Result<Vec<u32>> {
        let bs = self.block_size;
        (start..end)
            .map(|pos| {
                let block = *block_table.get(pos / bs).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "block table of {} blocks does not cover position {pos}",
                        block_table.len()
                    ))
                })? as usize;
                if block >= self.num_blocks {
                    candle_core::bail!(
                        "block {block} is outside the cache ({} blocks)",
                        self.num_blocks
                    );
                }
                Ok((block * bs + pos % bs) as u32)
            })
            .collect()
    }

    /// Writes `k` and `v` (`[n, width]`) of positions `start..start + n` and returns both for
    /// positions `0..start + n` (`[start + n, width]`, gathered through the block table).
    pub(crate) fn write_and_gather(
        &self,
        layer: usize,
        block_table: &[u32],
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.write(layer, block_table, start, k, v)?;
        self.gather(layer, block_table, start + k.dim(0)?)
    }

    /// Keys and values of positions `0..end` (`[end, width]`, gathered through the block table).
    pub(crate) fn gather(
        &self,
        layer: usize,
        block_table: &[u32],
        end: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (k_pool, v_pool) = self.pools(layer)?;
        let slots = Tensor::new(self.slots(block_table, 0, end)?, k_pool.device())?;
        Ok((
            k_pool.index_select(&slots, 0)?,
            v_pool.index_select(&slots, 0)?,
        ))
    }

    /// Writes `k` and `v` (`[n, width]`) of positions `start..start + n` into their slots.
    pub(crate) fn write(
        &self,
        layer: usize,
        block_table: &[u32],
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let (k_pool, v_pool) = self.pools(layer)?;
        let end = start + k.dim(0)?;
        let k = k.to_dtype(self.layout.dtype)?.contiguous()?;
        let v = v.to_dtype(self.layout.dtype)?.contiguous()?;
        // Runs of consecutive positions inside one block are consecutive slots: one in-place
        // copy per run.
        let mut pos = start;
        while pos < end {
            let run = (self.block_size - pos % self.block_size).min(end - pos);
            let slot = self.slots(block_table, pos, pos + 1)?[0] as usize;
            k_pool.slice_set(&k.narrow(0, pos - start, run)?, 0, slot)?;
            v_pool.slice_set(&v.narrow(0, pos - start, run)?, 0, slot)?;
            pos += run;
        }
        Ok(())
    }

    fn pools(&self, layer: usize) -> Result<&(Tensor, Tensor)> {
        self.layers
            .get(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("kv cache has no layer {layer}")))
    }

    /// Runs `f` on the layer's key and value pools as `[slots, width]` slices, when they are
    /// f32 in CPU memory (`None` otherwise).
    pub(crate) fn with_f32_pools<R>(
        &self,
        layer: usize,
        f: impl FnOnce(&[f32], &[f32]) -> R,
    ) -> Result<Option<R>> {
        let (k_pool, v_pool) = self.pools(layer)?;
        let (k_storage, k_layout) = k_pool.storage_and_layout();
        let (v_storage, v_layout) = v_pool.storage_and_layout();
        let (
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(k)),
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)),
        ) = (&*k_storage, &*v_storage)
        else {
            return Ok(None);
        };
        let (Some((k0, k1)), Some((v0, v1))) =
            (k_layout.contiguous_offsets(), v_layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        Ok(Some(f(&k[k0..k1], &v[v0..v1])))
    }
}

/// One sequence's share of a batched forward: its new tokens, the position of the first, and
/// the blocks that hold (or will hold) positions `0..start + tokens.len()`.
#[derive(Debug, Clone, Copy)]
pub struct SeqSlice<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub block_table: &'a [u32],
    /// With [`crate::Logits::Marked`], return logits for every token of this slice, not only
    /// its last (prompt log-probabilities).
    pub all_logits: bool,
}

/// A single sequence's cache: a paged pool it owns alone, grown (doubling) as the sequence does,
/// with blocks in order. For one-off generation and tests; serving shares one pool among many.
#[derive(Debug, Clone)]
pub struct KvCache {
    layout: KvLayout,
    device: Device,
    paged: Option<PagedKvCache>,
    table: Vec<u32>,
    len: usize,
}

/// Block size of a single-sequence cache.
const SINGLE_BLOCK_SIZE: usize = 16;
/// Blocks a single-sequence cache starts with (64 tokens).
const SINGLE_MIN_BLOCKS: usize = 4;

impl KvCache {
    /// An empty cache; memory is allocated by the first forward.
    pub fn new(layout: KvLayout, device: &Device) -> Self {
        Self {
            layout,
            device: device.clone(),
            paged: None,
            table: Vec::new(),
            len: 0,
        }
    }

    /// Positions already cached (the offset of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything past `len` positions (e.g. to re-run a suffix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `n` more tokens and returns the pool and block table to run them with.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(&PagedKvCache, &[u32])> {
        let needed = (self.len + n).div_ceil(SINGLE_BLOCK_SIZE);
        let have = self.paged.as_ref().map_or(0, PagedKvCache::num_blocks);
        if needed > have {
            let blocks = needed.next_power_of_two().max(SINGLE_MIN_BLOCKS);
            match &mut self.paged {
                Some(paged) => paged.grow(blocks)?,
                None => {
                    self.paged = Some(PagedKvCache::new(
                        self.layout,
                        SINGLE_BLOCK_SIZE,
                        blocks,
                        &self.device,
                    )?)
                }
            }
        }
        self.table = (0..needed as u32).collect();
        let Some(paged) = &self.paged else {
            candle_core::bail!("kv cache pool missing after allocation");
        };
        Ok((paged, &self.table))
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes each cached token occupies in the buffers actually allocated (summed over layers;
    /// `None` before the first forward).
    pub fn stored_bytes_per_token(&self) -> Option<usize> {
        self.paged
            .as_ref()
            .map(PagedKvCache::stored_bytes_per_token)
    }
}
