//! `config.json` of the Llama family as HF transformers reads it: `llama` (Llama 2/3),
//! `qwen2` (Qwen2/2.5) and `mistral`. Each family's defaults are HF's for that `model_type`,
//! so a config.json that leaves a field out means what it means to transformers. Both RoPE
//! formats load: transformers 5's `rope_parameters` and the older `rope_theta` + `rope_scaling`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::config::Activation;
use crate::error::{ModelError, Result};

/// Which HF model class the checkpoint was saved from: decides defaults and which linear
/// layers carry biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFamily {
    Llama,
    Qwen2,
    Mistral,
}

impl LlamaFamily {
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "llama",
            LlamaFamily::Qwen2 => "qwen2",
            LlamaFamily::Mistral => "mistral",
        }
    }

    pub fn from_model_type(s: &str) -> Option<Self> {
        match s {
            "llama" => Some(LlamaFamily::Llama),
            "qwen2" => Some(LlamaFamily::Qwen2),
            "mistral" => Some(LlamaFamily::Mistral),
            _ => None,
        }
    }
}

/// How RoPE's inverse frequencies are scaled (HF's `rope_type`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows with the sequence length once it passes
    /// `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Fields as transformers names them; `None` means "absent", resolved to the family's default.
#[derive(Debug, Deserialize)]
struct RawLlamaConfig {
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<i64>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<i64>>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<i64>,
    layer_types: Option<Vec<String>>,
    pad_token_id: Option<i64>,
    eos_token_id: Option<Value>,
}

/// Tells `"sliding_window": null` (no window) apart from an absent field (the family's default).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// The most decoder layers a config.json may declare (the largest published models have 128).
pub const MAX_LAYERS: i64 = 65536;

/// A validated Llama-family configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub family: LlamaFamily,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub activation: Activation,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Biases on q_proj, k_proj, v_proj (Llama's `attention_bias`; always on in Qwen2).
    pub qkv_bias: bool,
    /// A bias on o_proj (Llama's `attention_bias` only).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub rope: Rope,
    /// The sliding attention window of each layer (`None`: full causal attention).
    pub layer_windows: Vec<Option<i64>>,
    /// The id that fills padded positions (never attended to): `pad_token_id`, else the EOS, else 0.
    pub pad_token_id: i64,
    /// The end-of-sequence id generation stops at; -1 when the config names none (Qwen2's
    /// default), where generation stops at a newline or its token budget.
    pub eos_token_id: i64,
}

