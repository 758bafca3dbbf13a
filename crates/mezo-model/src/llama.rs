//! The Llama family in libtorch, matching HF transformers' `LlamaForCausalLM`,
//! `Qwen2ForCausalLM` and `MistralForCausalLM` to float rounding: RMSNorm, rotary position
//! embeddings (default, linear, dynamic-NTK and Llama 3 scaling), grouped-query attention,
//! a SwiGLU MLP, Qwen2's q/k/v biases, Mistral's and Qwen2's sliding windows, tied or untied
//! LM heads. Inference only: callers hold a `tch::no_grad_guard()`.
//!
//! The forward pass is one function per stage (`hidden_states` → `layer_forward` →
//! `attention` / `mlp`), so per-layer extensions (prefixes of keys and values, say) have one
//! place to go: `attention` holds the layer's projected, rotated keys and values before
//! `scaled_dot_product_attention`.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::checkpoint::Checkpoint;
use crate::config::Activation;
use crate::error::{ModelError, Result};
use crate::llama_config::{LlamaConfig, RopeScaling};
use crate::lora::{LoraBatch, Target};
use crate::opt::{move_to, proj, FromCheckpoint, Init, Linear, OnDevices, Padding, Random, Source};
use crate::placement::Placement;

/// RMSNorm as HF computes it: in float32, then the weight times the result cast back.
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

pub struct LlamaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    /// Keys further back than this many positions are out of sight (Mistral, Qwen2).
    window: Option<i64>,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub struct LlamaLayer {
    pub self_attn: LlamaAttention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<LlamaLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    /// RoPE's inverse frequencies for sequences within `max_position_embeddings`, float32
    /// `[head_dim / 2]` on the model's device.
    inv_freq: Tensor,
    /// Where the embeddings and the head are: the inputs go here and the outputs come from here.
    pub device: Device,
    /// Which device holds each layer ([`Placement::single`] unless split).
    pub placement: Placement,
    pub kind: Kind,
}

