//! Prefix-tuning (Li & Liang, 2021) as MeZO trains it (`--prefix_tuning --no_reparam`): every
//! layer's attention gets `num_prefix` extra key and value vectors that every position attends to,
//! and only those vectors train.
//!
//! The values are kept in PEFT's layout, the `prompt_embeddings` tensor
//! `[num_prefix, layers * 2 * hidden]`: row p holds virtual token p's key then value for layer 0,
//! then layer 1, …; each `hidden` wide with the heads back to back (k_proj's output layout). As in
//! PEFT, the prefix stands for `num_prefix` tokens read before the input: the input's positions
//! start at `num_prefix` (MeZO's own hook keeps them at 0; PEFT's convention is the one a user
//! serving the exported prefix gets, and with it the initialisation from real activations is
//! exactly the cache of a model that read those tokens first).

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{io_err, ModelError, Result};
use crate::OptConfig;

/// PEFT's key of the prefix in `adapter_model.safetensors`.
pub const PREFIX_KEY: &str = "prompt_embeddings";

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixConfig {
    /// Virtual tokens a layer (MeZO: 5).
    pub num_prefix: i64,
}

impl PrefixConfig {
    /// `[num_prefix, layers * 2 * hidden]`, PEFT's `prompt_embeddings`.
    pub fn shape(&self, c: &OptConfig) -> [i64; 2] {
        [self.num_prefix, c.num_hidden_layers * 2 * c.hidden_size]
    }

    pub fn numel(&self, c: &OptConfig) -> i64 {
        let [p, w] = self.shape(c);
        p * w
    }
}

/// Prefixes for one forward pass: `variants` copies stacked on dim 0, in the model's dtype. Row
/// `i` of a batch of `variants * k` rows uses variant `i / k` (as [`crate::LoraBatch`]).
pub struct PrefixBatch {
    pub variants: i64,
    pub num_prefix: i64,
    /// Each layer's `[variants, num_prefix, 2, hidden]` (views of one tensor unless placed).
    kv: Vec<Tensor>,
}

impl PrefixBatch {
    /// `flat` is `[variants, P]`, each row a flattened `prompt_embeddings`.
    pub fn from_flat(flat: &Tensor, cfg: &PrefixConfig, model: &OptConfig, kind: Kind) -> Result<Self> {
        let (variants, total) = flat.size2()?;
        if total != cfg.numel(model) || cfg.num_prefix < 1 {
            return Err(ModelError::InvalidArgument {
                what: "prefix parameter vector length",
                value: total.to_string(),
                expected: "num_prefix * layers * 2 * hidden_size, with num_prefix >= 1",
            });
        }
        let flat = if flat.kind() == kind { flat.shallow_clone() } else { flat.to_kind(kind) };
        let kv = flat.view([variants, cfg.num_prefix, model.num_hidden_layers, 2, model.hidden_size]);
        let kv = (0..model.num_hidden_layers).map(|l| kv.select(2, l)).collect();
        Ok(PrefixBatch { variants, num_prefix: cfg.num_prefix, kv })
    }

    /// A copy whose layers' prefixes sit on those layers' devices (a model split over devices).
    pub fn placed(&self, p: &crate::Placement) -> Self {
        let kv = self.kv.iter().enumerate().map(|(l, t)| t.to_device(p.layer(l))).collect();
        PrefixBatch { variants: self.variants, num_prefix: self.num_prefix, kv }
    }

    /// Layer `layer`'s prefix keys and values for a batch of `rows` rows grouped by variant:
    /// `[rows, num_prefix, hidden]` each (broadcast views, no copies of the rows).
    pub fn layer(&self, layer: usize, rows: i64) -> (Tensor, Tensor) {
        let v = self.variants;
        let kv = &self.kv[layer];
        let per_row = |t: Tensor| {
            let (_, p, h) = t.size3().expect("[variants, prefix, hidden]");
            t.unsqueeze(1).expand([v, rows / v, p, h], false).reshape([rows, p, h])
        };
        (per_row(kv.select(2, 0)), per_row(kv.select(2, 1)))
    }
}

/// A PEFT prefix-tuning adapter directory (`peft_type` PREFIX_TUNING, no projection).
pub struct PrefixAdapter {
    pub config: PrefixConfig,
    /// `[num_prefix * layers * 2 * hidden]` float32, `prompt_embeddings` flattened.
    pub flat: Tensor,
}

