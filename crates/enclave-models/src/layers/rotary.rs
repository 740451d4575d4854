//! Rotary position embeddings, with the `rope_scaling` variants of Hugging Face `transformers`.
//!
//! The cos/sin values are computed per forward for exactly the positions it covers (a few
//! hundred multiplications for a decode step), so no table sized by the maximum context is kept
//! and dynamic NTK scaling, which depends on the sequence length, needs no special path.

use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

/// How rotary frequencies are scaled for long contexts (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (position interpolation).
    Linear {
        factor: f64,
    },
    /// NTK-aware base growth once the sequence passes `original_max`.
    Dynamic {
        factor: f64,
        original_max: usize,
    },
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: usize,
    },
    /// YaRN (DeepSeek-V2/V3): interpolated low frequencies, extrapolated high ones, a linear
    /// ramp between, and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// `attention_factor`, or derived from `mscale`/`mscale_all_dim` as the reference does.
        attention_factor: f64,
        truncate: bool,
    },
}

/// YaRN's magnitude correction, `0.1 · mscale · ln(factor) + 1` (1 when not extending).
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

impl RopeScaling {
    /// Parses `rope_scaling` (`null`, or an object with `rope_type` or the older `type`).
    /// Errors name the offending key.
    pub fn from_hf(
        value: Option<&Value>,
        max_position_embeddings: usize,
    ) -> std::result::Result<Self, String> {
        let Some(obj) = value.and_then(Value::as_object) else {
            return Ok(Self::None);
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .ok_or("rope_scaling: missing `rope_type`")?;
        let num = |key: &str| -> std::result::Result<f64, String> {
            obj.get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("rope_scaling.{key}: missing or not a number"))
        };
        let original_max = obj
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|v| v as usize);
        match kind {
            "default" => Ok(Self::None),
            "linear" => Ok(Self::Linear {
                factor: num("factor")?,
            }),
            "dynamic" => Ok(Self::Dynamic {
                factor: num("factor")?,
                original_max: original_max.unwrap_or(max_position_embeddings),
            }),
            "llama3" => Ok(Self::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max: original_max
                    .ok_or("rope_scaling.original_max_position_embeddings: missing")?,
            }),
            "yarn" => {
                let factor = num("factor")?;
                let opt = |key: &str| obj.get(key).and_then(Value::as_f64).filter(|v| *v != 0.0);
                let attention_factor = match (opt("attention_factor"), opt("mscale"), opt("mscale_all_dim")) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(m_all)) => yarn_mscale(factor, m) / yarn_mscale(factor, m_all),
                    _ => yarn_mscale(factor, 1.0),
                };
                Ok(Self::Yarn {
                    factor,
                    original_max: original_max.unwrap_or(max_position_embeddings),
                    beta_fast: opt("beta_fast").unwrap_or(32.0),
                    beta_slow: opt("beta_slow").unwrap_or(1.0),
                    attention_factor,
                    truncate: obj.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                })
            }
            other => Err(format!(
                "rope_scaling.rope_type: {other:?} is not supported (default, linear, dynamic, llama3, yarn)"
            )),
        }
    }
}

/// Rotary embedding for one head dimension; applies the "rotate half" (GPT-NeoX) layout that
/// Llama and Qwen2 checkpoints use.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    dim: usize,
    base: f64,
    scaling: RopeScaling,
    inv_freq: Vec<f32>,
}

