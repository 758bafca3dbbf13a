//! LoRA (Hu et al., 2021) as PEFT defines it, applied per row: a batch can carry several adapter
//! variants at once (rows grouped by variant), as multi-LoRA serving does, so MeZO's `θ+εz` and
//! `θ-εz` for every direction run in ONE forward pass.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{io_err, ModelError, Result};
use crate::model::ModelConfig;

/// The linear layers of a decoder block LoRA can adapt, by PEFT's `target_modules` names: OPT's
/// (q/k/v/out_proj, fc1, fc2) and the Llama family's (q/k/v/o_proj, gate/up/down_proj). Which
/// ones a model has is [`ModelConfig::lora_targets`]. The order (derived `Ord`) is the order of
/// the matrices in PEFT files and in the flat LoRA state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    Out,
    Fc1,
    Fc2,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 10] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::Out,
        Target::Fc1,
        Target::Fc2,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::Out => "out_proj",
            Target::Fc1 => "fc1",
            Target::Fc2 => "fc2",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// A module name of any supported architecture; whether the model at hand has it is
    /// checked against its configuration ([`ModelConfig::lora_module`]).
    pub fn parse(s: &str) -> Result<Self> {
        Target::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| ModelError::InvalidArgument {
            what: "LoRA target module",
            value: s.into(),
            expected: "q_proj, k_proj, v_proj, out_proj, fc1 or fc2 (OPT); q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj (Llama, Qwen2, Mistral)",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub targets: Vec<Target>,
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Every LoRA matrix in a fixed order with its PEFT key and shape: for each layer, each
    /// target (in `Target` order), `lora_A` `[r, in]` then `lora_B` `[out, r]`. An error names
    /// a target the model does not have.
    pub fn tensors(&self, c: &ModelConfig) -> Result<Vec<LoraTensor>> {
        let mut targets = self.targets.clone();
        targets.sort();
        targets.dedup();
        let mut out = Vec::new();
        for layer in 0..c.num_hidden_layers() as usize {
            for &t in &targets {
                let m = c.lora_module(layer, t)?;
                let (inp, outp) = (m.in_features, m.out_features);
                let base = format!("base_model.model.{}", m.path);
                out.push(LoraTensor {
                    key: format!("{base}.lora_A.weight"),
                    layer,
                    target: t,
                    is_a: true,
                    shape: [self.r, inp],
                });
                out.push(LoraTensor {
                    key: format!("{base}.lora_B.weight"),
                    layer,
                    target: t,
                    is_a: false,
                    shape: [outp, self.r],
                });
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraTensor {
    /// PEFT's key in `adapter_model.safetensors`.
    pub key: String,
    pub layer: usize,
    pub target: Target,
    pub is_a: bool,
    pub shape: [i64; 2],
}

impl LoraTensor {
    pub fn numel(&self) -> i64 {
        self.shape[0] * self.shape[1]
    }
}

/// Adapters for one forward pass: `variants` copies of every LoRA matrix, stacked on dim 0, in
/// the model's dtype. Row `i` of a batch of `variants * k` rows uses variant `i / k`.
pub struct LoraBatch {
    pub scaling: f64,
    pub variants: i64,
    mats: HashMap<(usize, Target), (Tensor, Tensor)>,
    /// Per layer whose q, k, v carry two or more adapters: their `A` matrices stacked,
    /// `[variants, m * r, in]`, and the targets in that order, so one GEMM down-projects the
    /// input for all of them ([`Self::add_qkv_delta`]).
    qkv_a: HashMap<usize, (Tensor, Vec<Target>)>,
}

impl LoraBatch {
    /// `flat` is `[variants, P]` holding every matrix of `tensors` back to back (their order);
    /// the per-module matrices are views into it, cast to `kind`.
    pub fn from_flat(flat: &Tensor, cfg: &LoraConfig, tensors: &[LoraTensor], kind: Kind) -> Result<Self> {
        let (variants, total) = flat.size2()?;
        let need: i64 = tensors.iter().map(LoraTensor::numel).sum();
        if need != total {
            return Err(ModelError::InvalidArgument {
                what: "LoRA parameter vector length",
                value: total.to_string(),
                expected: "the total size of the LoRA matrices",
            });
        }
        let flat = if flat.kind() == kind { flat.shallow_clone() } else { flat.to_kind(kind) };
        let mut mats: HashMap<(usize, Target), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        let mut off = 0;
        for t in tensors {
            let m = flat.narrow(1, off, t.numel()).view([variants, t.shape[0], t.shape[1]]);
            off += t.numel();
            let e = mats.entry((t.layer, t.target)).or_default();
            if t.is_a {
                e.0 = Some(m)
            } else {
                e.1 = Some(m)
            }
        }
        let mats: HashMap<(usize, Target), (Tensor, Tensor)> = mats
            .into_iter()
            .map(|(k, (a, b))| (k, (a.expect("lora_A present"), b.expect("lora_B present"))))
            .collect();
        let qkv_a = stack_qkv_a(&mats);
        Ok(LoraBatch { scaling: cfg.scaling(), variants, mats, qkv_a })
    }

    /// Whether this module of `layer` carries an adapter.
    pub fn adapts(&self, layer: usize, target: Target) -> bool {
        self.mats.contains_key(&(layer, target))
    }

    /// A copy whose matrices sit on their layers' devices (shallow where they already do): for
    /// a model split over devices, while the trained state stays on one.
    pub fn placed(&self, p: &crate::Placement) -> Self {
        let mats = self
            .mats
            .iter()
            .map(|(&(layer, t), (a, b))| {
                let d = p.layer(layer);
                ((layer, t), (a.to_device(d), b.to_device(d)))
            })
            .collect();
        let qkv_a = self
            .qkv_a
            .iter()
            .map(|(&layer, (a, targets))| (layer, (a.to_device(p.layer(layer)), targets.clone())))
            .collect();
        LoraBatch { scaling: self.scaling, variants: self.variants, mats, qkv_a }
    }

    /// `y + scaling * B(A x)` for this module (`y` itself when it is not adapted). `x` is
    /// `[rows, seq, in]` and `y` the base projection `[rows, seq, out]`, rows grouped by variant.
    /// The up-projection, the scaling and the sum are one batched GEMM into `y` in place
    /// (`baddbmm_`), which accumulates in float32 and rounds once, where PEFT's
    /// `y + B(A x) * scaling` rounds three times; three kernels fewer per adapted module than
    /// PEFT, and no copy of `y`.
    pub fn add_delta(&self, layer: usize, target: Target, x: &Tensor, y: Tensor) -> Tensor {
        let Some((a, b)) = self.mats.get(&(layer, target)) else { return y };
        let (rows, seq, inp) = x.size3().expect("[rows, seq, in]");
        let v = self.variants;
        let xa = x.reshape([v, rows / v * seq, inp]).bmm(&a.transpose(1, 2));
        let out = y.size()[2];
        let mut yv = y.reshape([v, rows / v * seq, out]);
        mezo_core::ops::baddbmm_(&mut yv, &xa, &b.transpose(1, 2), 1.0, self.scaling);
        yv.reshape([rows, seq, out])
    }

    /// [`Self::add_delta`] for q, k and v at once, into their fused projection `qkv`
    /// (`[rows, seq, 3h]`: q, k, v side by side) in place: one GEMM down-projects `x` for every
    /// adapted one of them (their `A`s stacked), then each up-projection lands in its column
    /// block of `qkv` where it lies. Per layer with q and v adapted: three GEMMs where there were
    /// four GEMMs and two copies.
    pub fn add_qkv_delta(&self, layer: usize, x: &Tensor, qkv: &Tensor, h: i64) {
        let slot = |t: Target| match t {
            Target::Q => 0,
            Target::K => 1,
            _ => 2,
        };
        let (rows, seq, inp) = x.size3().expect("[rows, seq, in]");
        let v = self.variants;
        let n = rows / v * seq;
        let x = x.reshape([v, n, inp]);
        let qkv = qkv.view([v, n, 3 * h]);
        let up = |xa: &Tensor, t: Target| {
            let b = &self.mats[&(layer, t)].1;
            let mut block = qkv.narrow(2, slot(t) * h, h);
            mezo_core::ops::baddbmm_(&mut block, xa, &b.transpose(1, 2), 1.0, self.scaling);
        };
        if let Some((a, targets)) = self.qkv_a.get(&layer) {
            let xa = x.bmm(&a.transpose(1, 2));
            let r = xa.size()[2] / targets.len() as i64;
            for (j, &t) in targets.iter().enumerate() {
                up(&xa.narrow(2, j as i64 * r, r), t);
            }
            return;
        }
        for t in [Target::Q, Target::K, Target::V] {
            if let Some((a, _)) = self.mats.get(&(layer, t)) {
                up(&x.bmm(&a.transpose(1, 2)), t);
            }
        }
    }
}

/// A PEFT LoRA adapter directory: `adapter_config.json` + `adapter_model.safetensors`.
/// The `A` matrices of every layer with two or more of q, k, v adapted, stacked per layer (see
/// [`LoraBatch::add_qkv_delta`]): ONE concatenation for all layers (one kernel per forward), each
/// layer's stack a view of it. q, k and v all read the hidden state, so their `A`s share a width.
fn stack_qkv_a(mats: &HashMap<(usize, Target), (Tensor, Tensor)>) -> HashMap<usize, (Tensor, Vec<Target>)> {
    let mut layers: Vec<usize> = mats.keys().map(|&(l, _)| l).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut parts = Vec::new();
    let mut groups = Vec::new();
    for l in layers {
        let targets: Vec<Target> =
            [Target::Q, Target::K, Target::V].into_iter().filter(|&t| mats.contains_key(&(l, t))).collect();
        if targets.len() >= 2 {
            let rows: i64 = targets.iter().map(|&t| mats[&(l, t)].0.size()[1]).sum();
            parts.extend(targets.iter().map(|&t| &mats[&(l, t)].0));
            groups.push((l, targets, rows));
        }
    }
    if parts.is_empty() {
        return HashMap::new();
    }
    let stacked = Tensor::cat(&parts, 1);
    let mut off = 0;
    groups
        .into_iter()
        .map(|(l, targets, rows)| {
            let a = stacked.narrow(1, off, rows);
            off += rows;
            (l, (a, targets))
        })
        .collect()
}

pub struct Adapter {
    pub config: LoraConfig,
    /// `[P]` float32, the matrices of `config.tensors()` back to back.
    pub flat: Tensor,
}

impl Adapter {
    pub fn load(dir: &Path, model: &ModelConfig) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| ModelError::Json { path: cfg_path.clone(), source })?;
        let field =
            |f: &str, m: String| ModelError::Config { path: cfg_path.clone(), field: f.into(), message: m };
        match json.get("peft_type").and_then(|v| v.as_str()) {
            Some("LORA") => {}
            other => return Err(field("peft_type", format!("{other:?} is not supported (LORA)"))),
        }
        let r = json
            .get("r")
            .and_then(|v| v.as_i64())
            .filter(|&r| r > 0)
            .ok_or_else(|| field("r", "missing or not a positive integer".into()))?;
        let alpha = json
            .get("lora_alpha")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| field("lora_alpha", "missing or not a number".into()))?;
        if json.get("use_rslora").and_then(|v| v.as_bool()) == Some(true)
            || json.get("use_dora").and_then(|v| v.as_bool()) == Some(true)
        {
            return Err(field("use_rslora/use_dora", "only plain LoRA is supported".into()));
        }
        let targets = match json.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().ok_or_else(|| field("target_modules", format!("{v} is not a string"))))
                .map(|s| s.and_then(|s| Target::parse(s).map_err(|e| field("target_modules", e.to_string()))))
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(field("target_modules", "missing or not a list of module names".into())),
        };
        let config = LoraConfig { r, alpha, targets };
        // Modules the model lacks are named before any weights are read.
        let tensors = config.tensors(model).map_err(|e| field("target_modules", e.to_string()))?;
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.is_file() {
            return Err(ModelError::Io {
                path: st_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights not found"),
            });
        }
        let loaded: HashMap<String, Tensor> = Tensor::read_safetensors(&st_path)
            .map_err(|e| ModelError::CorruptWeights { path: st_path.clone(), message: e.to_string() })?
            .into_iter()
            .collect();
        let mut parts = Vec::new();
        for t in tensors {
            // PEFT saves without the adapter name; some tools keep `.default`.
            let alt = t.key.replace(".weight", ".default.weight");
            let w = loaded
                .get(&t.key)
                .or_else(|| loaded.get(&alt))
                .ok_or_else(|| ModelError::MissingTensor { path: st_path.clone(), tensor: t.key.clone() })?;
            if w.size() != t.shape {
                return Err(ModelError::ShapeMismatch {
                    path: st_path.clone(),
                    tensor: t.key.clone(),
                    expected: t.shape.to_vec(),
                    actual: w.size(),
                });
            }
            parts.push(w.to_kind(Kind::Float).flatten(0, -1));
        }
        Ok(Adapter { config, flat: Tensor::cat(&parts, 0) })
    }

    /// Writes PEFT's format: `adapter_config.json` and `adapter_model.safetensors` (float32).
    pub fn save(&self, dir: &Path, model: &ModelConfig, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut targets: Vec<&str> = self.config.targets.iter().map(|t| t.name()).collect();
        targets.sort();
        targets.dedup();
        let cfg = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.config.r,
            "lora_alpha": self.config.alpha, "lora_dropout": 0.0, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
            "init_lora_weights": true, "modules_to_save": null, "use_rslora": false,
            "use_dora": false, "layers_to_transform": null, "base_model_name_or_path": base_model,
            "revision": null,
        });
        let cfg_path = dir.join("adapter_config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).expect("json"))
            .map_err(io_err(&cfg_path))?;
        let flat = self.flat.to_device(tch::Device::Cpu).to_kind(Kind::Float);
        let mut off = 0;
        let mut named = Vec::new();
        for t in self.config.tensors(model)? {
            named.push((t.key.clone(), flat.narrow(0, off, t.numel()).view(t.shape).contiguous()));
            off += t.numel();
        }
        let path = dir.join("adapter_model.safetensors");
        Tensor::write_safetensors(&named, &path)
            .map_err(|e| ModelError::CorruptWeights { path, message: e.to_string() })
    }
}
