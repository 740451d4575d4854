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

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps)
    }
}
