//! `config.json` of an HF OPT checkpoint, mirrored field for field (candle's habit: a serde
//! struct with HF's names and defaults, validated once into the runtime [`OptConfig`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{io_err, ModelError, Result};

/// The activations HF's `ACT2FN` offers that OPT checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Gelu,
    GeluTanh,
    Silu,
}

#[derive(Debug, Deserialize)]
struct RawOptConfig {
    model_type: Option<String>,
    #[serde(default = "d_vocab")]
    vocab_size: i64,
    #[serde(default = "d_hidden")]
    hidden_size: i64,
    #[serde(default = "d_layers")]
    num_hidden_layers: i64,
    #[serde(default = "d_ffn")]
    ffn_dim: i64,
    #[serde(default = "d_heads")]
    num_attention_heads: i64,
    #[serde(default = "d_max_pos")]
    max_position_embeddings: i64,
    #[serde(default = "d_true")]
    do_layer_norm_before: bool,
    #[serde(default, rename = "_remove_final_layer_norm")]
    remove_final_layer_norm: bool,
    word_embed_proj_dim: Option<i64>,
    #[serde(default = "d_act")]
    activation_function: String,
    #[serde(default = "d_true")]
    enable_bias: bool,
    #[serde(default = "d_true")]
    layer_norm_elementwise_affine: bool,
    #[serde(default = "d_true")]
    tie_word_embeddings: bool,
    pad_token_id: Option<i64>,
    bos_token_id: Option<i64>,
    eos_token_id: Option<serde_json::Value>,
}

fn d_vocab() -> i64 {
    50272
}
fn d_hidden() -> i64 {
    768
}
fn d_layers() -> i64 {
    12
}
fn d_ffn() -> i64 {
    3072
}
fn d_heads() -> i64 {
    12
}
fn d_max_pos() -> i64 {
    2048
}
fn d_true() -> bool {
    true
}
fn d_act() -> String {
    "relu".into()
}

/// A validated OPT configuration: every size positive, heads dividing the width.
#[derive(Debug, Clone, PartialEq)]
pub struct OptConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub ffn_dim: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    /// Pre-LayerNorm (125m, 1.3b, …) when true; post-LayerNorm (350m) when false.
    pub do_layer_norm_before: bool,
    pub remove_final_layer_norm: bool,
    /// Width of the token embeddings; differs from `hidden_size` in 350m, which then carries
    /// `project_in` / `project_out`.
    pub word_embed_proj_dim: i64,
    pub activation: Activation,
    pub enable_bias: bool,
    pub layer_norm_elementwise_affine: bool,
    pub tie_word_embeddings: bool,
    pub pad_token_id: i64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
}

/// OPT's learned positions start at index 2 (fairseq reserved 0 and 1 for padding).
pub const OPT_POSITION_OFFSET: i64 = 2;

