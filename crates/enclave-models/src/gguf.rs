//! GGUF files (llama.cpp's format): metadata turned into the Hugging Face `config.json` our
//! architectures already parse, and tensors served under their Hugging Face names.
//!
//! Tensors are served dequantised to the compute dtype (F32, F16, BF16, Q8_0, Q4_0, Q4_K,
//! Q5_K, Q6_K and the other types candle reads); block-quantized matrices are also kept as they
//! are in a [`QuantizedWeights`] stash, which the model swaps in for its linear layers after
//! building, so products run on the quantized blocks as in llama.cpp. The name map mirrors
//! llama.cpp's `convert_hf_to_gguf.py` (`gguf-py`'s `TensorNameMap`).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use serde_json::{json, Value};

use crate::error::{ModelError, Result};

/// An open GGUF file: its metadata and tensor directory (the data is read on demand).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            message: read_error_message(&e.to_string()),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, GgufValue> {
        &self.content.metadata
    }

    /// `general.architecture` (`llama`, `qwen2`, …).
    pub fn architecture(&self) -> Result<&str> {
        self.string("general.architecture")?
            .ok_or_else(|| self.error("general.architecture is missing"))
    }

    fn error(&self, message: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.as_str()))
                .map_err(|_| self.error(format!("{key} must be a string"))),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => number(v)
                .map(Some)
                .ok_or_else(|| self.error(format!("{key} must be a number"))),
        }
    }

    fn required(&self, key: &str) -> Result<f64> {
        self.number(key)?
            .ok_or_else(|| self.error(format!("{key} is missing")))
    }

    /// The Hugging Face `config.json` equivalent of the metadata.
    pub fn hf_config(&self) -> Result<Value> {
        let arch = self.architecture()?;
        let hf_arch = match arch {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "gemma3" => "Gemma3ForCausalLM",
            // V3's sigmoid router (gating function 2) tells the generations apart.
            "deepseek2" if self.number("deepseek2.expert_gating_func")? == Some(2.0) => {
                "DeepseekV3ForCausalLM"
            }
            "deepseek2" => "DeepseekV2ForCausalLM",
            other => {
                return Err(self.error(format!(
                    "GGUF architecture {other:?} is not supported yet (supported: llama, qwen2, \
                     gemma3, deepseek2)"
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = self.required(&key("embedding_length"))?;
        let heads = self.required(&key("attention.head_count"))?;
        let vocab = match self.number(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => match self.content.metadata.get("tokenizer.ggml.tokens") {
                Some(GgufValue::Array(tokens)) => tokens.len(),
                _ => {
                    return Err(self
                        .error("neither {arch}.vocab_size nor tokenizer.ggml.tokens is present"))
                }
            },
        };
        let mut config = json!({
            "architectures": [hf_arch],
            "model_type": arch,
            "hidden_size": hidden as usize,
            "intermediate_size": self.required(&key("feed_forward_length"))? as usize,
            "num_hidden_layers": self.required(&key("block_count"))? as usize,
            "num_attention_heads": heads as usize,
            "num_key_value_heads": self.number(&key("attention.head_count_kv"))?.unwrap_or(heads) as usize,
            "max_position_embeddings": self.required(&key("context_length"))? as usize,
            "rms_norm_eps": self.number(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            "rope_theta": self.number(&key("rope.freq_base"))?.unwrap_or(10000.0),
            "vocab_size": vocab,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
        });
        if let Some(head_dim) = self.number(&key("attention.key_length"))? {
            config["head_dim"] = json!(head_dim as usize);
        }
        if arch == "gemma3" {
            self.gemma3_config(&mut config)?;
        }
        let yarn_log_multiplier = self.number(&key("rope.scaling.yarn_log_multiplier"))?;
        if let Some(bos) = self.number("tokenizer.ggml.bos_token_id")? {
            config["bos_token_id"] = json!(bos as u64);
        }
        if let Some(eos) = self.number("tokenizer.ggml.eos_token_id")? {
            config["eos_token_id"] = json!(eos as u64);
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            // Llama 3.1's rope scaling, stored by the converter as per-dimension factors.
            return Err(self.error(
                "rope_freqs.weight (llama3 rope scaling as per-dimension factors) is not supported yet",
            ));
        }
        if let Some(kind) = self.string(&key("rope.scaling.type"))? {
            if kind != "none" {
                let factor = self.number(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                let mut scaling = json!({"rope_type": kind, "type": kind, "factor": factor});
                if let Some(original) = self.number(&key("rope.scaling.original_context_length"))? {
                    scaling["original_max_position_embeddings"] = json!(original as usize);
                }
                for (gguf_key, hf_key) in [
                    ("rope.scaling.yarn_beta_fast", "beta_fast"),
                    ("rope.scaling.yarn_beta_slow", "beta_slow"),
                    ("rope.scaling.yarn_attn_factor", "attention_factor"),
                ] {
                    if let Some(v) = self.number(&key(gguf_key))? {
                        scaling[hf_key] = json!(v);
                    }
                }
                if let (Some(log_mul), "deepseek2") = (yarn_log_multiplier, arch) {
                    // The converter stores 0.1 × `mscale_all_dim`; llama.cpp takes DeepSeek's
                    // `mscale` to equal it (as in every released checkpoint), which makes the
                    // rotary tables unscaled and the softmax scale `mscale(factor)²`.
                    let m = log_mul / 0.1;
                    scaling["mscale"] = json!(m);
                    scaling["mscale_all_dim"] = json!(m);
                }
                config["rope_scaling"] = scaling;
            }
        }
        if arch == "deepseek2" {
            self.deepseek2_config(&mut config)?;
        }
        Ok(config)
    }

    /// DeepSeek-V2/V3 (`deepseek2`): MLA and DeepSeekMoE sizes, as `convert_hf_to_gguf.py`
    /// writes them. Newer files store MLA as multi-query attention over the latent
    /// (`key_length` = rank + rope, `head_count_kv` = 1) with the per-head sizes under
    /// `*_length_mla`; older ones store the per-head sizes in `key_length`/`value_length`.
    fn deepseek2_config(&self, config: &mut Value) -> Result<()> {
        let key = |k: &str| format!("deepseek2.{k}");
        let rope = self.required(&key("rope.dimension_count"))?;
        let rank = self.required(&key("attention.kv_lora_rank"))?;
        let qk = match self.number(&key("attention.key_length_mla"))? {
            Some(v) => v,
            None => self.required(&key("attention.key_length"))?,
        };
        let v = match self.number(&key("attention.value_length_mla"))? {
            Some(v) => v,
            None => self.required(&key("attention.value_length"))?,
        };
        if qk <= rope {
            return Err(self.error(format!(
                "deepseek2: key length {qk} must exceed the rotary dimension {rope}"
            )));
        }
        let obj = config
            .as_object_mut()
            .ok_or_else(|| self.error("config is not an object"))?;
        obj.remove("head_dim");
        let heads = obj.get("num_attention_heads").cloned().unwrap_or(json!(1));
        obj.insert("num_key_value_heads".into(), heads);
        obj.insert("qk_rope_head_dim".into(), json!(rope as usize));
        obj.insert("qk_nope_head_dim".into(), json!((qk - rope) as usize));
        obj.insert("v_head_dim".into(), json!(v as usize));
        obj.insert("kv_lora_rank".into(), json!(rank as usize));
        let q_rank = self
            .number(&key("attention.q_lora_rank"))?
            .filter(|r| *r > 0.0);
        obj.insert("q_lora_rank".into(), json!(q_rank.map(|r| r as usize)));
        // llama.cpp's rotary for deepseek2 is the interleaved (GPT-J) form, as DeepSeek's.
        obj.insert("rope_interleave".into(), json!(true));
        obj.insert("num_nextn_predict_layers".into(), json!(0));
        obj.insert(
            "first_k_dense_replace".into(),
            json!(self
                .number(&key("leading_dense_block_count"))?
                .unwrap_or(0.0) as usize),
        );
        obj.insert("moe_layer_freq".into(), json!(1));
        let experts = self.number(&key("expert_count"))?.unwrap_or(0.0) as usize;
        if experts > 0 {
            let sigmoid = self.number(&key("expert_gating_func"))? == Some(2.0);
            let groups = self.number(&key("expert_group_count"))?.unwrap_or(1.0) as usize;
            let groups_used = self
                .number(&key("expert_group_used_count"))?
                .unwrap_or(groups as f64) as usize;
            let method = if sigmoid {
                "noaux_tc"
            } else if groups > 1 && groups_used < groups {
                "group_limited_greedy"
            } else {
                "greedy"
            };
            obj.insert("n_routed_experts".into(), json!(experts));
            obj.insert(
                "num_experts_per_tok".into(),
                json!(self.required(&key("expert_used_count"))? as usize),
            );
            obj.insert(
                "n_shared_experts".into(),
                json!(self.number(&key("expert_shared_count"))?.unwrap_or(0.0) as usize),
            );
            obj.insert(
                "moe_intermediate_size".into(),
                json!(self.required(&key("expert_feed_forward_length"))? as usize),
            );
            obj.insert(
                "routed_scaling_factor".into(),
                json!(self.number(&key("expert_weights_scale"))?.unwrap_or(1.0)),
            );
            let norm = match self.content.metadata.get(&key("expert_weights_norm")) {
                Some(GgufValue::Bool(b)) => *b,
                Some(other) => number(other).is_some_and(|n| n != 0.0),
                None => false,
            };
            obj.insert("norm_topk_prob".into(), json!(norm));
            obj.insert(
                "scoring_func".into(),
                json!(if sigmoid { "sigmoid" } else { "softmax" }),
            );
            obj.insert("topk_method".into(), json!(method));
            obj.insert("n_group".into(), json!(groups));
            obj.insert("topk_group".into(), json!(groups_used));
        }
        Ok(())
    }

    /// What llama.cpp fixes for `gemma3` rather than reading from the file (`llama-model.cpp`):
    /// every 6th layer global, local layers rotating with base 10000, queries scaled by
    /// `1/sqrt(head_dim)` (27B: `1/sqrt(hidden / heads)`), and norms stored as `1 + w`.
    fn gemma3_config(&self, config: &mut Value) -> Result<()> {
        let window = self
            .number("gemma3.attention.sliding_window")?
            .ok_or_else(|| self.error("gemma3.attention.sliding_window is missing"))?;
        let head_dim = config["head_dim"].as_u64().unwrap_or(256) as f64;
        let layers = config["num_hidden_layers"].as_u64().unwrap_or(0);
        let query_scalar = if layers == 62 {
            config["hidden_size"].as_f64().unwrap_or(0.0)
                / config["num_attention_heads"].as_f64().unwrap_or(1.0)
        } else {
            head_dim
        };
        config["sliding_window"] = json!(window as usize);
        config["sliding_window_pattern"] = json!(6);
        config["rope_local_base_freq"] = json!(10000.0);
        config["query_pre_attn_scalar"] = json!(query_scalar);
        config["hidden_activation"] = json!("gelu_pytorch_tanh");
        config["norm_weight_offset"] = json!(0.0);
        Ok(())
    }

    /// Whether every matrix is stored as f32 (so `auto` keeps f32 rather than bf16).
    pub fn all_f32(&self) -> bool {
        self.content
            .tensor_infos
            .values()
            .all(|t| t.ggml_dtype == candle_core::quantized::GgmlDType::F32)
    }

    /// Serves the tensors under Hugging Face names to the architecture code. With `keep_blocks`
    /// (CPU), block-quantized matrices other than the embedding go into the stash and are served
    /// as zero-cost placeholders of their shape, which the model must replace by the stashed
    /// blocks before computing (`Model::from_gguf` does, and checks that each was taken); the
    /// file is never held dense and quantized at once.
    pub fn into_var_builder(
        self,
        dtype: DType,
        device: &Device,
        keep_blocks: bool,
    ) -> Result<(candle_nn::VarBuilder<'static>, QuantizedWeights)> {
        let arch = self.architecture()?.to_string();
        let heads = self.required(&format!("{arch}.attention.head_count"))? as usize;
        let kv_heads = self
            .number(&format!("{arch}.attention.head_count_kv"))?
            .map_or(heads, |n| n as usize);
        let stash = QuantizedWeights::default();
        let backend = GgufWeights {
            // llama.cpp's converter permutes llama's q/k rows for its interleaved rotary.
            unpermute: (arch == "llama").then_some((heads, kv_heads)),
            arch,
            file: self,
            stash: stash.clone(),
            keep_blocks: keep_blocks && device.is_cpu(),
        };
        Ok((
            candle_nn::VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
            stash,
        ))
    }
}

/// llama.cpp's tensor type names by `ggml_type` id (`ggml.h`).
const GGML_TYPE_NAMES: &[(u32, &str)] = &[
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

/// Why candle could not read the header, in our words: an unsupported tensor type is named.
fn read_error_message(candle: &str) -> String {
    // candle may append a backtrace: only the first line is the message.
    let first_line = candle.lines().next().unwrap_or_default();
    let unknown = first_line
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|id| id.trim().parse::<u32>().ok());
    match unknown {
        Some(id) => {
            let name = GGML_TYPE_NAMES
                .iter()
                .find(|(known, _)| *known == id)
                .map_or("unknown", |(_, name)| name);
            format!(
                "a tensor is stored in GGML type {id} ({name}), which is not supported (supported: \
                 F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)"
            )
        }
        None => format!("not a readable GGUF file: {first_line}"),
    }
}

/// A metadata value as a number, whichever integer or float type the writer chose.
pub fn number(value: &GgufValue) -> Option<f64> {
    Some(match value {
        GgufValue::U8(x) => *x as f64,
        GgufValue::I8(x) => *x as f64,
        GgufValue::U16(x) => *x as f64,
        GgufValue::I16(x) => *x as f64,
        GgufValue::U32(x) => *x as f64,
        GgufValue::I32(x) => *x as f64,
        GgufValue::U64(x) => *x as f64,
        GgufValue::I64(x) => *x as f64,
        GgufValue::F32(x) => *x as f64,
        GgufValue::F64(x) => *x,
        _ => return None,
    })
}

/// Block-quantized tensors by Hugging Face name, as read from a GGUF file.
#[derive(Clone, Default)]
pub struct QuantizedWeights(Arc<Mutex<HashMap<String, Arc<QTensor>>>>);

impl QuantizedWeights {
    /// Looks at the quantized form of `hf_name` (a tied head shares the embedding's).
    pub fn get(&self, hf_name: &str) -> Option<Arc<QTensor>> {
        self.0.lock().ok()?.get(hf_name).cloned()
    }

    /// The names in the stash.
    pub fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|map| map.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn insert(&self, hf_name: &str, tensor: QTensor) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(hf_name.to_string(), Arc::new(tensor));
        }
    }
}

/// Whether candle computes with this type without widening it (its block-quantized types).
fn is_block_quantized(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

struct GgufWeights {
    file: GgufFile,
    arch: String,
    stash: QuantizedWeights,
    /// Stash block-quantized matrices and serve placeholders (see `into_var_builder`).
    keep_blocks: bool,
    /// (query heads, key/value heads) when q/k rows must be un-permuted.
    unpermute: Option<(usize, usize)>,
}

/// The GGUF name of a Hugging Face tensor name in architecture `arch` (`None`: no counterpart;
/// routed experts are slices of stacked tensors, see [`gguf_expert`]).
pub fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.")?;
            let (layer, part) = rest.split_once('.')?;
            let part = match part {
                "input_layernorm" => "attn_norm",
                // Gemma normalises the attention output; Llama's norm of that name is the
                // feed-forward's input norm.
                "post_attention_layernorm" if arch == "gemma3" => "post_attention_norm",
                "post_attention_layernorm" => "ffn_norm",
                "pre_feedforward_layernorm" => "ffn_norm",
                "post_feedforward_layernorm" => "post_ffw_norm",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_a_proj" => "attn_q_a",
                "self_attn.q_a_layernorm" => "attn_q_a_norm",
                "self_attn.q_b_proj" => "attn_q_b",
                "self_attn.kv_a_proj_with_mqa" => "attn_kv_a_mqa",
                "self_attn.kv_a_layernorm" => "attn_kv_a_norm",
                "self_attn.kv_b_proj" => "attn_kv_b",
                "mlp.gate" if suffix == "e_score_correction_bias" => {
                    return Some(format!("blk.{layer}.exp_probs_b.bias"));
                }
                "mlp.gate" => "ffn_gate_inp",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "mlp.shared_experts.gate_proj" => "ffn_gate_shexp",
                "mlp.shared_experts.up_proj" => "ffn_up_shexp",
                "mlp.shared_experts.down_proj" => "ffn_down_shexp",
                _ => return None,
            };
            format!("blk.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// A routed expert's matrix: the converter stacks `mlp.experts.{i}.{gate,up,down}_proj` into one
/// `[experts, rows, cols]` tensor per layer, `blk.{layer}.ffn_{gate,up,down}_exps`; returns that
/// name and `i`.
pub fn gguf_expert(hf: &str) -> Option<(String, usize)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once(".mlp.experts.")?;
    let (index, projection) = rest.split_once('.')?;
    let which = match projection {
        "gate_proj.weight" => "gate",
        "up_proj.weight" => "up",
        "down_proj.weight" => "down",
        _ => return None,
    };
    let layer: usize = layer.parse().ok()?;
    Some((
        format!("blk.{layer}.ffn_{which}_exps.weight"),
        index.parse().ok()?,
    ))
}

/// Matrices the model reads whole rather than as a projection's weight (MLA's latent
/// up-projection, the MoE router): served dense and never stashed.
fn whole_matrix(hf: &str) -> bool {
    hf.ends_with(".self_attn.kv_b_proj.weight") || hf.ends_with(".mlp.gate.weight")
}

impl GgufWeights {
    fn has(&self, name: &str) -> bool {
        self.file.content.tensor_infos.contains_key(name)
    }

    fn missing(&self, name: &str, hf: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: tensor `{name}` (for `{hf}`) is missing",
            self.file.path.display()
        ))
    }

    /// Reads tensor `name` whole.
    fn read(&self, name: &str) -> candle_core::Result<QTensor> {
        let mut reader = self
            .file
            .reader
            .lock()
            .map_err(|_| candle_core::Error::Msg("GGUF reader lock poisoned".into()))?;
        self.file
            .content
            .tensor(&mut *reader, name, &Device::Cpu)
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: tensor `{name}`: {e}",
                    self.file.path.display()
                ))
            })
    }

    /// Reads matrix `index` of the stacked `[n, rows, cols]` tensor `name`, and only its bytes.
    fn read_slice(&self, name: &str, index: usize) -> candle_core::Result<QTensor> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.file.path.display();
        let info = self.file.content.tensor_infos.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{path}: tensor `{name}` is missing"))
        })?;
        let (n, rows, cols) = info.shape.dims3().map_err(|_| {
            candle_core::Error::Msg(format!(
                "{path}: tensor `{name}` has shape {:?}, expected [experts, rows, columns]",
                info.shape.dims()
            ))
        })?;
        let dtype = info.ggml_dtype;
        if index >= n || !cols.is_multiple_of(dtype.block_size()) {
            return Err(candle_core::Error::Msg(format!(
                "{path}: tensor `{name}` of shape {:?} has no matrix {index} in whole {dtype:?} blocks",
                info.shape.dims()
            )));
        }
        let bytes = rows * cols / dtype.block_size() * dtype.type_size();
        let start = self.file.content.tensor_data_offset + info.offset + (index * bytes) as u64;
        let mut data = vec![0u8; bytes];
        {
            let mut reader = self
                .file
                .reader
                .lock()
                .map_err(|_| candle_core::Error::Msg("GGUF reader lock poisoned".into()))?;
            reader
                .seek(SeekFrom::Start(start))
                .and_then(|_| reader.read_exact(&mut data))
                .map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "{path}: tensor `{name}`, matrix {index}: {e} (is the file truncated?)"
                    ))
                })?;
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(data), &Device::Cpu, dtype)?;
        QTensor::new(storage, (rows, cols))
    }

    /// MLA's `kv_b_proj` (`[heads × (nope + v), rank]`): the legacy `attn_kv_b`, or rebuilt from
    /// the converter's split `attn_k_b` (`[heads, rank, nope]`, transposed) and `attn_v_b`
    /// (`[heads, v, rank]`).
    fn load_kv_b(&self, hf: &str, legacy: &str) -> candle_core::Result<Tensor> {
        let layer = legacy.trim_end_matches("attn_kv_b.weight");
        let (k_name, v_name) = (
            format!("{layer}attn_k_b.weight"),
            format!("{layer}attn_v_b.weight"),
        );
        for name in [&k_name, &v_name] {
            if !self.has(name) {
                return Err(self.missing(name, hf));
            }
        }
        let k_b = self.read(&k_name)?.dequantize(&Device::Cpu)?;
        let v_b = self.read(&v_name)?.dequantize(&Device::Cpu)?;
        let (heads, rank, _) = k_b.dims3()?;
        let (v_heads, _, v_rank) = v_b.dims3()?;
        if (v_heads, v_rank) != (heads, rank) {
            return Err(candle_core::Error::Msg(format!(
                "{}: `{k_name}` {:?} and `{v_name}` {:?} disagree on heads or rank",
                self.file.path.display(),
                k_b.dims(),
                v_b.dims()
            )));
        }
        let kv_b = Tensor::cat(&[&k_b.transpose(1, 2)?, &v_b], 1)?;
        let per_head = kv_b.dim(1)?;
        kv_b.reshape((heads * per_head, rank))
    }

    fn load(&self, hf: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let path = self.file.path.display();
        let (name, qtensor) = if let Some((stacked, index)) = gguf_expert(hf) {
            (stacked.clone(), self.read_slice(&stacked, index)?)
        } else {
            let name = gguf_name(&self.arch, hf).ok_or_else(|| {
                candle_core::Error::Msg(format!("{path}: no GGUF tensor corresponds to `{hf}`"))
            })?;
            if !self.has(&name) {
                if name.ends_with("attn_kv_b.weight") {
                    return self
                        .load_kv_b(hf, &name)?
                        .to_dtype(dtype)?
                        .to_device(device);
                }
                return Err(self.missing(&name, hf));
            }
            let qtensor = self.read(&name)?;
            (name, qtensor)
        };
        // The embedding is looked up by rows, so it is always served dense (its blocks stay in
        // the stash for a tied output head).
        let stash = self.keep_blocks
            && is_block_quantized(qtensor.dtype())
            && hf != "model.embed_tokens.weight"
            && !whole_matrix(hf);
        if stash {
            let mut q = qtensor;
            if let Some((heads, kv_heads)) = self.unpermute {
                if name.ends_with("attn_q.weight") {
                    q = unpermute_quantized_rows(&q, heads)?;
                } else if name.ends_with("attn_k.weight") {
                    q = unpermute_quantized_rows(&q, kv_heads)?;
                }
            }
            let shape = q.shape().clone();
            self.stash.insert(hf, q);
            return Tensor::zeros((), dtype, device)?.broadcast_as(shape);
        }
        let mut tensor = qtensor.dequantize(&Device::Cpu)?;
        let mut qtensor = Some(qtensor)
            .filter(|q| self.keep_blocks && is_block_quantized(q.dtype()) && !whole_matrix(hf));
        if let Some((heads, kv_heads)) = self.unpermute {
            let heads = if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                Some(heads)
            } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                tensor = unpermute_rows(&tensor, heads)?;
                qtensor = qtensor
                    .map(|q| unpermute_quantized_rows(&q, heads))
                    .transpose()?;
            }
        }
        if let (Some(q), true) = (qtensor, device.is_cpu()) {
            self.stash.insert(hf, q);
        }
        tensor.to_dtype(dtype)?.to_device(device)
    }
}