impl LlamaConfig {
    /// Parses a config.json whose `model_type` is `family`'s; `path` is named in errors.
    pub fn from_json(text: &str, path: &Path, family: LlamaFamily) -> Result<Self> {
        let raw: RawLlamaConfig = serde_json::from_str(text)
            .map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
        let err = |field: &str, message: String| ModelError::Config {
            path: PathBuf::from(path),
            field: field.into(),
            message,
        };
        use LlamaFamily::*;
        // transformers' defaults for each class (configuration_{llama,qwen2,mistral}.py).
        let (vocab, inter, max_pos, kv_default) = match family {
            Llama => (32000, 11008, 2048, None),
            Qwen2 => (151936, 22016, 32768, Some(32)),
            Mistral => (32000, 14336, 131072, Some(8)),
        };
        let vocab_size = raw.vocab_size.unwrap_or(vocab);
        let hidden_size = raw.hidden_size.unwrap_or(4096);
        let intermediate_size = raw.intermediate_size.unwrap_or(inter);
        let num_hidden_layers = raw.num_hidden_layers.unwrap_or(32);
        let heads = raw.num_attention_heads.unwrap_or(32);
        let kv = raw.num_key_value_heads.or(kv_default).unwrap_or(heads);
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(max_pos);
        for (field, value) in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv),
            ("max_position_embeddings", max_position_embeddings),
        ] {
            if value <= 0 {
                return Err(err(field, format!("must be a positive integer, got {value}")));
            }
        }
        // Per-layer settings are laid out at parse time: bound the count, so a corrupt file is
        // an error and not an allocation failure.
        if num_hidden_layers > MAX_LAYERS {
            return Err(err("num_hidden_layers", format!("{num_hidden_layers} is more than {MAX_LAYERS}")));
        }
        if heads % kv != 0 {
            return Err(err(
                "num_key_value_heads",
                format!("{kv} does not divide num_attention_heads {heads} (grouped-query attention)"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) if d <= 0 => return Err(err("head_dim", format!("must be a positive integer, got {d}"))),
            Some(d) => d,
            None if hidden_size % heads != 0 => {
                return Err(err(
                    "num_attention_heads",
                    format!("{heads} does not divide hidden_size {hidden_size} (and no head_dim is given)"),
                ))
            }
            None => hidden_size / heads,
        };
        if head_dim % 2 != 0 {
            return Err(err("head_dim", format!("RoPE needs an even head dimension, got {head_dim}")));
        }
        let activation = match raw.hidden_act.as_deref().unwrap_or("silu") {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(err(
                    "hidden_act",
                    format!("`{other}` is not supported (silu, gelu, gelu_pytorch_tanh, relu)"),
                ))
            }
        };
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(err("rms_norm_eps", format!("must be a non-negative number, got {rms_norm_eps}")));
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Llama => (attention_bias, attention_bias, raw.mlp_bias.unwrap_or(false)),
            Qwen2 => (true, false, false),
            Mistral => (false, false, false),
        };
        let rope = parse_rope(&raw, max_position_embeddings, &err)?;
        let layer_windows = windows(&raw, family, num_hidden_layers, &err)?;
        let eos = match &raw.eos_token_id {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::Array(a)) => a.first().and_then(Value::as_i64),
            _ => None,
        };
        // Llama's and Mistral's classes default eos_token_id to 2; Qwen2's to none.
        let eos = eos.or(if family == Qwen2 { None } else { Some(2) });
        let pad_token_id = raw.pad_token_id.or(eos).unwrap_or(0);
        if !(0..vocab_size).contains(&pad_token_id) {
            return Err(err(
                "pad_token_id",
                format!("{pad_token_id} is outside the vocabulary (0..{vocab_size})"),
            ));
        }
        Ok(LlamaConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            activation,
            max_position_embeddings,
            rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            rope,
            layer_windows,
            pad_token_id,
            eos_token_id: eos.unwrap_or(-1),
        })
    }

    /// Published shapes of the family, for benchmarks that need the sizes, not the weights.
    pub fn shape(name: &str) -> Option<Self> {
        let (ty, hidden, layers, inter, heads, kv, vocab, tie, theta) = match name {
            "llama2-7b" => ("llama", 4096, 32, 11008, 32, 32, 32000, false, 10000.0),
            "llama2-13b" => ("llama", 5120, 40, 13824, 40, 40, 32000, false, 10000.0),
            "llama3-8b" => ("llama", 4096, 32, 14336, 32, 8, 128256, false, 500000.0),
            "llama3.2-1b" => ("llama", 2048, 16, 8192, 32, 8, 128256, true, 500000.0),
            "qwen2.5-0.5b" => ("qwen2", 896, 24, 4864, 14, 2, 151936, true, 1000000.0),
            "qwen2.5-7b" => ("qwen2", 3584, 28, 18944, 28, 4, 152064, false, 1000000.0),
            "mistral-7b" => ("mistral", 4096, 32, 14336, 32, 8, 32000, false, 10000.0),
            _ => return None,
        };
        let json = serde_json::json!({
            "model_type": ty, "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
            "vocab_size": vocab, "tie_word_embeddings": tie, "rope_theta": theta,
            "max_position_embeddings": 8192, "sliding_window": null,
        });
        let family = LlamaFamily::from_model_type(ty)?;
        Self::from_json(&json.to_string(), Path::new("<builtin>"), family).ok()
    }

    /// Width of q_proj's output (and o_proj's input): every query head.
    pub fn q_out(&self) -> i64 {
        self.num_attention_heads * self.head_dim
    }

    /// Width of k_proj's and v_proj's outputs: the key/value heads only (grouped-query attention).
    pub fn kv_out(&self) -> i64 {
        self.num_key_value_heads * self.head_dim
    }
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// RoPE from either format. Where both exist, the older `rope_scaling` wins, as in
/// transformers' `convert_rope_params_to_dict`; `rope_theta` comes from the dict, else the
/// top level, else 10000.
fn parse_rope(raw: &RawLlamaConfig, max_pos: i64, err: &dyn Fn(&str, String) -> ModelError) -> Result<Rope> {
    let (field, params) = match (&raw.rope_scaling, &raw.rope_parameters) {
        (Some(v @ Value::Object(_)), _) => ("rope_scaling", Some(v)),
        (_, Some(v @ Value::Object(_))) => ("rope_parameters", Some(v)),
        (Some(Value::Null) | None, Some(Value::Null) | None) => ("rope_parameters", None),
        (Some(v), _) | (_, Some(v)) => {
            return Err(err("rope_parameters", format!("expected an object, got {v}")));
        }
    };
    let empty = Value::Object(Default::default());
    let p = params.unwrap_or(&empty);
    let theta = num(p, "rope_theta").or(raw.rope_theta).unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(err("rope_theta", format!("must be a positive number, got {theta}")));
    }
    let partial = num(p, "partial_rotary_factor").or(raw.partial_rotary_factor).unwrap_or(1.0);
    if partial != 1.0 {
        return Err(err(
            "partial_rotary_factor",
            format!("{partial} is not supported: the Llama family rotates the whole head (1.0)"),
        ));
    }
    let ty = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = || {
        num(p, "factor")
            .filter(|f| f.is_finite() && *f >= 1.0)
            .ok_or_else(|| err(field, format!("rope type `{ty}` needs a `factor` of at least 1")))
    };
    let scaling = match ty {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => {
            let need = |k: &str| {
                num(p, k)
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| err(field, format!("rope type `llama3` needs a positive `{k}`")))
            };
            let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
            if high <= low {
                return Err(err(field, format!("high_freq_factor {high} must exceed low_freq_factor {low}")));
            }
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: num(p, "original_max_position_embeddings")
                    .unwrap_or(max_pos as f64),
            }
        }
        other => {
            return Err(err(
                field,
                format!("rope type `{other}` is not supported (default, linear, dynamic, llama3)"),
            ))
        }
    };
    Ok(Rope { theta, scaling })
}