/// Rotary cos and sin for every row and position, `[rows, 1, seq, head_dim]` in the model's dtype.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Loads `dir/config.json` (already parsed into `config`) and the weights beside it.
    pub fn load(config: LlamaConfig, dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_on(config, dir, &[device], kind)
    }

    /// [`Self::load`] with the layers split over `devices` ([`Placement::for_model`]).
    pub fn load_on(config: LlamaConfig, dir: &Path, devices: &[Device], kind: Kind) -> Result<Self> {
        let placement = Placement::for_model(&config.clone().into(), devices)?;
        let mut ckpt = Checkpoint::load(dir)?;
        let mut src = FromCheckpoint { ckpt: &mut ckpt, device: placement.first(), kind };
        Self::build(config, &mut src, placement, kind)
    }

    /// A model of `config`'s shape with HF's random initialisation (normal(0, 0.02) matrices,
    /// zero biases, unit norms), seeded: for benchmarks and tests.
    pub fn random(config: LlamaConfig, device: Device, kind: Kind, seed: i64) -> Result<Self> {
        Self::random_on(config, &[device], kind, seed)
    }

    /// [`Self::random`] with the layers split over `devices`, each tensor drawn on its device.
    pub fn random_on(config: LlamaConfig, devices: &[Device], kind: Kind, seed: i64) -> Result<Self> {
        tch::manual_seed(seed);
        let placement = Placement::for_model(&config.clone().into(), devices)?;
        let mut src = Random { device: placement.first(), kind, std: 0.02 };
        Self::build(config, &mut src, placement, kind)
    }

    fn build(config: LlamaConfig, src: &mut dyn Source, placement: Placement, kind: Kind) -> Result<Self> {
        let device = placement.first();
        src.place(device);
        let c = &config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let (q_out, kv_out) = (c.q_out(), c.kv_out());
        let linear = |src: &mut dyn Source, name: &str, out: i64, inp: i64, bias: bool| {
            Ok::<_, ModelError>(Linear {
                weight: src.tensor(&format!("{name}.weight"), &[out, inp], Init::Normal)?,
                bias: if bias {
                    Some(src.tensor(&format!("{name}.bias"), &[out], Init::Zeros)?)
                } else {
                    None
                },
            })
        };
        let norm = |src: &mut dyn Source, name: &str| {
            Ok::<_, ModelError>(RmsNorm {
                weight: src.tensor(&format!("{name}.weight"), &[h], Init::Ones)?,
                eps: c.rms_norm_eps,
            })
        };
        let embed_tokens = src.tensor("model.embed_tokens.weight", &[c.vocab_size, h], Init::Normal)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            src.place(placement.layer(i as usize));
            let l = format!("model.layers.{i}");
            let a = format!("{l}.self_attn");
            let m = format!("{l}.mlp");
            layers.push(LlamaLayer {
                self_attn: LlamaAttention {
                    q_proj: linear(src, &format!("{a}.q_proj"), q_out, h, c.qkv_bias)?,
                    k_proj: linear(src, &format!("{a}.k_proj"), kv_out, h, c.qkv_bias)?,
                    v_proj: linear(src, &format!("{a}.v_proj"), kv_out, h, c.qkv_bias)?,
                    o_proj: linear(src, &format!("{a}.o_proj"), h, q_out, c.o_bias)?,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    window: c.layer_windows[i as usize],
                },
                mlp: Mlp {
                    gate_proj: linear(src, &format!("{m}.gate_proj"), f, h, c.mlp_bias)?,
                    up_proj: linear(src, &format!("{m}.up_proj"), f, h, c.mlp_bias)?,
                    down_proj: linear(src, &format!("{m}.down_proj"), h, f, c.mlp_bias)?,
                },
                input_layernorm: norm(src, &format!("{l}.input_layernorm"))?,
                post_attention_layernorm: norm(src, &format!("{l}.post_attention_layernorm"))?,
            });
        }
        src.place(placement.last());
        let norm = norm(src, "model.norm")?;
        src.place(device);
        // A tied checkpoint may still carry lm_head.weight; HF ignores it, and so do we.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(src.tensor("lm_head.weight", &[c.vocab_size, h], Init::Normal)?)
        };
        let inv_freq = base_inv_freq(&config).to_device(device);
        Ok(Llama { config, embed_tokens, layers, norm, lm_head, inv_freq, device, placement, kind })
    }

    /// The last hidden states, `[batch, seq, hidden_size]`, ready for the LM head. `ids` and
    /// `mask` are `[batch, seq]` int64, `mask` 1 on tokens and 0 on padding. With `lora`, rows
    /// are grouped by adapter variant (see [`LoraBatch`]).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        padding: Padding,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let (rows, seq) = ids.size2()?;
        if let Some(l) = lora {
            if l.variants < 1 || rows % l.variants != 0 {
                return Err(ModelError::InvalidArgument {
                    what: "batch rows",
                    value: format!("{rows} rows for {} adapter variants", l.variants),
                    expected: "a multiple of the number of adapter variants",
                });
            }
        }
        // Positions count real tokens only (as HF's generate derives them from the mask), so a
        // left-padded row is the same as the row alone.
        let tree = (padding == Padding::Tree).then(|| crate::opt::tree_layout(mask));
        if tree.is_some() && !self.supports_trees() {
            return Err(ModelError::InvalidArgument {
                what: "padding",
                value: "tree rows".into(),
                expected: "a model without sliding windows or dynamic RoPE scaling for tree rows",
            });
        }
        let positions = match &tree {
            Some((p, _)) => p.shallow_clone(),
            None => (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0),
        };
        let rotary = self.rotary(&positions, mask);
        let mut masks: HashMap<Option<i64>, Option<Tensor>> = HashMap::new();
        for layer in &self.layers {
            let w = layer.self_attn.window;
            masks.entry(w).or_insert_with(|| match &tree {
                Some((_, visible)) => Some(visible.shallow_clone()),
                None => self.attention_mask(mask, seq, padding, w),
            });
        }
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        if !self.placement.is_split() {
            for (i, layer) in self.layers.iter().enumerate() {
                let m = masks[&layer.self_attn.window].as_ref();
                x = self.layer_forward(i, layer, &x, &rotary, m, lora);
            }
            return Ok(self.norm.forward(&x));
        }
        // Split over devices: the activation, the rotary tables, the masks and the adapters go to
        // each layer's device (the last three once per device and forward).
        let placed = lora.map(|l| l.placed(&self.placement));
        let lora = placed.as_ref();
        let (mut cos, mut sin) = (OnDevices::default(), OnDevices::default());
        let mut masks_on: HashMap<Option<i64>, OnDevices> = HashMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let dev = self.placement.layer(i);
            x = move_to(x, dev);
            let w = layer.self_attn.window;
            let m = masks[&w].as_ref().map(|m| masks_on.entry(w).or_default().get(m, dev));
            let r = Rotary { cos: cos.get(&rotary.cos, dev), sin: sin.get(&rotary.sin, dev) };
            x = self.layer_forward(i, layer, &x, &r, m.as_ref(), lora);
        }
        Ok(move_to(self.norm.forward(&x), self.device))
    }

    /// Whether tree rows ([`Padding::Tree`]) read as their branches alone: not with sliding
    /// windows (they count positions, not indices) nor dynamic RoPE scaling (one frequency set
    /// per row, from its length; a tree's branches have lengths of their own).
    pub fn supports_trees(&self) -> bool {
        self.layers.iter().all(|l| l.self_attn.window.is_none())
            && !matches!(self.config.rope.scaling, RopeScaling::Dynamic { .. })
    }

    /// `None` where the causal flag of the fused kernel says everything (right padding, no
    /// window in reach); else a `[batch or 1, 1, seq, seq]` bool mask: causal, within the
    /// window, real keys only. A pad query may always see itself: a row with nothing to attend
    /// to would make the softmax NaN.
    fn attention_mask(
        &self,
        mask: &Tensor,
        seq: i64,
        padding: Padding,
        window: Option<i64>,
    ) -> Option<Tensor> {
        let window = window.filter(|&w| seq > w);
        if padding == Padding::Right && window.is_none() {
            return None;
        }
        let ones = Tensor::ones([seq, seq], (Kind::Bool, self.device));
        let mut m = ones.tril(0);
        if let Some(w) = window {
            // HF's sliding_window_overlay: key k is visible from query q when k > q - w.
            m = m.logical_and(&ones.triu(-(w - 1)));
        }
        let m = m.unsqueeze(0).unsqueeze(0);
        Some(match padding {
            Padding::Right => m,
            Padding::Any | Padding::Tree => {
                let keys = mask.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1);
                m.logical_and(&keys).logical_or(&Tensor::eye(seq, (Kind::Bool, self.device)))
            }
        })
    }

    /// HF's rotary embedding for these positions. Dynamic NTK scaling computes each row's
    /// frequencies from that row's own length, as HF does for a sequence on its own.
    fn rotary(&self, positions: &Tensor, mask: &Tensor) -> Rotary {
        let c = &self.config;
        let pos = positions.to_kind(Kind::Float).unsqueeze(-1);
        let freqs = match c.rope.scaling {
            RopeScaling::Dynamic { factor } => {
                let lens = mask.sum_dim_intlist(1, false, Kind::Int64);
                let max_pos = c.max_position_embeddings;
                let dim = c.head_dim as f64;
                // HF (modeling_rope_utils, dynamic NTK): base * ((factor * L / max) - (factor - 1))
                // ** (dim / (dim - 2)), in float32 once L passes max_position_embeddings.
                let l = lens.clamp_min(max_pos).to_kind(Kind::Float);
                let base = ((l * factor / max_pos as f64) - (factor - 1.0))
                    .pow_tensor_scalar(dim / (dim - 2.0))
                    * c.rope.theta;
                let exps = Tensor::arange_start_step(0, c.head_dim, 2, (Kind::Int64, self.device))
                    .to_kind(Kind::Float)
                    / dim;
                let scaled = base.unsqueeze(1).pow(&exps.unsqueeze(0)).reciprocal();
                let long = lens.gt(max_pos).unsqueeze(1);
                let inv = scaled.where_self(&long, &self.inv_freq.unsqueeze(0));
                pos * inv.unsqueeze(1)
            }
            _ => pos * &self.inv_freq,
        };
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rotary {
            cos: emb.cos().to_kind(self.kind).unsqueeze(1),
            sin: emb.sin().to_kind(self.kind).unsqueeze(1),
        }
    }

    fn layer_forward(
        &self,
        i: usize,
        layer: &LlamaLayer,
        x: &Tensor,
        rotary: &Rotary,
        mask: Option<&Tensor>,
        lora: Option<&LoraBatch>,
    ) -> Tensor {
        let h = self.attention(i, &layer.self_attn, &layer.input_layernorm.forward(x), rotary, mask, lora);
        let x = x + h;
        let h = self.mlp(i, &layer.mlp, &layer.post_attention_layernorm.forward(&x), lora);
        x + h
    }

    fn attention(
        &self,
        i: usize,
        a: &LlamaAttention,
        x: &Tensor,
        rotary: &Rotary,
        mask: Option<&Tensor>,
        lora: Option<&LoraBatch>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are [batch, seq, width]");
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, a.head_dim]).transpose(1, 2);
        let q = split(proj(i, Target::Q, &a.q_proj, x, lora), a.heads);
        let k = split(proj(i, Target::K, &a.k_proj, x, lora), a.kv_heads);
        let v = split(proj(i, Target::V, &a.v_proj, x, lora), a.kv_heads);
        let q = apply_rotary(&q, rotary);
        let k = apply_rotary(&k, rotary);
        let (k, v) = (repeat_kv(&k, a.heads / a.kv_heads), repeat_kv(&v, a.heads / a.kv_heads));
        let o =
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, mask.is_none(), None::<f64>, false);
        let o = o.transpose(1, 2).reshape([b, t, a.heads * a.head_dim]);
        proj(i, Target::O, &a.o_proj, &o, lora)
    }

    /// SwiGLU: down(act(gate(x)) * up(x)).
    fn mlp(&self, i: usize, m: &Mlp, x: &Tensor, lora: Option<&LoraBatch>) -> Tensor {
        let gate = proj(i, Target::Gate, &m.gate_proj, x, lora);
        let up = proj(i, Target::Up, &m.up_proj, x, lora);
        let act = match self.config.activation {
            Activation::Silu => gate.silu(),
            Activation::Gelu => gate.gelu("none"),
            Activation::GeluTanh => gate.gelu("tanh"),
            Activation::Relu => gate.relu(),
        };
        proj(i, Target::Down, &m.down_proj, &(act * up), lora)
    }

    /// The LM head over any leading shape of hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None::<&Tensor>)
    }

    /// Every parameter by its HF name (the order of HF's `named_parameters`). Tied weights
    /// appear once.
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        fn linear<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, l: &'a Linear) {
            out.push((format!("{name}.weight"), &l.weight));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        let mut out: Vec<(String, &Tensor)> = vec![("model.embed_tokens.weight".into(), &self.embed_tokens)];
        for (i, layer) in self.layers.iter().enumerate() {
            let l = format!("model.layers.{i}");
            let a = &layer.self_attn;
            linear(&mut out, format!("{l}.self_attn.q_proj"), &a.q_proj);
            linear(&mut out, format!("{l}.self_attn.k_proj"), &a.k_proj);
            linear(&mut out, format!("{l}.self_attn.v_proj"), &a.v_proj);
            linear(&mut out, format!("{l}.self_attn.o_proj"), &a.o_proj);
            linear(&mut out, format!("{l}.mlp.gate_proj"), &layer.mlp.gate_proj);
            linear(&mut out, format!("{l}.mlp.up_proj"), &layer.mlp.up_proj);
            linear(&mut out, format!("{l}.mlp.down_proj"), &layer.mlp.down_proj);
            out.push((format!("{l}.input_layernorm.weight"), &layer.input_layernorm.weight));
            out.push((
                format!("{l}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm.weight,
            ));
        }
        out.push(("model.norm.weight".into(), &self.norm.weight));
        if let Some(w) = &self.lm_head {
            out.push(("lm_head.weight".into(), w));
        }
        out
    }
}

