//! `generation_config.json`: stop token ids and the model author's default sampling.

use std::path::Path;

use serde_json::Value;

use crate::error::Result;
use crate::sampler::SamplingParams;
use crate::tokenizer::read_json;

/// The parts of `generation_config.json` that matter for serving.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Token ids that end generation (`eos_token_id`: an int or a list).
    pub eos_token_ids: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` from a model folder; absent file means all defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        Ok(Self::from_json(&read_json(&path)?))
    }

    pub fn from_json(v: &Value) -> Self {
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_u64)
                .map(|n| n as u32)
                .collect(),
            _ => Vec::new(),
        };
        let f32_field = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        Self {
            eos_token_ids,
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: f32_field("temperature"),
            top_p: f32_field("top_p"),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|x| x as usize),
            repetition_penalty: f32_field("repetition_penalty"),
            max_new_tokens: v
                .get("max_new_tokens")
                .and_then(Value::as_u64)
                .map(|x| x as usize),
        }
    }

    /// The model author's recommended sampling (what a request gets when it says nothing):
    /// greedy when `do_sample` is false, otherwise their temperature/top-p/top-k.
    pub fn default_sampling(&self) -> SamplingParams {
        let mut params = SamplingParams::default();
        if self.do_sample == Some(false) {
            return SamplingParams::greedy();
        }
        if let Some(t) = self.temperature {
            params.temperature = t;
        }
        if let Some(p) = self.top_p {
            params.top_p = p;
        }
        if let Some(k) = self.top_k {
            params.top_k = k;
        }
        if let Some(r) = self.repetition_penalty {
            params.repetition_penalty = r;
        }
        params
    }
}
