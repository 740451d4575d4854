//! The KV cache of one sequence, owned by the caller and passed to every forward.
//!
//! Each layer keeps one key and one value buffer of shape `[1, kv_heads, capacity, head_dim]`
//! written in place; capacity doubles when full (amortised O(1) per token, never a copy of the
//! whole cache per step as `Tensor::cat` would do).

use candle_core::{DType, Result, Tensor};

/// Cached keys and values of one layer.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    buffers: Option<(Tensor, Tensor)>,
}

const MIN_CAPACITY: usize = 64;

impl LayerKv {
    /// Writes `k` and `v` (`[1, heads, n, dim]`; the two may differ in heads and dim, as MLA's
    /// latent and rotary key do) at `offset` and returns both for positions `0..offset + n`,
    /// contiguous.
    pub fn append(&mut self, offset: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, heads, n, dim) = k.dims4()?;
        let (_, v_heads, _, v_dim) = v.dims4()?;
        let needed = offset + n;
        let capacity = self
            .buffers
            .as_ref()
            .map(|(k, _)| k.dim(2))
            .transpose()?
            .unwrap_or(0);
        if needed > capacity {
            let new_capacity = needed.next_power_of_two().max(MIN_CAPACITY);
            let k_buf = Tensor::zeros((b, heads, new_capacity, dim), k.dtype(), k.device())?;
            let v_buf = Tensor::zeros((b, v_heads, new_capacity, v_dim), v.dtype(), v.device())?;
            if let Some((old_k, old_v)) = &self.buffers {
                k_buf.slice_set(&old_k.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
                v_buf.slice_set(&old_v.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
            }
            self.buffers = Some((k_buf, v_buf));
        }
        let Some((k_buf, v_buf)) = &self.buffers else {
            candle_core::bail!("kv buffers missing after allocation")
        };
        k_buf.slice_set(&k.contiguous()?, 2, offset)?;
        v_buf.slice_set(&v.contiguous()?, 2, offset)?;
        Ok((
            k_buf.narrow(2, 0, needed)?.contiguous()?,
            v_buf.narrow(2, 0, needed)?.contiguous()?,
        ))
    }
}

/// Keys and values of every layer of one sequence, and how many positions they hold.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
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

    pub(crate) fn layer_mut(&mut self, index: usize) -> Option<&mut LayerKv> {
        self.layers.get_mut(index)
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets everything past `len` positions (e.g. to re-run a suffix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes each cached token occupies in the buffers actually allocated (summed over layers;
    /// `None` before the first forward).
    pub fn stored_bytes_per_token(&self) -> Option<usize> {
        let mut total = 0;
        for layer in &self.layers {
            let (k, v) = layer.buffers.as_ref()?;
            for t in [k, v] {
                let dims = t.dims();
                total += dims.iter().product::<usize>()
                    / dims.get(2).copied().filter(|&c| c > 0)?
                    * t.dtype().size_in_bytes();
            }
        }
        Some(total)
    }

    /// Bytes of key/value storage per cached token for a model of this shape and dtype.
    pub fn bytes_per_token(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        2 * num_layers * kv_heads * head_dim * dtype.size_in_bytes()
    }
}
