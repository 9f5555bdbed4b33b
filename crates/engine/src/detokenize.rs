//! Incremental detokenization: turn a stream of token ids into text deltas.
//!
//! Decoding tokens one at a time is wrong for two reasons: a token may hold only part of a UTF-8
//! character (byte-level BPE, byte-fallback `<0xE2>` tokens), and decoders are context dependent
//! (sentencepiece strips the leading space of the first token only, WordPiece joins with spaces).
//! This follows TGI / vLLM: keep a small window `tokens[prefix_offset..]`, decode it with and
//! without the new tokens, and emit the difference once it is complete text.

use std::fmt;
use std::sync::Arc;

use tokenizers::Tokenizer;

const REPLACEMENT: char = '\u{FFFD}';

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("failed to decode token ids: {0}")]
    Tokenizer(#[source] tokenizers::Error),
}

/// Streams the text of one sequence, token by token.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    /// The decode window. Everything before `prefix_offset` is dropped, so this stays a few
    /// tokens long however long the generation runs.
    tokens: Vec<u32>,
    /// Start of the window: the first token of the previously emitted chunk, kept as context.
    prefix_offset: usize,
    /// End of what has been emitted; tokens after it are pending.
    read_offset: usize,
    /// Cached `decode(tokens[prefix_offset..read_offset])`, which only changes on advance.
    prefix_text: Option<String>,
}

impl fmt::Debug for IncrementalDecoder {
    // Manual: the tokenizer's own Debug would dump its whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncrementalDecoder")
            .field("tokens", &self.tokens)
            .field("prefix_offset", &self.prefix_offset)
            .field("read_offset", &self.read_offset)
            .finish_non_exhaustive()
    }
}

impl IncrementalDecoder {
    /// `prompt_tail` is the last few prompt tokens (may be empty). They are context only, never
    /// emitted: e.g. after a prompt ending in a word, sentencepiece's first generated `▁word`
    /// decodes to " word" rather than the start-of-text "word".
    pub fn new(tokenizer: Arc<Tokenizer>, prompt_tail: &[u32]) -> Self {
        Self {
            tokenizer,
            tokens: prompt_tail.to_vec(),
            prefix_offset: 0,
            read_offset: prompt_tail.len(),
            prefix_text: None,
        }
    }

    /// Adds one token; returns the text it completes, possibly empty. Never returns half a
    /// UTF-8 character: while the decoded window ends in U+FFFD (an incomplete byte sequence),
    /// the text is held back.
    pub fn push(&mut self, token: u32) -> Result<String, DecodeError> {
        self.tokens.push(token);
        let prefix_text = self.prefix_text()?;
        let new_text = self.decode(self.prefix_offset, self.tokens.len())?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with(REPLACEMENT) {
            let delta = suffix_after(&new_text, &prefix_text);
            self.advance();
            Ok(delta)
        } else {
            self.prefix_text = Some(prefix_text);
            Ok(String::new())
        }
    }

    /// Whatever text is still held back; an incomplete UTF-8 tail decodes lossily (U+FFFD).
    /// The decoder can keep going afterwards.
    pub fn finish(&mut self) -> Result<String, DecodeError> {
        if self.read_offset == self.tokens.len() {
            return Ok(String::new());
        }
        let prefix_text = self.prefix_text()?;
        let new_text = self.decode(self.prefix_offset, self.tokens.len())?;
        let delta = if new_text.len() > prefix_text.len() {
            suffix_after(&new_text, &prefix_text)
        } else {
            String::new()
        };
        self.advance();
        Ok(delta)
    }

    fn prefix_text(&mut self) -> Result<String, DecodeError> {
        match self.prefix_text.take() {
            Some(text) => Ok(text),
            None => self.decode(self.prefix_offset, self.read_offset),
        }
    }

    /// Marks all pending tokens emitted and slides the window so the last chunk becomes context.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        self.tokens.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        self.prefix_text = None;
    }

    fn decode(&self, start: usize, end: usize) -> Result<String, DecodeError> {
        let ids = self.tokens.get(start..end).unwrap_or_default();
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.tokenizer
            .decode(ids, true)
            .map_err(DecodeError::Tokenizer)
    }
}