/// Undoes `convert_hf_to_gguf.py`'s llama q/k permutation: per head, the converter interleaves
/// the two rotary halves (rows `[a0, a1, …, b0, b1, …]` become `[a0, b0, a1, b1, …]`).
fn unpermute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let Some((&rows, rest)) = dims.split_first() else {
        return Err(candle_core::Error::Msg("cannot un-permute a scalar".into()));
    };
    let rest: usize = rest.iter().product();
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(candle_core::Error::Msg(format!(
            "cannot un-permute {rows} rows over {heads} heads"
        )));
    }
    let half = rows / heads / 2;
    t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// [`unpermute_rows`] on a block-quantized matrix: rows are whole blocks, so they move as bytes.
fn unpermute_quantized_rows(q: &QTensor, heads: usize) -> candle_core::Result<QTensor> {
    let (rows, _) = q.shape().dims2()?;
    let data = q.data()?;
    if heads == 0 || !rows.is_multiple_of(2 * heads) || !data.len().is_multiple_of(rows) {
        return Err(candle_core::Error::Msg(format!(
            "cannot un-permute {rows} quantized rows over {heads} heads"
        )));
    }
    let row_bytes = data.len() / rows;
    let half = rows / heads / 2;
    let mut out = Vec::with_capacity(data.len());
    // Output row (h, j, i) of shape [heads, 2, half] comes from input row (h, i, j).
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * half + i) * 2 + j;
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, q.dtype())?;
    QTensor::new(storage, q.shape().clone())
}

