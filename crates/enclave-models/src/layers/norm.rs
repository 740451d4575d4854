//! RMSNorm.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Root-mean-square normalisation with a learned scale; the statistics are accumulated in f32
/// whatever the compute dtype, as in the reference implementation.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps: eps as f32,
        })
    }

    /// Gemma's form, `x̂ · (offset + w)`: the stored weight is a difference from `offset` (1 in
    /// Hugging Face checkpoints; 0 in GGUF files, whose converter adds the 1 in).
    pub fn with_offset(size: usize, eps: f64, offset: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        let weight = if offset == 0.0 {
            weight
        } else {
            // In f32, as the reference computes `1.0 + self.weight.float()`.
            (weight.to_dtype(candle_core::DType::F32)? + offset)?.to_dtype(weight.dtype())?
        };
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps)
    }
}
