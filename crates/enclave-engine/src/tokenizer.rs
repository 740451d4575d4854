//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, with the special-token
//! settings of `tokenizer_config.json` applied as Hugging Face `transformers` 4.x applies them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value as GgufValue;

use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;

use crate::error::{EngineError, Result};

/// Special tokens as `tokenizer_config.json` names them (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// A tokenizer with its special tokens resolved.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    /// The parsed `tokenizer_config.json`, for the chat template and other settings.
    config: Value,
    /// Added tokens by id (their text is not in the byte-level alphabet).
    added: HashMap<u32, String>,
}

/// Fast-tokenizer classes whose `transformers` 4.x implementation rebuilds the post-processor
/// from `add_bos_token` / `add_eos_token` (`update_post_processor`).
const BOS_EOS_FLAG_CLASSES: &[&str] = &[
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
    "GemmaTokenizer",
    "GemmaTokenizerFast",
];

impl Tokenizer {
    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(config_path)
        } else {
            None
        };
        Self::from_files(&dir.join("tokenizer.json"), config.as_deref())
    }

    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        if !tokenizer_json.is_file() {
            return Err(EngineError::File {
                path: tokenizer_json.to_path_buf(),
                message: "tokenizer file not found".into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| EngineError::File {
                path: tokenizer_json.to_path_buf(),
                message: format!("cannot load tokenizer: {e}"),
            })?;
        let config = match tokenizer_config {
            Some(path) => read_json(path)?,
            None => Value::Object(Default::default()),
        };
        Self::new(
            inner,
            config,
            tokenizer_config.map(Path::to_path_buf),
            false,
        )
    }

    /// The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt as the
    /// Hugging Face tokenizer it was converted from; BOS/EOS are added as its
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token` say, as llama.cpp does.
    pub fn from_gguf(metadata: &HashMap<String, GgufValue>, path: &Path) -> Result<Self> {
        let (json, config) = crate::gguf_tokenizer::hf_tokenizer(metadata)?;
        let inner =
            tokenizers::Tokenizer::from_str(&json.to_string()).map_err(|e| EngineError::File {
                path: path.to_path_buf(),
                message: format!("cannot build the tokenizer from the GGUF metadata: {e}"),
            })?;
        Self::new(inner, config, Some(path.to_path_buf()), true)
    }

    /// `flags_decide`: BOS/EOS come from `add_bos_token`/`add_eos_token` whatever the class.
    fn new(
        mut inner: tokenizers::Tokenizer,
        config: Value,
        config_path: Option<PathBuf>,
        flags_decide: bool,
    ) -> Result<Self> {
        let special = SpecialTokens {
            bos: token_field(&config, "bos_token"),
            eos: token_field(&config, "eos_token"),
            pad: token_field(&config, "pad_token"),
            unk: token_field(&config, "unk_token"),
        };
        let class = config
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .unwrap_or("");
        if flags_decide || BOS_EOS_FLAG_CLASSES.contains(&class) {
            let add_bos = config
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let add_eos = config
                .get("add_eos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let processor =
                bos_eos_processor(&inner, &special, add_bos, add_eos).map_err(|message| {
                    EngineError::File {
                        path: config_path.unwrap_or_default(),
                        message,
                    }
                })?;
            inner.with_post_processor(Some(processor));
        }
        let added = inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, token)| (id, token.content))
            .collect();
        Ok(Self {
            inner,
            special,
            config,
            added,
        })
    }

    /// Token ids of `text`; with `add_special_tokens` the post-processor adds BOS/EOS as the
    /// tokenizer's settings say (what the completions API does with a prompt).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes a token stands for. A byte-level BPE token can be part of a UTF-8 character,
    /// which decoding it alone turns into U+FFFD; its bytes are exact (OpenAI's `bytes` field).
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        // Added tokens (`<｜User｜>`, `<think>`) are stored as text, not in the byte alphabet.
        if let Some(added) = self.added.get(&id) {
            return Some(added.clone().into_bytes());
        }
        let token = self.inner.id_to_token(id)?;
        let byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        if byte_level {
            if let Some(bytes) = token.chars().map(byte_of).collect::<Option<Vec<u8>>>() {
                return Some(bytes);
            }
            return Some(token.into_bytes());
        }
        // SentencePiece byte-fallback tokens stand for one byte, maybe half a character.
        if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
            if let (2, Ok(byte)) = (hex.len(), u8::from_str_radix(hex, 16)) {
                return Some(vec![byte]);
            }
        }
        // SentencePiece pieces spell spaces `▁`; decoding one alone would strip its leading
        // space where the tokenizer adds a prefix space.
        if token.contains('\u{2581}') {
            return Some(token.replace('\u{2581}', " ").into_bytes());
        }
        self.decode(&[id], false).ok().map(String::into_bytes)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.special
            .eos
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    /// The parsed `tokenizer_config.json` (an empty object if there was none).
    pub fn config(&self) -> &Value {
        &self.config
    }
}

/// The byte a character of GPT-2's byte-level alphabet stands for: printable bytes map to
/// themselves, the other 68 to U+0100 onwards in byte order (`bytes_to_unicode`).
fn byte_of(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if printable(code) {
        return u8::try_from(code).ok();
    }
    let offset = code.checked_sub(256)?;
    (0u32..=255)
        .filter(|&b| !printable(b))
        .nth(offset as usize)
        .and_then(|b| u8::try_from(b).ok())
}

/// `bos_token` and friends are either a string or an `AddedToken` object with `content`.
fn token_field(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(obj) => obj
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn bos_eos_processor(
    inner: &tokenizers::Tokenizer,
    special: &SpecialTokens,
    add_bos: bool,
    add_eos: bool,
) -> std::result::Result<TemplateProcessing, String> {
    let resolve =
        |token: &Option<String>, key: &str| -> std::result::Result<(String, u32), String> {
            let token = token
                .clone()
                .ok_or_else(|| format!("add_{key}: true but no {key} is set"))?;
            let id = inner
                .token_to_id(&token)
                .ok_or_else(|| format!("{key} {token:?} is not in the vocabulary"))?;
            Ok((token, id))
        };
    let mut specials = Vec::new();
    let (mut single, mut pair_first, mut pair_second) =
        (String::new(), String::new(), String::new());
    if add_bos {
        let (bos, id) = resolve(&special.bos, "bos_token")?;
        single.push_str(&format!("{bos}:0 "));
        pair_second.push_str(&format!(" {bos}:1"));
        specials.push((bos, id));
    }
    single.push_str("$A:0");
    pair_first.push_str(&single);
    if add_eos {
        let (eos, id) = resolve(&special.eos, "eos_token")?;
        single.push_str(&format!(" {eos}:0"));
        pair_first.push_str(&format!(" {eos}:0"));
        specials.push((eos.clone(), id));
        pair_second.push_str(&format!(" $B:1 {eos}:1"));
    } else {
        pair_second.push_str(" $B:1");
    }
    let template_err = |e: &dyn std::fmt::Display| format!("post-processor template: {e}");
    let mut builder = TemplateProcessing::builder();
    builder
        .try_single(single.as_str())
        .map_err(|e| template_err(&e))?;
    builder
        .try_pair(format!("{pair_first}{pair_second}").as_str())
        .map_err(|e| template_err(&e))?;
    builder.special_tokens(specials);
    builder.build().map_err(|e| template_err(&e))
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::File {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })
}