/// `q * cos + rotate_half(q) * sin`, rotate_half being `cat(-x2, x1)` of the two halves.
fn apply_rotary(x: &Tensor, r: &Rotary) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    x * &r.cos + rotated * &r.sin
}

/// Each key/value head repeated for its group of query heads, `[b, kv, t, d]` →
/// `[b, kv * n_rep, t, d]` (HF's `repeat_kv`: head j serves query heads j*n_rep .. (j+1)*n_rep).
fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x.shallow_clone();
    }
    let (b, kv, t, d) = x.size4().expect("[batch, kv_heads, seq, head_dim]");
    x.unsqueeze(2).expand([b, kv, n_rep, t, d], false).reshape([b, kv * n_rep, t, d])
}

/// RoPE's inverse frequencies as HF's `ROPE_INIT_FUNCTIONS` compute them, in float32 on the
/// CPU (the same operations, so the same roundings): default, linear, llama3; dynamic NTK
/// starts from the default ones.
fn base_inv_freq(c: &LlamaConfig) -> Tensor {
    let dim = c.head_dim as f64;
    let exps =
        Tensor::arange_start_step(0, c.head_dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim;
    let inv = Tensor::pow_scalar(c.rope.theta, &exps).reciprocal();
    match c.rope.scaling {
        RopeScaling::Default | RopeScaling::Dynamic { .. } => inv,
        RopeScaling::Linear { factor } => inv / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings;
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            let llama = (&inv / factor).where_self(&wavelen.gt(low_wavelen), &inv);
            let smooth =
                (wavelen.reciprocal() * old - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed = (-&smooth + 1.0) * &llama / factor + &smooth * &llama;
            let medium =
                wavelen.lt(high_wavelen).logical_not().logical_and(&wavelen.gt(low_wavelen).logical_not());
            smoothed.where_self(&medium, &llama)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama_config::LlamaFamily;

    fn tiny(family: LlamaFamily, extra: serde_json::Value) -> Llama {
        let mut json = serde_json::json!({
            "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": 24,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
        });
        for (k, v) in extra.as_object().unwrap() {
            json[k] = v.clone();
        }
        let cfg = LlamaConfig::from_json(&json.to_string(), Path::new("t"), family).unwrap();
        let m = Llama::random(cfg, Device::Cpu, Kind::Double, 3).unwrap();
        // Non-trivial norms and biases so a skipped one would show.
        let _g = tch::no_grad_guard();
        for (_, t) in m.named_parameters() {
            if t.dim() == 1 {
                t.shallow_clone().copy_(&(t.randn_like() * 0.1 + 1.0));
            }
        }
        m
    }

    /// A left-padded row (explicit mask) gives the same states at its tokens as the row alone,
    /// with and without a sliding window in reach, and right padding leaves them alone too.
    #[test]
    fn padding_is_masked_exactly() {
        let _g = tch::no_grad_guard();
        for (family, extra) in [
            (LlamaFamily::Llama, serde_json::json!({"attention_bias": true})),
            (LlamaFamily::Qwen2, serde_json::json!({})),
            (LlamaFamily::Mistral, serde_json::json!({"sliding_window": 3})),
            (
                LlamaFamily::Llama,
                serde_json::json!({"rope_scaling": {"type": "dynamic", "factor": 2.0},
                                                    "max_position_embeddings": 4}),
            ),
        ] {
            let m = tiny(family, extra.clone());
            let row = [5i64, 9, 17, 3, 44];
            let alone = Tensor::from_slice(&row).view([1, 5]);
            let ones = Tensor::ones([1, 5], (Kind::Int64, Device::Cpu));
            let h1 = m.hidden_states(&alone, &ones, Padding::Right, None).unwrap();
            let padded = Tensor::from_slice(&[0i64, 0, 0, 5, 9, 17, 3, 44]).view([1, 8]);
            let mask = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1, 1, 1]).view([1, 8]);
            let h2 = m.hidden_states(&padded, &mask, Padding::Any, None).unwrap();
            let diff = (h2.narrow(1, 3, 5) - &h1).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "{family:?} {extra}: left padding changed real positions by {diff}");
            assert_eq!(h2.isnan().any().int64_value(&[]), 0, "NaN at pad positions");
            let rp = Tensor::from_slice(&[5i64, 9, 17, 3, 44, 0, 0]).view([1, 7]);
            let rmask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 0, 0]).view([1, 7]);
            let h3 = m.hidden_states(&rp, &rmask, Padding::Right, None).unwrap();
            let diff = (h3.narrow(1, 0, 5) - &h1).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "{family:?} {extra}: right padding changed real positions by {diff}");
        }
    }

    /// A window of 3 changes the states of positions that have keys beyond it, and nothing
    /// before them; without a window in reach it is plain causal attention.
    #[test]
    fn sliding_window_hides_old_keys() {
        let _g = tch::no_grad_guard();
        let windowed = tiny(LlamaFamily::Mistral, serde_json::json!({"sliding_window": 3}));
        let mut full = tiny(LlamaFamily::Mistral, serde_json::json!({"sliding_window": null}));
        for layer in &mut full.layers {
            assert_eq!(layer.self_attn.window, None);
        }
        // The same weights: libtorch's generator is shared with tests running in parallel, so
        // two seeded draws cannot be relied on to match.
        for ((na, a), (nb, b)) in windowed.named_parameters().into_iter().zip(full.named_parameters()) {
            assert_eq!(na, nb);
            b.shallow_clone().copy_(&a);
        }
        let ids = Tensor::from_slice(&[5i64, 9, 17, 3, 44, 8]).view([1, 6]);
        let ones = ids.ones_like();
        let a = windowed.hidden_states(&ids, &ones, Padding::Right, None).unwrap();
        let b = full.hidden_states(&ids, &ones, Padding::Right, None).unwrap();
        let early = (a.narrow(1, 0, 3) - b.narrow(1, 0, 3)).abs().max().double_value(&[]);
        let late = (a.narrow(1, 3, 3) - b.narrow(1, 3, 3)).abs().max().double_value(&[]);
        assert!(early < 1e-12 && late > 1e-6, "early {early}, late {late}");
    }

    #[test]
    fn parameters_are_named_as_hf() {
        let m = tiny(LlamaFamily::Qwen2, serde_json::json!({"tie_word_embeddings": true}));
        let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.layers.1.self_attn.k_proj.bias".to_string()));
        assert!(!names.contains(&"model.layers.1.self_attn.o_proj.bias".to_string()));
        assert!(!names.iter().any(|n| n == "lm_head.weight"));
        // embeddings + 2 layers x (4 attn + 3 qkv biases + 3 mlp + 2 norms) + final norm.
        assert_eq!(names.len(), 1 + 2 * (4 + 3 + 3 + 2) + 1);
        let shapes: HashMap<String, Vec<i64>> =
            m.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect();
        // Grouped-query attention: 2 key/value heads of 4 dims.
        assert_eq!(shapes["model.layers.0.self_attn.v_proj.weight"], vec![8, 16]);
        assert_eq!(shapes["model.layers.0.self_attn.q_proj.weight"], vec![16, 16]);
    }
}