impl RotaryEmbedding {
    pub fn new(dim: usize, base: f64, scaling: RopeScaling) -> Self {
        let mut inv_freq = default_inv_freq(dim, base);
        match scaling {
            RopeScaling::Linear { factor } => {
                for f in &mut inv_freq {
                    *f = (*f as f64 / factor) as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max,
            } => {
                let old = original_max as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                for f in &mut inv_freq {
                    let freq = *f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen > low_freq_wavelen {
                        freq / factor
                    } else if wavelen < high_freq_wavelen {
                        freq
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                    *f = scaled as f32;
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                inv_freq = yarn_inv_freq(
                    dim,
                    base,
                    factor,
                    original_max,
                    beta_fast,
                    beta_slow,
                    truncate,
                );
            }
            RopeScaling::None | RopeScaling::Dynamic { .. } => {}
        }
        Self {
            dim,
            base,
            scaling,
            inv_freq,
        }
    }

    /// `(cos, sin)`, each `[len, dim / 2]`, for positions `start..start + len`.
    pub fn cos_sin(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let dynamic;
        let inv_freq = match self.scaling {
            RopeScaling::Dynamic {
                factor,
                original_max,
            } if start + len > original_max => {
                // transformers: base * ((factor * seq_len / max) - (factor - 1)) ^ (dim / (dim - 2)).
                let seq_len = (start + len) as f64;
                let d = self.dim as f64;
                let base = self.base
                    * ((factor * seq_len / original_max as f64) - (factor - 1.0))
                        .powf(d / (d - 2.0));
                dynamic = default_inv_freq(self.dim, base);
                &dynamic
            }
            _ => &self.inv_freq,
        };
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in start..start + len {
            for &f in inv_freq {
                // f32 product, as the reference computes `inv_freq @ position_ids` in float32.
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        if let RopeScaling::Yarn {
            attention_factor, ..
        } = self.scaling
        {
            let a = attention_factor as f32;
            cos.iter_mut().chain(sin.iter_mut()).for_each(|v| *v *= a);
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates `xs` (`[batch, heads, len, dim]`, contiguous) by the given cos/sin.
    pub fn apply(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&xs.contiguous()?, cos, sin)
    }

    /// Rotates adjacent pairs `(x[2i], x[2i+1])` (the GPT-J / complex-number layout DeepSeek's
    /// checkpoints use) instead of the two halves.
    pub fn apply_interleaved(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_i(&xs.contiguous()?, cos, sin)
    }
}

/// YaRN inverse frequencies, step for step as transformers' `_compute_yarn_parameters` (f32).
fn yarn_inv_freq(
    dim: usize,
    base: f64,
    factor: f64,
    original_max: usize,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
) -> Vec<f32> {
    let correction_dim = |rotations: f64| {
        (dim as f64 * (original_max as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln())
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0) as f32;
    let mut high = high.min(dim as f64 - 1.0) as f32;
    if low == high {
        high += 0.001; // as the reference: avoids a zero-width ramp
    }
    (0..dim)
        .step_by(2)
        .enumerate()
        .map(|(i, d)| {
            let pos_freq = (base as f32).powf(d as f32 / dim as f32);
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor as f32 * pos_freq);
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_weight = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight
        })
        .collect()
}

fn default_inv_freq(dim: usize, base: f64) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| {
            let exponent = i as f32 / dim as f32;
            1.0 / (base as f32).powf(exponent)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let plain = RotaryEmbedding::new(64, 500000.0, RopeScaling::None);
        let scaled = RotaryEmbedding::new(
            64,
            500000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max: 8192,
            },
        );
        // The highest frequency (wavelength 2π) is untouched, the lowest is divided by 8.
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        let ratio = plain.inv_freq[last] / scaled.inv_freq[last];
        assert!((ratio - 8.0).abs() < 1e-4, "ratio {ratio}");
    }

    #[test]
    fn dynamic_scaling_changes_frequencies_only_past_the_original_context() {
        let rope = RotaryEmbedding::new(
            16,
            10000.0,
            RopeScaling::Dynamic {
                factor: 2.0,
                original_max: 32,
            },
        );
        let plain = RotaryEmbedding::new(16, 10000.0, RopeScaling::None);
        let dev = Device::Cpu;
        let (a, _) = rope.cos_sin(0, 32, DType::F32, &dev).unwrap();
        let (b, _) = plain.cos_sin(0, 32, DType::F32, &dev).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let (a, _) = rope.cos_sin(0, 64, DType::F32, &dev).unwrap();
        let (b, _) = plain.cos_sin(0, 64, DType::F32, &dev).unwrap();
        assert_ne!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn unknown_scaling_type_is_an_error_naming_the_key() {
        let v: Value = serde_json::json!({"rope_type": "yarnish", "factor": 2.0});
        let err = RopeScaling::from_hf(Some(&v), 128).unwrap_err();
        assert!(err.contains("rope_scaling.rope_type"), "{err}");
    }
}
