//! A small GPT-2 style byte-level BPE tokenizer, written as `tokenizer.json` text.
//!
//! Ids `0..256` are the 256 byte-level characters in GPT-2's `bytes_to_unicode` order (the order
//! of GPT-2's own `encoder.json`: `!` is 0, ..., byte 0x00 (`Ā`) is 188), then one id per merge
//! result in merge order, then the special tokens. The total is a multiple of 8.

use serde_json::{json, Map, Value};

/// Merges of common English pairs, in rank order. Every merge result is reachable: encoding its
/// text gives exactly that one token (a unit test checks this).
const MERGES: [(&str, &str); 45] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġ", "a"),
    ("i", "n"),
    ("Ġt", "he"),
    ("t", "he"),
    ("r", "e"),
    ("o", "n"),
    ("e", "r"),
    ("Ġ", "s"),
    ("a", "t"),
    ("e", "n"),
    ("o", "r"),
    ("Ġ", "o"),
    ("Ġ", "w"),
    ("e", "s"),
    ("n", "d"),
    ("i", "s"),
    ("Ġ", "c"),
    ("i", "t"),
    ("Ġ", "b"),
    ("a", "n"),
    ("Ġ", "f"),
    ("e", "d"),
    ("Ġ", "p"),
    ("in", "g"),
    ("o", "u"),
    ("Ġ", "m"),
    ("a", "r"),
    ("Ġ", "h"),
    ("l", "l"),
    ("Ġ", "i"),
    ("Ġo", "f"),
    ("Ġa", "nd"),
    ("Ġ", "d"),
    ("Ġt", "o"),
    ("Ġ", "l"),
    ("Ġ", "in"),
    ("Ġ", "is"),
    ("o", "w"),
    ("t", "h"),
    ("Ġ", "y"),
    ("Ġ", "n"),
    ("l", "e"),
    ("Ġ", "re"),
];

/// Number of byte-level base tokens.
const NUM_BYTES: usize = 256;

/// `<|endoftext|>`: the BOS token.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// `<|im_start|>`: opens a ChatML turn.
pub const IM_START: &str = "<|im_start|>";
/// `<|im_end|>`: closes a ChatML turn; the EOS token.
pub const IM_END: &str = "<|im_end|>";

/// Id of `<|endoftext|>` (the BOS token, and a second EOS in `generation_config.json`).
pub const ENDOFTEXT_ID: u32 = (NUM_BYTES + MERGES.len()) as u32;
/// Id of `<|im_start|>`.
pub const IM_START_ID: u32 = ENDOFTEXT_ID + 1;
/// Id of `<|im_end|>` (the EOS token in `config.json`).
pub const IM_END_ID: u32 = ENDOFTEXT_ID + 2;
/// Number of tokens in the tokenizer: bytes, merges and specials. Also the model's vocab size.
pub const VOCAB_SIZE: usize = IM_END_ID as usize + 1;

const _: () = assert!(
    VOCAB_SIZE.is_multiple_of(8),
    "keep the vocab a multiple of 8"
);

/// GPT-2's `bytes_to_unicode`, as `(byte, char)` pairs in vocab-id order.
pub(crate) fn byte_level_alphabet() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut out: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !printable(b) {
            // 256 + n is always a valid scalar value (< 0x200).
            out.push((b, char::from_u32(256 + n).unwrap_or('\u{fffd}')));
            n += 1;
        }
    }
    out
}

/// The vocab entries of the BPE model (no special tokens), in id order.
fn bpe_vocab() -> Vec<String> {
    let mut vocab: Vec<String> = byte_level_alphabet()
        .into_iter()
        .map(|(_, c)| c.to_string())
        .collect();
    vocab.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    vocab
}

/// The byte-level BPE tokenizer as Hugging Face `tokenizer.json` text.
pub fn tokenizer_json() -> String {
    let mut vocab = Map::new();
    for (id, tok) in bpe_vocab().into_iter().enumerate() {
        vocab.insert(tok, json!(id));
    }
    let merges: Vec<String> = MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let added_tokens: Vec<Value> = [
        (ENDOFTEXT_ID, ENDOFTEXT),
        (IM_START_ID, IM_START),
        (IM_END_ID, IM_END),
    ]
    .iter()
    .map(|(id, content)| {
        json!({
            "id": id,
            "content": content,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": true,
        })
    })
    .collect();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": true,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    pretty(&tok)
}

/// The ChatML chat template of Qwen2 / SmolLM2.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// `tokenizer_config.json` text: specials, ChatML template, no BOS added.
pub(crate) fn tokenizer_config_json(max_len: usize) -> String {
    let mut decoder = Map::new();
    for (id, content) in [
        (ENDOFTEXT_ID, ENDOFTEXT),
        (IM_START_ID, IM_START),
        (IM_END_ID, IM_END),
    ] {
        decoder.insert(
            id.to_string(),
            json!({
                "content": content,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true,
            }),
        );
    }
    pretty(&json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": ENDOFTEXT,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": IM_END,
        "model_max_length": max_len,
        "pad_token": ENDOFTEXT,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": null,
    }))
}

