//! Streaming detokenization. Byte-level BPE splits multi-byte characters across tokens,
//! and some decoders change a token's text depending on its left neighbour (leading
//! spaces), so each step decodes a short window of recent tokens and emits only text that
//! has become final: never a partial UTF-8 sequence (decoded as U+FFFD).

use super::{TextError, Tokenizer};

#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    /// Start of the context window decoded with the new tokens.
    prefix_offset: usize,
    /// Tokens before this index have been emitted as text.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDetokenizer {
            skip_special_tokens,
            ..Default::default()
        }
    }

    /// Adds one token; returns the text that became final (often empty mid-character).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let (prefix, full) = self.decode_window(tokenizer)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new_text = text_after(&full, prefix.len()).to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new_text)
    }

    /// Text still held back at the end of the stream (an unfinished character decodes as
    /// U+FFFD, as transformers would print it).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, TextError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix, full) = self.decode_window(tokenizer)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text_after(&full, prefix.len()).to_owned())
    }

    /// (text of the emitted tokens in the window, text of the whole window)
    fn decode_window(&self, tokenizer: &Tokenizer) -> Result<(String, String), TextError> {
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        Ok((prefix, full))
    }

    pub fn token_ids(&self) -> &[u32] {
        &self.ids
    }
}

/// `s` after its first `n` bytes: the window's text is the emitted prefix followed by the
/// new text (as vLLM and TGI assume); if a decoder rewrote the prefix, cut at the next
/// character boundary rather than panic.
fn text_after(s: &str, n: usize) -> &str {
    let mut at = n.min(s.len());
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}
