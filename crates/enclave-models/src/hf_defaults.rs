//! Defaults `transformers` applies when a `config.json` leaves a field out, shared by the
//! architectures whose config classes agree on them (Llama, Qwen2, DeepSeek-V2/V3).

pub(crate) fn rms_norm_eps() -> f64 {
    1e-6
}

pub(crate) fn rope_theta() -> f64 {
    10000.0
}

pub(crate) fn hidden_act() -> String {
    "silu".into()
}