/// The part of `new` after `prefix`. Decoding more tokens normally only appends, so `prefix` is
/// a byte prefix of `new`; if a context-dependent decoder rewrote it anyway, fall back to
/// skipping as many chars (vLLM's semantics) instead of slicing at a possibly invalid boundary.
fn suffix_after(new: &str, prefix: &str) -> String {
    match new.strip_prefix(prefix) {
        Some(rest) => rest.to_owned(),
        None => {
            tracing::debug!(
                prefix,
                new,
                "decoded window is not an extension of its prefix"
            );
            new.chars().skip(prefix.chars().count()).collect()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::str::FromStr;

    const TEXTS: &[&str] = &[
        "Hello world, the theory: café naïve résumé — 😀👍🏽 你好世界 こんにちは ½ 🇺🇸!",
        "the the the ü",
        "😀",
        "  leading spaces and trailing  ",
        "日本語",
    ];

    fn json_str(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn vocab_json(vocab: &[(String, u32)]) -> String {
        let entries: Vec<String> = vocab
            .iter()
            .map(|(t, id)| format!("{}: {id}", json_str(t)))
            .collect();
        format!("{{{}}}", entries.join(", "))
    }

    fn merges_json(merges: &[(String, String)]) -> String {
        let entries: Vec<String> = merges
            .iter()
            .map(|(a, b)| format!("[{}, {}]", json_str(a), json_str(b)))
            .collect();
        format!("[{}]", entries.join(", "))
    }

    fn added_token(id: u32, content: &str) -> String {
        format!(
            r#"{{"id": {id}, "content": {}, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#,
            json_str(content)
        )
    }

    /// GPT-2's reversible byte → printable char map.
    fn bytes_to_unicode() -> Vec<char> {
        let mut map = vec!['\0'; 256];
        let mut extra = 0u32;
        for b in 0..256u32 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                b
            } else {
                extra += 1;
                255 + extra
            };
            map[b as usize] = char::from_u32(c).unwrap();
        }
        map
    }

    const BYTE_LEVEL_EOS: u32 = 300;

    /// Byte-level BPE (GPT-2 / Qwen style) with merges that build whole words, whole multi-byte
    /// characters and, deliberately, tokens holding only part of a character.
    fn byte_level_tokenizer() -> Tokenizer {
        let b2u = bytes_to_unicode();
        let sym = |bytes: &[u8]| -> String { bytes.iter().map(|&b| b2u[b as usize]).collect() };
        let mut vocab: Vec<(String, u32)> = (0..=255u8).map(|b| (sym(&[b]), b as u32)).collect();
        let merge_bytes: &[(&[u8], &[u8])] = &[
            (b" ", b"t"),
            (b"h", b"e"),
            (b" t", b"he"),
            (b"t", b"he"),
            (b"o", b"r"),
            (&[0xC3], &[0xA9]), // é as one token
            (&[0xF0], &[0x9F]), // first half of most emoji
            (&[0xE4], &[0xBD]), // first two bytes of 你
            (&[0xE4, 0xBD], &[0xA0]),
            (&[0x98], &[0x80]), // last two bytes of 😀
            (b" ", &[0xE2]),    // space + first byte of —
        ];
        let mut merges = Vec::new();
        for (a, b) in merge_bytes {
            let joined: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
            vocab.push((sym(&joined), vocab.len() as u32));
            merges.push((sym(a), sym(b)));
        }
        let json = format!(
            r#"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [{eos}],
  "normalizer": null,
  "pre_tokenizer": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
  "post_processor": null,
  "decoder": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}},
  "model": {{"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {vocab}, "merges": {merges}}}
}}"#,
            eos = added_token(BYTE_LEVEL_EOS, "<|endoftext|>"),
            vocab = vocab_json(&vocab),
            merges = merges_json(&merges),
        );
        Tokenizer::from_str(&json).unwrap()
    }

    /// Sentencepiece-like BPE with byte fallback, as in Llama 2 (`metaspace_pretok` false:
    /// Prepend/Replace normalizer) or Mistral (true: Metaspace pre-tokenizer, prepend "first").
    /// `metaspace_decoder` picks `[ByteFallback, Metaspace]` instead of Llama's
    /// `[Replace ▁→" ", ByteFallback, Fuse, Strip]`.
    fn byte_fallback_tokenizer(metaspace_pretok: bool, metaspace_decoder: bool) -> Tokenizer {
        let mut vocab: Vec<(String, u32)> =
            vec![("<unk>".into(), 0), ("<s>".into(), 1), ("</s>".into(), 2)];
        for b in 0..=255u32 {
            vocab.push((format!("<0x{b:02X}>"), 3 + b));
        }
        let mut push = |t: &str| {
            let id = vocab.len() as u32;
            vocab.push((t.to_string(), id));
        };
        push("▁");
        for c in (33u8..=126).map(char::from) {
            push(&c.to_string());
        }
        push("é");
        push("你");
        let merge_list = [
            ("▁", "t"),
            ("h", "e"),
            ("▁t", "he"),
            ("▁", "w"),
            ("o", "r"),
            ("▁w", "or"),
            ("l", "d"),
            ("▁wor", "ld"),
            ("▁", "▁"),
        ];
        let mut merges = Vec::new();
        for (a, b) in merge_list {
            push(&format!("{a}{b}"));
            merges.push((a.to_string(), b.to_string()));
        }
        let (normalizer, pre_tokenizer) = if metaspace_pretok {
            (
                "null",
                r#"{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}"#,
            )
        } else {
            (
                r#"{"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}"#,
                "null",
            )
        };
        let decoder = if metaspace_decoder {
            r#"{"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}]}"#
        } else {
            r#"{"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}"#
        };
        let json = format!(
            r#"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [{unk}, {bos}, {eos}],
  "normalizer": {normalizer},
  "pre_tokenizer": {pre_tokenizer},
  "post_processor": null,
  "decoder": {decoder},
  "model": {{"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
    "vocab": {vocab}, "merges": {merges}}}
}}"#,
            unk = added_token(0, "<unk>"),
            bos = added_token(1, "<s>"),
            eos = added_token(2, "</s>"),
            vocab = vocab_json(&vocab),
            merges = merges_json(&merges),
        );
        Tokenizer::from_str(&json).unwrap()
    }

    fn all_tokenizers() -> Vec<(&'static str, Arc<Tokenizer>, u32)> {
        vec![
            (
                "byte-level",
                Arc::new(byte_level_tokenizer()),
                BYTE_LEVEL_EOS,
            ),
            ("llama2", Arc::new(byte_fallback_tokenizer(false, false)), 2),
            ("mistral", Arc::new(byte_fallback_tokenizer(true, false)), 2),
            (
                "metaspace-decoder",
                Arc::new(byte_fallback_tokenizer(true, true)),
                2,
            ),
        ]
    }

    /// Streams `ids` after `tail`; checks no mid-stream delta contains U+FFFD (when the expected
    /// text has none) and returns the concatenation of all deltas and the final flush.
    fn stream(tok: &Arc<Tokenizer>, tail: &[u32], ids: &[u32], expect_clean: bool) -> String {
        let mut dec = IncrementalDecoder::new(tok.clone(), tail);
        let mut out = String::new();
        for &id in ids {
            let delta = dec.push(id).unwrap();
            if expect_clean {
                assert!(
                    !delta.contains(REPLACEMENT),
                    "delta {delta:?} for ids {ids:?}"
                );
            }
            out.push_str(&delta);
        }
        out.push_str(&dec.finish().unwrap());
        assert_eq!(dec.finish().unwrap(), "");
        out
    }

    #[test]
    fn tokens_split_multibyte_characters() {
        for (name, tok, _) in all_tokenizers() {
            let ids = tok.encode(TEXTS[0], false).unwrap().get_ids().to_vec();
            // The point of the test: some tokens must be partial characters.
            let partial = ids
                .iter()
                .filter(|&&id| tok.decode(&[id], true).unwrap().contains(REPLACEMENT))
                .count();
            assert!(
                partial > 5,
                "{name}: only {partial} partial-character tokens"
            );
        }
    }

    #[test]
    fn concatenation_equals_full_decode() {
        for (name, tok, eos) in all_tokenizers() {
            for text in TEXTS {
                let mut ids = tok.encode(*text, false).unwrap().get_ids().to_vec();
                // A special token mid-stream and at the end is skipped, as in the full decode.
                ids.insert(ids.len() / 2, eos);
                ids.push(eos);
                let full = tok.decode(&ids, true).unwrap();
                assert!(!full.contains(REPLACEMENT), "{name}: {full:?}");
                assert_eq!(stream(&tok, &[], &ids, true), full, "{name}: {text:?}");
            }
        }
    }

    #[test]
    fn prompt_tail_gives_context() {
        for (name, tok, _) in all_tokenizers() {
            for text in TEXTS {
                let ids = tok.encode(*text, false).unwrap().get_ids().to_vec();
                let full = tok.decode(&ids, true).unwrap();
                for split in 0..=ids.len() {
                    let (tail, generated) = ids.split_at(split);
                    let prompt_text = tok.decode(tail, true).unwrap();
                    if prompt_text.ends_with(REPLACEMENT) {
                        // The prompt ends mid-character; its bytes belong to the output text.
                        continue;
                    }
                    let out = stream(&tok, tail, generated, true);
                    assert_eq!(
                        format!("{prompt_text}{out}"),
                        full,
                        "{name}: split {split} of {text:?}"
                    );
                }
            }
        }
        // Sentencepiece: with context, the first generated word keeps its space.
        let tok = Arc::new(byte_fallback_tokenizer(false, false));
        let ids = tok.encode("the world", false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 2);
        assert_eq!(stream(&tok, &ids[..1], &ids[1..], true), " world");
        assert_eq!(stream(&tok, &[], &ids[1..], true), "world");
    }

    #[test]
    fn held_bytes_are_released_lossily_at_finish() {
        let tok = Arc::new(byte_fallback_tokenizer(false, false));
        // "a" then the first two bytes of "€" (E2 82 AC): the end stays held until finish.
        let ids = [3 + 0xE2, 3 + 0x82];
        let a = tok.token_to_id("a").unwrap();
        let mut dec = IncrementalDecoder::new(tok.clone(), &[]);
        assert_eq!(dec.push(a).unwrap(), "a");
        assert_eq!(dec.push(ids[0]).unwrap(), "");
        assert_eq!(dec.push(ids[1]).unwrap(), "");
        let rest = dec.finish().unwrap();
        assert!(rest.chars().all(|c| c == REPLACEMENT) && !rest.is_empty());
        // Completing it instead releases the whole character at once.
        let mut dec = IncrementalDecoder::new(tok, &[]);
        assert_eq!(dec.push(ids[0]).unwrap(), "");
        assert_eq!(dec.push(ids[1]).unwrap(), "");
        assert_eq!(dec.push(3 + 0xAC).unwrap(), "€");
        assert_eq!(dec.finish().unwrap(), "");
    }

    /// Random id sequences (specials, spaces, merges, multibyte characters in pieces) still
    /// reassemble exactly. Byte-level decoding is lossy per invalid byte, so any ids work there;
    /// ByteFallback turns a whole byte run into U+FFFDs if any byte in it is invalid, so later
    /// tokens can rewrite earlier text and only valid byte runs are generated for it.
    #[test]
    fn random_ids_reassemble() {
        let mut rng = StdRng::seed_from_u64(17);
        let chars: Vec<char> = "aZ é€你😀🇺\u{10FFFF}\u{80}".chars().collect();
        for (name, tok, _) in all_tokenizers() {
            let vocab = tok.get_vocab_size(true) as u32;
            let byte_level = name == "byte-level";
            for _ in 0..300 {
                let mut ids = Vec::new();
                while ids.len() < 30 {
                    let id = rng.random_range(0..vocab);
                    let is_byte = (3..3 + 256).contains(&id);
                    if byte_level || !is_byte {
                        ids.push(id);
                    } else {
                        let c = chars[rng.random_range(0..chars.len())];
                        let mut buf = [0u8; 4];
                        ids.extend(c.encode_utf8(&mut buf).bytes().map(|b| 3 + b as u32));
                    }
                }
                let full = tok.decode(&ids, true).unwrap();
                assert_eq!(stream(&tok, &[], &ids, false), full, "{name}: {ids:?}");
            }
        }
    }

    #[test]
    fn window_stays_small() {
        let tok = Arc::new(byte_level_tokenizer());
        let ids = tok
            .encode(TEXTS[0].repeat(20).as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut dec = IncrementalDecoder::new(tok, &[]);
        for &id in &ids {
            dec.push(id).unwrap();
            assert!(dec.tokens.len() <= 8, "{dec:?}");
        }
    }
}