impl PrefixAdapter {
    /// Reads `adapter_config.json` (its shape fields must match `model`) and the prefix.
    pub fn load(dir: &Path, model: &OptConfig) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let json = read_json(&cfg_path)?;
        let field =
            |f: &str, m: String| ModelError::Config { path: cfg_path.clone(), field: f.into(), message: m };
        match json.get("peft_type").and_then(|v| v.as_str()) {
            Some("PREFIX_TUNING") => {}
            other => return Err(field("peft_type", format!("{other:?} is not PREFIX_TUNING"))),
        }
        if json.get("prefix_projection").and_then(|v| v.as_bool()) == Some(true) {
            return Err(field(
                "prefix_projection",
                "only prefixes without a projection MLP are supported".into(),
            ));
        }
        let int = |f: &str| {
            json.get(f).and_then(|v| v.as_i64()).ok_or_else(|| field(f, "missing or not an integer".into()))
        };
        let num_prefix = int("num_virtual_tokens")?;
        if num_prefix < 1 {
            return Err(field("num_virtual_tokens", format!("{num_prefix} is not a positive count")));
        }
        for (f, want) in [
            ("token_dim", model.hidden_size),
            ("num_layers", model.num_hidden_layers),
            ("num_attention_heads", model.num_attention_heads),
        ] {
            let got = int(f)?;
            if got != want {
                return Err(field(f, format!("{got} does not match the model's {want}")));
            }
        }
        if let Some(n) = json.get("num_transformer_submodules").and_then(|v| v.as_i64()) {
            if n != 1 {
                return Err(field("num_transformer_submodules", format!("{n}: a decoder-only model has 1")));
            }
        }
        let config = PrefixConfig { num_prefix };
        let st_path = dir.join("adapter_model.safetensors");
        let loaded = Tensor::read_safetensors(&st_path).map_err(|e| {
            if st_path.is_file() {
                ModelError::CorruptWeights { path: st_path.clone(), message: e.to_string() }
            } else {
                ModelError::Io {
                    path: st_path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights not found"),
                }
            }
        })?;
        let w =
            loaded.into_iter().find(|(k, _)| k == PREFIX_KEY).map(|(_, t)| t).ok_or_else(|| {
                ModelError::MissingTensor { path: st_path.clone(), tensor: PREFIX_KEY.into() }
            })?;
        let shape = config.shape(model);
        if w.size() != shape {
            return Err(ModelError::ShapeMismatch {
                path: st_path,
                tensor: PREFIX_KEY.into(),
                expected: shape.to_vec(),
                actual: w.size(),
            });
        }
        Ok(PrefixAdapter { config, flat: w.to_kind(Kind::Float).flatten(0, -1) })
    }

    /// Writes PEFT's format: `adapter_config.json` and `adapter_model.safetensors` (float32).
    pub fn save(&self, dir: &Path, model: &OptConfig, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let cfg = serde_json::json!({
            "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.config.num_prefix, "token_dim": model.hidden_size,
            "num_transformer_submodules": 1, "num_attention_heads": model.num_attention_heads,
            "num_layers": model.num_hidden_layers, "encoder_hidden_size": model.hidden_size,
            "prefix_projection": false, "inference_mode": true, "modules_to_save": null,
            "base_model_name_or_path": base_model, "revision": null,
        });
        let cfg_path = dir.join("adapter_config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).expect("json"))
            .map_err(io_err(&cfg_path))?;
        let t = self.flat.to_device(tch::Device::Cpu).to_kind(Kind::Float).view(self.config.shape(model));
        let path = dir.join("adapter_model.safetensors");
        Tensor::write_safetensors(&[(PREFIX_KEY, t.contiguous())], &path)
            .map_err(|e| ModelError::CorruptWeights { path, message: e.to_string() })
    }
}

/// `adapter_config.json`'s `peft_type` (to pick the loader).
pub fn peft_type(dir: &Path) -> Result<String> {
    let p = dir.join("adapter_config.json");
    let json = read_json(&p)?;
    json.get("peft_type").and_then(|v| v.as_str()).map(str::to_string).ok_or_else(|| ModelError::Config {
        path: p,
        field: "peft_type".into(),
        message: "missing or not a string".into(),
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })
}