/// Each layer's sliding window, as HF's classes decide it: Mistral applies `sliding_window`
/// (4096 when absent) to every layer; Qwen2 only with `use_sliding_window`, to the layers
/// `layer_types` marks (by default those from `max_window_layers` on); Llama has none.
fn windows(
    raw: &RawLlamaConfig,
    family: LlamaFamily,
    layers: i64,
    err: &dyn Fn(&str, String) -> ModelError,
) -> Result<Vec<Option<i64>>> {
    let n = layers as usize;
    let check = |w: Option<i64>| match w {
        Some(w) if w <= 0 => {
            Err(err("sliding_window", format!("must be a positive integer or null, got {w}")))
        }
        w => Ok(w),
    };
    Ok(match family {
        LlamaFamily::Llama => vec![None; n],
        LlamaFamily::Mistral => vec![check(raw.sliding_window.unwrap_or(Some(4096)))?; n],
        LlamaFamily::Qwen2 => {
            let w = if raw.use_sliding_window.unwrap_or(false) {
                check(raw.sliding_window.unwrap_or(Some(4096)))?
            } else {
                None
            };
            let types: Vec<String> = match &raw.layer_types {
                Some(t) if t.len() != n => {
                    return Err(err(
                        "layer_types",
                        format!("{} entries for num_hidden_layers {layers}", t.len()),
                    ))
                }
                Some(t) => t.clone(),
                None => {
                    let from = raw.max_window_layers.unwrap_or(28);
                    (0..layers)
                        .map(|i| {
                            if w.is_some() && i >= from { "sliding_attention" } else { "full_attention" }
                                .to_string()
                        })
                        .collect()
                }
            };
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => Ok(w),
                    other => Err(err(
                        "layer_types",
                        format!("`{other}` is not full_attention or sliding_attention"),
                    )),
                })
                .collect::<Result<_>>()?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, family: LlamaFamily) -> Result<LlamaConfig> {
        LlamaConfig::from_json(json, Path::new("cfg/config.json"), family)
    }

    #[test]
    fn both_rope_formats_mean_the_same() {
        let old = parse(
            r#"{"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}"#,
            LlamaFamily::Llama,
        )
        .unwrap();
        let new = parse(
            r#"{"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}"#,
            LlamaFamily::Llama,
        )
        .unwrap();
        assert_eq!(old.rope, new.rope);
        assert_eq!(old.rope, Rope { theta: 500000.0, scaling: RopeScaling::Linear { factor: 2.0 } });
        let d = parse("{}", LlamaFamily::Llama).unwrap();
        assert_eq!(d.rope, Rope { theta: 10000.0, scaling: RopeScaling::Default });
        let l3 = parse(
            r#"{"max_position_embeddings": 64, "rope_parameters": {"rope_type": "llama3", "factor": 8,
                "low_freq_factor": 1, "high_freq_factor": 4}}"#,
            LlamaFamily::Llama,
        )
        .unwrap();
        assert!(matches!(
            l3.rope.scaling,
            RopeScaling::Llama3 { original_max_position_embeddings, .. } if original_max_position_embeddings == 64.0
        ));
    }

    #[test]
    fn family_defaults_follow_hf() {
        let m = parse("{}", LlamaFamily::Mistral).unwrap();
        assert_eq!((m.num_key_value_heads, m.layer_windows[0]), (8, Some(4096)));
        let m = parse(r#"{"sliding_window": null}"#, LlamaFamily::Mistral).unwrap();
        assert_eq!(m.layer_windows[0], None);
        let q = parse(r#"{"num_hidden_layers": 4}"#, LlamaFamily::Qwen2).unwrap();
        assert!(q.qkv_bias && !q.o_bias && q.layer_windows.iter().all(Option::is_none));
        let q = parse(
            r#"{"num_hidden_layers": 4, "use_sliding_window": true, "sliding_window": 16, "max_window_layers": 2}"#,
            LlamaFamily::Qwen2,
        )
        .unwrap();
        assert_eq!(q.layer_windows, vec![None, None, Some(16), Some(16)]);
        let l = parse(
            r#"{"attention_bias": true, "hidden_size": 64, "num_attention_heads": 4}"#,
            LlamaFamily::Llama,
        )
        .unwrap();
        assert!(l.qkv_bias && l.o_bias && !l.mlp_bias);
        assert_eq!((l.head_dim, l.num_key_value_heads, l.pad_token_id), (16, 4, 2));
        for name in ["llama2-7b", "llama3-8b", "llama3.2-1b", "qwen2.5-0.5b", "qwen2.5-7b", "mistral-7b"] {
            assert!(LlamaConfig::shape(name).is_some(), "{name}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"num_attention_heads": 32, "num_key_value_heads": 5}"#, "num_key_value_heads"),
            (r#"{"hidden_size": 100, "num_attention_heads": 3}"#, "hidden_size 100"),
            (r#"{"head_dim": 7}"#, "even head dimension"),
            (r#"{"hidden_act": "mish"}"#, "mish"),
            (r#"{"rope_parameters": {"rope_type": "yarn", "factor": 4}}"#, "`yarn` is not supported"),
            (r#"{"rope_scaling": {"type": "linear"}}"#, "rope_scaling"),
            (r#"{"rope_parameters": {"rope_type": "llama3", "factor": 8}}"#, "low_freq_factor"),
            (r#"{"partial_rotary_factor": 0.5}"#, "partial_rotary_factor"),
            (r#"{"pad_token_id": 99999}"#, "pad_token_id"),
            (r#"{"intermediate_size": 0}"#, "intermediate_size"),
            (r#"{"num_hidden_layers": 1000000000000}"#, "num_hidden_layers"),
        ];
        for (json, needle) in cases {
            let e = parse(json, LlamaFamily::Llama).unwrap_err().to_string();
            assert!(e.contains("cfg/config.json") && e.contains(needle), "{json}: {e}");
        }
        let e = parse(r#"{"sliding_window": 0}"#, LlamaFamily::Mistral).unwrap_err().to_string();
        assert!(e.contains("sliding_window"), "{e}");
    }
}
