//! Incremental detokenization for streaming.
//!
//! Decoding one token at a time breaks multi-byte characters (a Chinese character or an emoji
//! can span several byte-level tokens) and loses the spaces some decoders add between tokens.
//! As in vLLM and TGI, we decode a short window of recent tokens twice, with and without the
//! newest ones, and emit the difference only once it no longer ends in a replacement character.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// How many prompt tokens seed the window, so the first generated token decodes in context.
const PROMPT_CONTEXT: usize = 5;

#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// `prompt` is the tokens before the first one that will be pushed.
    pub fn new(tokenizer: &Tokenizer, prompt: &[u32], skip_special_tokens: bool) -> Self {
        let start = prompt.len().saturating_sub(PROMPT_CONTEXT);
        let mut ids = prompt[start..].to_vec();
        // A prompt that ends inside a character (token-id prompts can) gives no usable context:
        // the completion is then decoded on its own, as a plain decode of its ids would be.
        let ends_broken = tokenizer
            .decode(&ids, skip_special_tokens)
            .map_or(true, |text| text.ends_with('\u{FFFD}'));
        if ends_broken {
            ids.clear();
        }
        let read_offset = ids.len();
        Self {
            ids,
            prefix_offset: 0,
            read_offset,
            skip_special_tokens,
        }
    }

    /// Adds one token; returns the text it completes, if any (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(delta) = full.get(prefix.len()..) {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(delta);
            }
        }
        Ok(String::new())
    }

    /// Text held back at the end of the stream (an incomplete character is emitted as the
    /// replacement character, as a full decode would).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
