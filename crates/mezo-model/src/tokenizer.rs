//! The checkpoint's tokenizer as HF transformers would build it: `tokenizer.json` when present,
//! else a byte-level BPE from `vocab.json` + `merges.txt`, with `tokenizer_config.json`'s
//! `add_bos_token` honoured (OPT prepends `</s>` as its BOS).

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{io_err, ModelError, Result};

pub struct TextTokenizer {
    inner: Tokenizer,
    /// Prepended by us when the tokenizer's own post-processor does not.
    bos: Option<u32>,
    source: PathBuf,
}

#[derive(Default)]
struct TokenizerConfig {
    add_bos_token: Option<bool>,
    add_prefix_space: bool,
    bos_token: Option<String>,
    specials: Vec<String>,
}

fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn read_tokenizer_config(dir: &Path) -> Result<TokenizerConfig> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(TokenizerConfig::default());
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.clone(), source })?;
    let mut specials = Vec::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(s) = json.get(key).and_then(token_content) {
            specials.push(s);
        }
    }
    if let Some(added) = json.get("added_tokens_decoder").and_then(|a| a.as_object()) {
        specials.extend(added.values().filter_map(token_content));
    }
    Ok(TokenizerConfig {
        add_bos_token: json.get("add_bos_token").and_then(|b| b.as_bool()),
        add_prefix_space: json.get("add_prefix_space").and_then(|b| b.as_bool()).unwrap_or(false),
        bos_token: json.get("bos_token").and_then(token_content),
        specials,
    })
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg = read_tokenizer_config(dir)?;
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let tok_err = |path: &Path, e: Box<dyn std::error::Error + Send + Sync>| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let (inner, source) = if json.is_file() {
            let bytes = std::fs::read(&json).map_err(io_err(&json))?;
            // The whole document as JSON values first, with line and column: the tokenizers
            // crate panics (`expect("Helper")` in 0.22) when its `decoder` object is not valid JSON
            // (a syntax error, an invalid \u escape), where a user's corrupt file must get an
            // error. Parsed into values, not skipped, since skipping does not check escapes.
            // Found by fuzzing (crates/mezo-fuzz).
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| tok_err(&json, format!("not valid JSON: {e}").into()))?;
            (Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(&json, e))?, json)
        } else if vocab.is_file() && merges.is_file() {
            for p in [&vocab, &merges] {
                std::fs::metadata(p).map_err(io_err(p))?;
            }
            let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
                .build()
                .map_err(|e| tok_err(&vocab, e))?;
            let mut t = Tokenizer::new(bpe);
            t.with_pre_tokenizer(Some(ByteLevel::new(cfg.add_prefix_space, true, true)));
            t.with_decoder(Some(ByteLevelDecoder::default()));
            let specials: Vec<AddedToken> =
                cfg.specials.iter().map(|s| AddedToken::from(s.clone(), true)).collect();
            t.add_special_tokens(&specials);
            (t, vocab)
        } else {
            return Err(ModelError::NoTokenizer { dir: dir.to_path_buf() });
        };
        let bos = match (cfg.add_bos_token, &cfg.bos_token) {
            (Some(true), Some(tok)) => Some(inner.token_to_id(tok).ok_or_else(|| ModelError::Tokenizer {
                path: dir.join("tokenizer_config.json"),
                message: format!("bos_token `{tok}` is not in the vocabulary"),
            })?),
            (Some(true), None) => {
                return Err(ModelError::Tokenizer {
                    path: dir.join("tokenizer_config.json"),
                    message: "add_bos_token is true but no bos_token is given".into(),
                })
            }
            _ => None,
        };
        Ok(TextTokenizer { inner, bos, source })
    }

    /// Token ids of `text` with the special tokens the checkpoint's tokenizer adds.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, true).map_err(|e| ModelError::Tokenizer {
            path: self.source.clone(),
            message: format!("cannot encode {text:?}: {e}"),
        })?;
        let mut ids: Vec<i64> = Vec::with_capacity(enc.len() + 1);
        if let Some(bos) = self.bos {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos as i64);
            }
        }
        ids.extend(enc.get_ids().iter().map(|&i| i as i64));
        Ok(ids)
    }

    /// Text of token ids, special tokens skipped (as HF's `decode(..., skip_special_tokens=True)`).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, true).map_err(|e| ModelError::Tokenizer {
            path: self.source.clone(),
            message: format!("cannot decode {} token(s): {e}", ids.len()),
        })
    }

    /// Every token whose text holds a newline: where MeZO's generation stops (`--eos_token "\n"`).
    pub fn newline_ids(&self) -> Vec<i64> {
        // Over the vocabulary's own ids: they may be sparse (not 0..vocab_size).
        let mut ids: Vec<u32> = self.inner.get_vocab(true).into_values().collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter(|&i| self.inner.decode(&[i], false).is_ok_and(|t| t.contains('\n')))
            .map(i64::from)
            .collect()
    }

    /// The largest id this tokenizer can produce (-1 for an empty vocabulary). Ids may be sparse,
    /// so it can exceed `vocab_size() - 1`.
    pub fn max_id(&self) -> i64 {
        self.inner.get_vocab(true).into_values().max().map_or(-1, i64::from)
    }

    /// Refuses a tokenizer that can produce ids the model has no embedding row for (a tokenizer
    /// from another model): otherwise the first such token would fail deep in the forward pass.
    /// Found by fuzzing the tokenizer files.
    pub fn check_fits(&self, model_vocab_size: i64) -> Result<()> {
        let max = self.max_id();
        if max >= model_vocab_size {
            return Err(ModelError::Tokenizer {
                path: self.source.clone(),
                message: format!(
                    "token ids go up to {max}, but the model's config.json has vocab_size \
                     {model_vocab_size}: the tokenizer and the model do not match"
                ),
            });
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
