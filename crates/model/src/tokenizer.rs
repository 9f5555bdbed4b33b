//! The text side of a model: its `tokenizers::Tokenizer`, chat template and stop ids, from a
//! Hugging Face folder or built from a GGUF file's own vocabulary, merges and special tokens.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use serde::Serialize;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

/// One chat message, rendered by the model's own template.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Clone)]
pub struct TextModel {
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every id that ends generation (config, generation_config and tokenizer EOS).
    pub eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

impl TextModel {
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer {
                path: "encode".into(),
                reason: e.to_string(),
            })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer {
                path: "decode".into(),
                reason: e.to_string(),
            })
    }

    /// Renders `messages` with the model's chat template (ending with the assistant's turn).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::ChatTemplate("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }

    /// A stable hash of the vocabulary, so a router, a verifier and a draft can check that they
    /// speak the same token ids. FNV-1a over (id, token) in id order: std's hasher is not
    /// guaranteed stable across releases, and this needs no extra dependency.
    pub fn vocab_hash(&self) -> String {
        let mut vocab: Vec<(String, u32)> = self.tokenizer.get_vocab(true).into_iter().collect();
        vocab.sort_by_key(|(_, id)| *id);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (tok, id) in vocab {
            for b in id.to_le_bytes().iter().chain(tok.as_bytes()) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }

    /// tokenizer.json text, to ship the tokenizer to a router that has no model files.
    pub fn tokenizer_json(&self) -> Result<String> {
        self.tokenizer
            .to_string(false)
            .map_err(|e| ModelError::Tokenizer {
                path: "serialize".into(),
                reason: e.to_string(),
            })
    }

    /// The counterpart of `tokenizer_json`: rebuilds a `TextModel` from its parts.
    pub fn from_parts(
        tokenizer_json: &str,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        eos_token_ids: Vec<u32>,
    ) -> Result<Self> {
        let tokenizer: Tokenizer =
            tokenizer_json
                .parse()
                .map_err(|e: tokenizers::Error| ModelError::Tokenizer {
                    path: "tokenizer_json".into(),
                    reason: e.to_string(),
                })?;
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            chat_template,
            bos_token,
            eos_token,
            eos_token_ids,
        })
    }

    /// Loads tokenizer.json, tokenizer_config.json (chat template, special tokens) and
    /// generation_config.json (EOS ids) from a Hugging Face folder.
    pub fn from_hf_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Tokenizer {
            path: tok_path.clone(),
            reason: e.to_string(),
        })?;
        let tcfg = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gcfg = read_json_opt(&dir.join("generation_config.json"))?;
        let token_str = |v: Option<&Value>| -> Option<String> {
            match v? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let chat_template = tcfg.as_ref().and_then(|c| match c.get("chat_template")? {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            Value::Array(a) => a.iter().find_map(|t| {
                (t.get("name")?.as_str()? == "default")
                    .then(|| t.get("template")?.as_str().map(str::to_owned))
                    .flatten()
            }),
            _ => None,
        });
        let bos_token = token_str(tcfg.as_ref().and_then(|c| c.get("bos_token")));
        let eos_token = token_str(tcfg.as_ref().and_then(|c| c.get("eos_token")));
        let mut eos_token_ids = config_eos.to_vec();
        if let Some(g) = gcfg.as_ref().and_then(|g| g.get("eos_token_id")) {
            match g {
                Value::Number(n) => eos_token_ids.extend(n.as_u64().map(|n| n as u32)),
                Value::Array(a) => {
                    eos_token_ids.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
                }
                _ => {}
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_token_ids.push(id);
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            chat_template,
            bos_token,
            eos_token,
            eos_token_ids,
        })
    }

    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata (the GPT-2 style
    /// byte-level BPE that Llama 3, SmolLM2 and Qwen2 use).
    pub fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let err = |reason: String| ModelError::Tokenizer {
            path: path.to_owned(),
            reason,
        };
        let get = |key: &str| -> Result<&gguf_file::Value> {
            md.get(key).ok_or_else(|| ModelError::MissingKey {
                path: path.to_owned(),
                key: key.to_owned(),
            })
        };
        let kind = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| err(e.to_string()))?
            .clone();
        if kind != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model '{kind}' is not supported (supported: gpt2 byte-level BPE)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            get(key)?
                .to_vec()
                .map_err(|e| err(format!("{key}: {e}")))?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| err(format!("{key}: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| err(e.to_string()))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".into());
        let id_of = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let eot_id = id_of("tokenizer.ggml.eot_token_id");

        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.clone(), json!(id));
            // 3 = control (special), 4 = user-defined: matched whole, never split by BPE.
            let ty = types.get(id).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3,
                }));
            }
        }
        const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        let (normalizer, pre_tokenizer) = match pre.as_str() {
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            ),
            "llama-bpe" | "llama3" | "smaug-bpe" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            ),
            "smollm" | "starcoder" | "refact" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            ),
            _ => (Value::Null, byte_level(true)),
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": byte_level(true),
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let tokenizer: Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| err(e.to_string()))?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let mut eos_token_ids: Vec<u32> = [eos_id, eot_id].into_iter().flatten().collect();
        // Chat models end turns with these; GGUF often names only one of them as EOS.
        for t in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ] {
            if let Some(id) = tokenizer.token_to_id(t) {
                if types.get(id as usize) == Some(&3) {
                    eos_token_ids.push(id);
                }
            }
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            eos_token_ids,
        })
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ModelError::Json {
            path: path.to_owned(),
            source,
        })
}