/// Pretty JSON with a trailing newline. Serializing a `Value` cannot fail.
pub(crate) fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::str::FromStr;
    use tokenizers::Tokenizer;

    fn tok() -> Tokenizer {
        Tokenizer::from_str(&tokenizer_json()).unwrap()
    }

    #[test]
    fn alphabet_is_gpt2() {
        let a = byte_level_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[0], (b'!', '!'));
        assert_eq!(a[188], (0, 'Ā'));
        // Space is byte 0x20, the 33rd non-printable byte -> U+0120 'Ġ'.
        assert!(a.contains(&(b' ', 'Ġ')));
        assert!(a.contains(&(b'\n', 'Ċ')));
        let bytes: HashSet<u8> = a.iter().map(|p| p.0).collect();
        let chars: HashSet<char> = a.iter().map(|p| p.1).collect();
        assert_eq!((bytes.len(), chars.len()), (256, 256));
    }

    #[test]
    fn vocab_is_unique_and_merges_are_well_formed() {
        let v = bpe_vocab();
        let set: HashSet<&String> = v.iter().collect();
        assert_eq!(set.len(), v.len(), "duplicate vocab entries");
        for (i, (a, b)) in MERGES.iter().enumerate() {
            let earlier = &v[..NUM_BYTES + i];
            assert!(earlier.iter().any(|t| t == a), "merge {i}: {a} unknown");
            assert!(earlier.iter().any(|t| t == b), "merge {i}: {b} unknown");
        }
    }

    #[test]
    fn loads_with_expected_size_and_specials() {
        let t = tok();
        assert_eq!(t.get_vocab_size(true), VOCAB_SIZE);
        assert_eq!(t.token_to_id(ENDOFTEXT), Some(ENDOFTEXT_ID));
        assert_eq!(t.token_to_id(IM_START), Some(IM_START_ID));
        assert_eq!(t.token_to_id(IM_END), Some(IM_END_ID));
        assert_eq!(t.id_to_token(0).as_deref(), Some("!"));
        // Space is the 33rd remapped byte: 188 + 32, as in GPT-2.
        assert_eq!(t.token_to_id("Ġ"), Some(220));
    }

    #[test]
    fn merges_apply() {
        let t = tok();
        let e = t.encode("the", false).unwrap();
        assert_eq!(e.get_tokens(), ["the"]);
        let e = t.encode("the cat and the dog", false).unwrap();
        assert_eq!(
            e.get_tokens(),
            ["the", "Ġc", "at", "Ġand", "Ġthe", "Ġd", "o", "g"]
        );
        // Every merge result is reachable: its text encodes to exactly that token.
        let alphabet: std::collections::HashMap<char, u8> = byte_level_alphabet()
            .into_iter()
            .map(|(b, c)| (c, b))
            .collect();
        for (i, (a, b)) in MERGES.iter().enumerate() {
            let bytes: Vec<u8> = format!("{a}{b}").chars().map(|c| alphabet[&c]).collect();
            let text = String::from_utf8(bytes).unwrap();
            let e = t.encode(text.as_str(), false).unwrap();
            assert_eq!(e.get_ids(), [(NUM_BYTES + i) as u32], "merge {a} {b}");
        }
    }

    #[test]
    fn round_trips_utf8() {
        let t = tok();
        let texts = [
            "",
            "Hello, world!",
            "the quick brown fox jumps over the lazy dog\n\n  tabs\tand  spaces  ",
            "日本語のテキスト、中文文本，한국어",
            "emoji 🦀🎉👩‍👩‍👧‍👦 and flags 🇫🇷 ✓",
            "control \u{0} \u{1b}[0m bytes \u{7f} and café naïve",
            "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        ];
        for text in texts {
            let e = t.encode(text, false).unwrap();
            let ids = e.get_ids();
            assert!(ids.iter().all(|&id| (id as usize) < VOCAB_SIZE));
            let back = t.decode(ids, false).unwrap();
            assert_eq!(back, text);
        }
        // Specials are single tokens and skippable.
        let e = t.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(e.get_ids()[0], IM_START_ID);
        assert_eq!(*e.get_ids().last().unwrap(), IM_END_ID);
        assert_eq!(t.decode(e.get_ids(), true).unwrap(), "user\nhi");
    }

    #[test]
    fn round_trips_random_utf8() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let t = tok();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let len = rng.random_range(0..40);
            let text: String = (0..len)
                .map(|_| match rng.random_range(0..4) {
                    0 => char::from(rng.random_range(0x20u8..0x7f)),
                    1 => rng.random_range('\u{80}'..'\u{800}'),
                    2 => rng.random_range('\u{4e00}'..'\u{9fff}'),
                    _ => rng.random_range('\u{1f300}'..'\u{1faff}'),
                })
                .collect();
            let e = t.encode(text.as_str(), false).unwrap();
            assert_eq!(t.decode(e.get_ids(), false).unwrap(), text);
        }
    }
}
