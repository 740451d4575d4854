//! The gated feed-forward block (SwiGLU and its relatives).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::activation::{Gate, GatedProduct};
use super::linear::Linear;

/// The activation named by `hidden_act` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
    Gelu,
}

impl Activation {
    /// Parses a Hugging Face `hidden_act` value.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(xs),
            Self::GeluTanh => xs.gelu(),
            Self::Gelu => xs.gelu_erf(),
        }
    }

    /// `act(gate) · up`: fused and vectorized for f32 on the CPU (`layers/activation.rs`).
    pub(crate) fn gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let fused = match self {
            Self::Silu => Some(Gate::Silu),
            Self::GeluTanh => Some(Gate::GeluTanh),
            Self::Gelu => None,
        };
        match fused {
            Some(kind)
                if gate.device().is_cpu()
                    && gate.dtype() == DType::F32
                    && up.dtype() == DType::F32 =>
            {
                gate.contiguous()?
                    .apply_op2_no_bwd(&up.contiguous()?, &GatedProduct(kind))
            }
            _ => self.apply(gate)? * up,
        }
    }
}

/// `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl GatedMlp {
    pub fn new(
        hidden: usize,
        intermediate: usize,
        bias: bool,
        act: Activation,
        activations: candle_core::DType,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::load(hidden, intermediate, bias, activations, vb.pp("gate_proj"))?,
            up_proj: Linear::load(hidden, intermediate, bias, activations, vb.pp("up_proj"))?,
            down_proj: Linear::load(intermediate, hidden, bias, activations, vb.pp("down_proj"))?,
            act,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?;
        let up = self.up_proj.forward(xs)?;
        self.down_proj.forward(&self.act.gated(&gate, &up)?)
    }
}

impl GatedMlp {
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }

    pub(crate) fn weight_bytes(&self, linear: &dyn Fn(&Linear) -> usize) -> usize {
        linear(&self.gate_proj) + linear(&self.up_proj) + linear(&self.down_proj)
    }
}