impl OptConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    pub fn has_projections(&self) -> bool {
        self.word_embed_proj_dim != self.hidden_size
    }

    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }

    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawOptConfig = serde_json::from_str(text)
            .map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
        let field_err = |field: &str, message: String| ModelError::Config {
            path: PathBuf::from(path),
            field: field.into(),
            message,
        };
        match raw.model_type.as_deref() {
            Some("opt") => {}
            Some(other) => {
                return Err(ModelError::UnsupportedModelType {
                    path: path.to_path_buf(),
                    model_type: other.into(),
                })
            }
            None => return Err(field_err("model_type", "missing (expected \"opt\")".into())),
        }
        for (field, value) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("ffn_dim", raw.ffn_dim),
            ("num_attention_heads", raw.num_attention_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ] {
            if value <= 0 {
                return Err(field_err(field, format!("must be a positive integer, got {value}")));
            }
        }
        if raw.hidden_size % raw.num_attention_heads != 0 {
            return Err(field_err(
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", raw.num_attention_heads, raw.hidden_size),
            ));
        }
        let word_embed_proj_dim = raw.word_embed_proj_dim.unwrap_or(raw.hidden_size);
        if word_embed_proj_dim <= 0 {
            return Err(field_err(
                "word_embed_proj_dim",
                format!("must be a positive integer, got {word_embed_proj_dim}"),
            ));
        }
        let activation = match raw.activation_function.as_str() {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(field_err(
                    "activation_function",
                    format!("`{other}` is not supported (relu, gelu, gelu_new, silu)"),
                ))
            }
        };
        let eos_token_id = match &raw.eos_token_id {
            None => 2,
            Some(serde_json::Value::Number(n)) => n.as_i64().unwrap_or(2),
            Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_i64()).unwrap_or(2),
            Some(_) => 2,
        };
        let pad_token_id = raw.pad_token_id.unwrap_or(1);
        if !(0..raw.vocab_size).contains(&pad_token_id) {
            return Err(field_err(
                "pad_token_id",
                format!("{pad_token_id} is outside the vocabulary (0..{})", raw.vocab_size),
            ));
        }
        Ok(OptConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            ffn_dim: raw.ffn_dim,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            do_layer_norm_before: raw.do_layer_norm_before,
            remove_final_layer_norm: raw.remove_final_layer_norm,
            word_embed_proj_dim,
            activation,
            enable_bias: raw.enable_bias,
            layer_norm_elementwise_affine: raw.layer_norm_elementwise_affine,
            tie_word_embeddings: raw.tie_word_embeddings,
            pad_token_id,
            bos_token_id: raw.bos_token_id.unwrap_or(2),
            eos_token_id,
        })
    }

    /// The shapes of the published OPT family (as in the MeZO paper), for benchmarks and tests
    /// that need the real sizes but not the real weights.
    pub fn shape(name: &str) -> Option<Self> {
        let (hidden, layers, ffn, heads, proj) = match name {
            "125m" => (768, 12, 3072, 12, None),
            "350m" => (1024, 24, 4096, 16, Some(512)),
            "1.3b" => (2048, 24, 8192, 32, None),
            "2.7b" => (2560, 32, 10240, 32, None),
            "6.7b" => (4096, 32, 16384, 32, None),
            "13b" => (5120, 40, 20480, 40, None),
            "30b" => (7168, 48, 28672, 56, None),
            "66b" => (9216, 64, 36864, 72, None),
            _ => return None,
        };
        let mut json = serde_json::json!({
            "model_type": "opt", "hidden_size": hidden, "num_hidden_layers": layers,
            "ffn_dim": ffn, "num_attention_heads": heads,
        });
        if let Some(p) = proj {
            json["word_embed_proj_dim"] = p.into();
            json["do_layer_norm_before"] = false.into();
        }
        Self::from_json(&json.to_string(), Path::new("<builtin>")).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<OptConfig> {
        OptConfig::from_json(json, Path::new("cfg/config.json"))
    }

    #[test]
    fn defaults_follow_hf() {
        let c = parse(r#"{"model_type":"opt"}"#).unwrap();
        assert_eq!(c, OptConfig::shape("125m").unwrap());
        assert_eq!(c.word_embed_proj_dim, 768);
        assert!(c.has_final_layer_norm());
        assert_eq!(c.pad_token_id, 1);
    }

    #[test]
    fn post_ln_variant_has_projections() {
        let c = OptConfig::shape("350m").unwrap();
        assert!(c.has_projections());
        assert!(!c.has_final_layer_norm());
    }

    #[test]
    fn bad_fields_are_named() {
        let e = parse(r#"{"model_type":"llama"}"#).unwrap_err().to_string();
        assert!(e.contains("cfg/config.json") && e.contains("llama"), "{e}");
        let e = parse(r#"{"model_type":"opt","hidden_size":10,"num_attention_heads":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads") && e.contains("hidden_size 10"), "{e}");
        let e = parse(r#"{"model_type":"opt","ffn_dim":-1}"#).unwrap_err().to_string();
        assert!(e.contains("`ffn_dim`"), "{e}");
        let e = parse(r#"{"model_type":"opt","activation_function":"mish"}"#).unwrap_err().to_string();
        assert!(e.contains("activation_function") && e.contains("mish"), "{e}");
        let e = parse(r#"{"model_type": "opt", "#).unwrap_err().to_string();
        assert!(e.contains("cfg/config.json") && e.contains("JSON"), "{e}");
        let e = parse(r#"{"hidden_size": 8}"#).unwrap_err().to_string();
        assert!(e.contains("model_type"), "{e}");
    }
}