impl SimpleBackend for GgufWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.dims() != shape.dims() {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor for `{name}` has shape {:?}, but the metadata implies {:?}",
                self.file.path.display(),
                tensor.dims(),
                shape.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if let Some((stacked, _)) = gguf_expert(name) {
            return self.has(&stacked);
        }
        gguf_name(&self.arch, name).is_some_and(|n| {
            self.has(&n)
                || n.strip_suffix("attn_kv_b.weight")
                    .is_some_and(|layer| self.has(&format!("{layer}attn_k_b.weight")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_name("llama", "model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            gguf_name("llama", "model.layers.3.self_attn.k_proj.bias").as_deref(),
            Some("blk.3.attn_k.bias")
        );
        assert_eq!(
            gguf_name("llama", "model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("llama", "lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("llama", "model.layers.0.mystery.weight"), None);
        assert_eq!(
            gguf_name("gemma3", "model.layers.2.post_attention_layernorm.weight").as_deref(),
            Some("blk.2.post_attention_norm.weight")
        );
        assert_eq!(
            gguf_name("llama", "model.layers.2.post_attention_layernorm.weight").as_deref(),
            Some("blk.2.ffn_norm.weight")
        );
    }

    #[test]
    fn deepseek2_names_follow_llama_cpp() {
        let name = |hf| gguf_name("deepseek2", hf);
        assert_eq!(
            name("model.layers.1.self_attn.kv_a_proj_with_mqa.weight").as_deref(),
            Some("blk.1.attn_kv_a_mqa.weight")
        );
        assert_eq!(
            name("model.layers.1.mlp.gate.e_score_correction_bias").as_deref(),
            Some("blk.1.exp_probs_b.bias")
        );
        assert_eq!(
            name("model.layers.1.mlp.gate.weight").as_deref(),
            Some("blk.1.ffn_gate_inp.weight")
        );
        assert_eq!(
            name("model.layers.2.mlp.shared_experts.down_proj.weight").as_deref(),
            Some("blk.2.ffn_down_shexp.weight")
        );
        assert_eq!(
            gguf_expert("model.layers.2.mlp.experts.17.up_proj.weight"),
            Some(("blk.2.ffn_up_exps.weight".to_string(), 17))
        );
        assert_eq!(gguf_expert("model.layers.2.mlp.up_proj.weight"), None);
        assert_eq!(
            gguf_expert("model.layers.x.mlp.experts.1.up_proj.weight"),
            None
        );
    }

    #[test]
    fn unpermute_inverts_the_converters_interleave() {
        // Two heads of 4 rows: the converter maps rows [0 1 2 3] to [0 2 1 3] per head.
        let permuted = Tensor::new(
            &[[0f32], [2.], [1.], [3.], [4.], [6.], [5.], [7.]],
            &Device::Cpu,
        )
        .unwrap();
        let rows: Vec<f32> = unpermute_rows(&permuted, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(rows, [0., 1., 2., 3., 4., 5., 6., 7.]);
    }
}
