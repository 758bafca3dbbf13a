//! OPT (Zhang et al., 2022, "OPT: Open Pre-trained Transformer Language Models") in libtorch,
//! matching HF transformers' `OPTForCausalLM` to float rounding: pre-LayerNorm (125m, 1.3b, …)
//! and post-LayerNorm with `project_in`/`project_out` (350m); learned positions offset by 2;
//! a padding-aware causal mask; the LM head tied to the token embeddings unless config.json
//! says otherwise. Inference only: callers hold a `tch::no_grad_guard()`.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::checkpoint::Checkpoint;
use crate::config::{Activation, OptConfig, OPT_POSITION_OFFSET};
use crate::error::Result;
use crate::lora::{LoraBatch, Target};
use crate::placement::Placement;
use crate::Tuning;

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

pub struct LayerNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    width: i64,
}

impl LayerNorm {
    /// nn.LayerNorm's default, which OPT keeps.
    const EPS: f64 = 1e-5;

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.width], self.weight.as_ref(), self.bias.as_ref(), Self::EPS, true)
    }

    /// `(x + y, norm(x + y))`: a residual add and the norm after it. On CUDA one fused kernel
    /// (`mezo_core::cuda::add_layer_norm`) where there were two; elsewhere, or when autograd
    /// needs the graph, libtorch's two operators.
    pub fn add_forward(&self, x: &Tensor, y: &Tensor) -> (Tensor, Tensor) {
        if let (Some(w), Some(b)) = (&self.weight, &self.bias) {
            if x.device().is_cuda() && ![x, y, w, b].iter().any(|t| t.requires_grad()) {
                if let Ok(r) = mezo_core::cuda::add_layer_norm(x, y, w, b, Self::EPS) {
                    return r;
                }
            }
        }
        let s = x + y;
        let n = self.forward(&s);
        (s, n)
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: i64,
    head_dim: i64,
    /// q, k and v as one `[3h, h]` weight (and `[3h]` bias) whose rows the three projections'
    /// tensors are views of: one GEMM instead of three. Perturbations, updates and checkpoints
    /// still address `q_proj.weight` and the others by name, in place.
    qkv: Linear,
}

impl Attention {
    fn new(q: Linear, k: Linear, v: Linear, out_proj: Linear, heads: i64, head_dim: i64) -> Self {
        let h = q.weight.size()[0];
        let w = Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0);
        let b = match (&q.bias, &k.bias, &v.bias) {
            (Some(x), Some(y), Some(z)) => Some(Tensor::cat(&[x, y, z], 0)),
            _ => None,
        };
        let part = |j: i64| Linear {
            weight: w.narrow(0, j * h, h),
            bias: b.as_ref().map(|b| b.narrow(0, j * h, h)),
        };
        let (q_proj, k_proj, v_proj) = (part(0), part(1), part(2));
        Attention { q_proj, k_proj, v_proj, out_proj, heads, head_dim, qkv: Linear { weight: w, bias: b } }
    }

    /// Whether the one GEMM may stand for the three: the projections' tensors still view the fused
    /// ones (code that swaps a tensor's storage, a cast by `set_data`, breaks that) and nothing
    /// needs their gradients (autograd would not reach the views through the fused tensor).
    fn fused(&self) -> bool {
        let views = [&self.q_proj, &self.k_proj, &self.v_proj];
        let h = self.heads * self.head_dim;
        let elt = self.qkv.weight.kind().elt_size_in_bytes() as i64;
        views.iter().enumerate().all(|(j, l)| {
            l.weight.data_ptr() as i64
                == self.qkv.weight.data_ptr() as i64 + j as i64 * h * l.weight.size()[1] * elt
                && l.weight.kind() == self.qkv.weight.kind()
                && !l.weight.requires_grad()
                && match (&l.bias, &self.qkv.bias) {
                    (Some(b), Some(f)) => {
                        b.data_ptr() as i64 == f.data_ptr() as i64 + j as i64 * h * elt
                            && b.kind() == f.kind()
                            && !b.requires_grad()
                    }
                    (None, None) => true,
                    _ => false,
                }
        })
    }
}

pub struct DecoderLayer {
    pub self_attn: Attention,
    pub self_attn_layer_norm: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub final_layer_norm: LayerNorm,
}

/// How the rows of a batch are padded, which decides the attention mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Pads only after each row's tokens: the causal mask alone keeps them out of every real
    /// position, so the fused kernels run without an explicit mask.
    Right,
    /// Pads anywhere (left padding, say): an explicit causal-and-key mask is built.
    Any,
    /// Rows that are trees (see [`ScoreBatch`]): the mask is 1 on a shared trunk that comes first,
    /// `k >= 2` on the tokens of branch `k`, 0 on padding. A branch token sees the trunk and the
    /// earlier tokens of its own branch, and its position continues from the trunk's end, so
    /// every branch reads as if it followed the trunk alone.
    Tree,
}

/// A tree mask's positions (from 0; 0 at padding) and attention mask `[rows, 1, seq, seq]` bool,
/// for [`Padding::Tree`]. A pad query may always see itself (no softmax over nothing).
pub(crate) fn tree_layout(mask: &Tensor) -> (Tensor, Tensor) {
    let seq = mask.size()[1];
    let device = mask.device();
    let causal = Tensor::ones([seq, seq], (Kind::Bool, device)).tril(0);
    // same[r, i, j]: tokens i and j are in the same part (trunk, one branch, or padding).
    let same = mask.unsqueeze(2).eq_tensor(&mask.unsqueeze(1));
    let within = same.logical_and(&causal).sum_dim_intlist(-1, false, Kind::Int64) - 1;
    let trunk = mask.eq(1).sum_dim_intlist(1, true, Kind::Int64);
    let positions = within.where_self(&mask.le(1), &(&within + trunk)) * mask.gt(0);
    let key_real = mask.gt(0).unsqueeze(1);
    let key_trunk = mask.eq(1).unsqueeze(1);
    let visible = same.logical_or(&key_trunk).logical_and(&key_real).logical_and(&causal);
    let eye = Tensor::eye(seq, (Kind::Bool, device));
    (positions, visible.logical_or(&eye).unsqueeze(1))
}

pub struct Opt {
    pub config: OptConfig,
    pub embed_tokens: Tensor,
    pub embed_positions: Tensor,
    pub project_in: Option<Linear>,
    pub project_out: Option<Linear>,
    pub layers: Vec<DecoderLayer>,
    pub final_layer_norm: Option<LayerNorm>,
    /// `None` when tied to `embed_tokens` (OPT's default).
    pub lm_head: Option<Tensor>,
    /// Where the embeddings and the head are: the inputs go here and the outputs come from here.
    pub device: Device,
    /// Which device holds each layer ([`Placement::single`] unless split).
    pub placement: Placement,
    pub kind: Kind,
}

/// Where the model's tensors come from: a checkpoint, or fresh random values.
pub(crate) trait Source {
    /// The next tensor, on the device of the last [`Source::place`].
    fn tensor(&mut self, name: &str, shape: &[i64], init: Init) -> Result<Tensor>;
    /// Where the tensors that follow go: each is made there, never first on another device
    /// (a model split over GPUs can be larger than the host's memory).
    fn place(&mut self, device: Device);
}

#[derive(Clone, Copy)]
pub(crate) enum Init {
    Normal,
    Zeros,
    Ones,
}

pub(crate) struct FromCheckpoint<'a> {
    pub(crate) ckpt: &'a mut Checkpoint,
    pub(crate) device: Device,
    pub(crate) kind: Kind,
}

impl Source for FromCheckpoint<'_> {
    fn tensor(&mut self, name: &str, shape: &[i64], _init: Init) -> Result<Tensor> {
        let t = self.ckpt.take(name, shape)?;
        Ok(t.f_to_device(self.device)?.f_to_kind(self.kind)?)
    }

    fn place(&mut self, device: Device) {
        self.device = device;
    }
}

/// HF's `_init_weights` for OPT: normal(0, init_std=0.02) matrices, zero biases, unit norms.
pub(crate) struct Random {
    pub(crate) device: Device,
    pub(crate) kind: Kind,
    pub(crate) std: f64,
}

impl Source for Random {
    fn tensor(&mut self, _name: &str, shape: &[i64], init: Init) -> Result<Tensor> {
        let opts = (self.kind, self.device);
        Ok(match init {
            Init::Normal => Tensor::f_randn(shape, opts)? * self.std,
            Init::Zeros => Tensor::f_zeros(shape, opts)?,
            Init::Ones => Tensor::f_ones(shape, opts)?,
        })
    }

    fn place(&mut self, device: Device) {
        self.device = device;
    }
}

impl Opt {
    /// Loads `dir/config.json` and the weights beside it onto `device` as `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_on(dir, &[device], kind)
    }

    /// [`Self::load`] with the layers split over `devices` ([`Placement::for_model`]).
    pub fn load_on(dir: &Path, devices: &[Device], kind: Kind) -> Result<Self> {
        let config = OptConfig::from_dir(dir)?;
        let placement = Placement::for_model(&config.clone().into(), devices)?;
        let mut ckpt = Checkpoint::load(dir)?;
        let mut src = FromCheckpoint { ckpt: &mut ckpt, device: placement.first(), kind };
        Self::build(config, &mut src, placement, kind)
    }

    /// A model of `config`'s shape with HF's random initialisation, seeded: for benchmarks
    /// (speed does not depend on the values) and tests.
    pub fn random(config: OptConfig, device: Device, kind: Kind, seed: i64) -> Result<Self> {
        Self::random_on(config, &[device], kind, seed)
    }

    /// [`Self::random`] with the layers split over `devices`. Each tensor is drawn on its own
    /// device (from that device's generator, so the values differ from an unsplit GPU model's;
    /// on the CPU they are the same).
    pub fn random_on(config: OptConfig, devices: &[Device], kind: Kind, seed: i64) -> Result<Self> {
        tch::manual_seed(seed);
        let placement = Placement::for_model(&config.clone().into(), devices)?;
        let mut src = Random { device: placement.first(), kind, std: 0.02 };
        Self::build(config, &mut src, placement, kind)
    }

    fn build(config: OptConfig, src: &mut dyn Source, placement: Placement, kind: Kind) -> Result<Self> {
        let device = placement.first();
        src.place(device);
        let c = &config;
        let (h, e, f) = (c.hidden_size, c.word_embed_proj_dim, c.ffn_dim);
        let p = "model.decoder";
        let linear = |src: &mut dyn Source, name: &str, out: i64, inp: i64, bias: bool| {
            Ok::<_, crate::ModelError>(Linear {
                weight: src.tensor(&format!("{name}.weight"), &[out, inp], Init::Normal)?,
                bias: if bias {
                    Some(src.tensor(&format!("{name}.bias"), &[out], Init::Zeros)?)
                } else {
                    None
                },
            })
        };
        let norm = |src: &mut dyn Source, name: &str, width: i64, affine: bool| {
            Ok::<_, crate::ModelError>(if affine {
                LayerNorm {
                    weight: Some(src.tensor(&format!("{name}.weight"), &[width], Init::Ones)?),
                    bias: Some(src.tensor(&format!("{name}.bias"), &[width], Init::Zeros)?),
                    width,
                }
            } else {
                LayerNorm { weight: None, bias: None, width }
            })
        };
        let affine = c.layer_norm_elementwise_affine;
        let bias = c.enable_bias;
        let embed_tokens =
            src.tensor(&format!("{p}.embed_tokens.weight"), &[c.vocab_size, e], Init::Normal)?;
        let embed_positions = src.tensor(
            &format!("{p}.embed_positions.weight"),
            &[c.max_position_embeddings + OPT_POSITION_OFFSET, h],
            Init::Normal,
        )?;
        let project_in = if c.has_projections() {
            Some(linear(src, &format!("{p}.project_in"), h, e, false)?)
        } else {
            None
        };
        // project_out follows the last layer, so it lives on that layer's device; it is still made
        // second, as before the split existed, so a seeded random model keeps its values.
        src.place(placement.last());
        let project_out = if c.has_projections() {
            Some(linear(src, &format!("{p}.project_out"), e, h, false)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            src.place(placement.layer(i as usize));
            let l = format!("{p}.layers.{i}");
            let a = format!("{l}.self_attn");
            layers.push(DecoderLayer {
                self_attn: Attention::new(
                    linear(src, &format!("{a}.q_proj"), h, h, bias)?,
                    linear(src, &format!("{a}.k_proj"), h, h, bias)?,
                    linear(src, &format!("{a}.v_proj"), h, h, bias)?,
                    linear(src, &format!("{a}.out_proj"), h, h, bias)?,
                    c.num_attention_heads,
                    c.head_dim(),
                ),
                self_attn_layer_norm: norm(src, &format!("{l}.self_attn_layer_norm"), h, affine)?,
                fc1: linear(src, &format!("{l}.fc1"), f, h, bias)?,
                fc2: linear(src, &format!("{l}.fc2"), h, f, bias)?,
                final_layer_norm: norm(src, &format!("{l}.final_layer_norm"), h, affine)?,
            });
        }
        src.place(placement.last());
        let final_layer_norm = if c.has_final_layer_norm() {
            Some(norm(src, &format!("{p}.final_layer_norm"), h, affine)?)
        } else {
            None
        };
        // The head is on the first device: tied, it is `embed_tokens` itself.
        src.place(device);
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(src.tensor("lm_head.weight", &[c.vocab_size, e], Init::Normal)?)
        };
        Ok(Opt {
            config,
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            lm_head,
            device,
            placement,
            kind,
        })
    }

    /// The last hidden states, `[batch, seq, word_embed_proj_dim]`, ready for the LM head.
    /// `ids` and `mask` are `[batch, seq]` int64, `mask` 1 on tokens and 0 on padding.
    /// With `tuning`, rows are grouped by its variants (see [`LoraBatch`], [`PrefixBatch`]).
    ///
    /// [`PrefixBatch`]: crate::PrefixBatch
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        padding: Padding,
        tuning: Option<&Tuning>,
    ) -> Result<Tensor> {
        let (rows, seq) = ids.size2()?;
        let prefix = tuning.and_then(Tuning::prefix).map_or(0, |p| p.num_prefix);
        let max_pos = self.config.max_position_embeddings;
        if seq + prefix > max_pos {
            return Err(crate::ModelError::InvalidArgument {
                what: "sequence length",
                value: format!("{seq} tokens after {prefix} prefix tokens"),
                expected: "at most config.json's max_position_embeddings in all",
            });
        }
        // HF: positions count real tokens only, so a left-padded row starts at position 0 too
        // (at `prefix` with a prefix, which PEFT counts as tokens read before the row).
        let tree = (padding == Padding::Tree).then(|| tree_layout(mask));
        let positions = match &tree {
            Some((pos, _)) => pos + prefix + OPT_POSITION_OFFSET,
            None => ((mask.cumsum(1, Kind::Int64) + prefix) * mask - 1) + OPT_POSITION_OFFSET,
        };
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        if let Some(p) = &self.project_in {
            x = p.forward(&x);
        }
        x = x + Tensor::embedding(&self.embed_positions, &positions, -1, false, false);
        let attn_mask = match (padding, tree) {
            (Padding::Tree, Some((_, visible))) => Some(visible),
            (Padding::Any, _) => Some(self.explicit_mask(mask, seq)),
            _ => None,
        };
        // Every query sees the whole prefix: its columns go in front of an explicit mask (the
        // causal-only path handles the prefix in `attention`).
        let attn_mask = attn_mask.map(|m| {
            if prefix == 0 {
                return m;
            }
            let front = Tensor::ones([m.size()[0], 1, seq, prefix], (Kind::Bool, self.device));
            Tensor::cat(&[front, m], 3)
        });
        if let Some(t) = tuning {
            let v = t.variants();
            if v < 1 || rows % v != 0 {
                return Err(crate::ModelError::InvalidArgument {
                    what: "batch rows",
                    value: format!("{rows} rows for {v} adapter variants"),
                    expected: "a multiple of the number of adapter variants",
                });
            }
        }
        // A split model: the adapters' per-layer tensors go to their layers' devices once per
        // forward (small beside the weights), and the mask to each device once.
        let placed = match tuning {
            Some(t) if self.placement.is_split() => Some(t.placed(&self.placement)),
            _ => None,
        };
        let tuning = placed.as_ref().or(tuning);
        let mut masks = OnDevices::default();
        // Pre-LN: each layer's last residual add runs fused with the norm that follows it (the
        // next layer's input norm, or the final norm), handed on in `normed`; not across a
        // device boundary, where the next layer's norm lives on another device.
        let pre = self.config.do_layer_norm_before;
        let mut normed: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let dev = self.placement.layer(i);
            x = move_to(x, dev);
            let m = attn_mask.as_ref().map(|m| masks.get(m, dev));
            let next = match self.layers.get(i + 1) {
                _ if !pre => None,
                Some(l) => (self.placement.layer(i + 1) == dev).then_some(&l.self_attn_layer_norm),
                None => self.final_layer_norm.as_ref(),
            };
            (x, normed) = self.layer_forward(i, layer, &x, normed.take(), next, m.as_ref(), tuning);
        }
        if let Some(n) = &self.final_layer_norm {
            x = normed.take().unwrap_or_else(|| n.forward(&x));
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x);
        }
        // Back to the head's device (the embeddings', since the head is tied to them).
        Ok(move_to(x, self.device))
    }

    /// Causal and key-padding mask, `[batch, 1, seq, seq]` bool. A pad query may always see
    /// itself: a row with nothing to attend to would make the softmax NaN.
    fn explicit_mask(&self, mask: &Tensor, seq: i64) -> Tensor {
        let causal = Tensor::ones([seq, seq], (Kind::Bool, self.device)).tril(0);
        let keys = mask.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1);
        let eye = Tensor::eye(seq, (Kind::Bool, self.device));
        causal.logical_and(&keys).logical_or(&eye)
    }

    /// One decoder layer. `normed`: this layer's input norm of `x` if the previous layer computed
    /// it (pre-LN, fused with its last residual add); `next`: the norm that follows this layer
    /// (pre-LN), computed here fused with the last residual add. Returns the layer's output and,
    /// with `next`, its norm.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        i: usize,
        layer: &DecoderLayer,
        x: &Tensor,
        normed: Option<Tensor>,
        next: Option<&LayerNorm>,
        mask: Option<&Tensor>,
        tuning: Option<&Tuning>,
    ) -> (Tensor, Option<Tensor>) {
        let lora = tuning.and_then(Tuning::lora);
        if self.config.do_layer_norm_before {
            let h = normed.unwrap_or_else(|| layer.self_attn_layer_norm.forward(x));
            let a = self.attention(i, &layer.self_attn, &h, mask, tuning);
            let (x, h) = layer.final_layer_norm.add_forward(x, &a);
            let f = self.mlp(i, layer, &h, lora);
            match next {
                Some(n) => {
                    let (x, h) = n.add_forward(&x, &f);
                    (x, Some(h))
                }
                None => (x + f, None),
            }
        } else {
            // Post-LN (OPT-350m): each norm takes its residual sum; the sum itself is not kept.
            let a = self.attention(i, &layer.self_attn, x, mask, tuning);
            let (_, x) = layer.self_attn_layer_norm.add_forward(x, &a);
            let f = self.mlp(i, layer, &x, lora);
            let (_, x) = layer.final_layer_norm.add_forward(&x, &f);
            (x, None)
        }
    }

    /// fc2(act(fc1(h))), with their adapters.
    fn mlp(&self, i: usize, layer: &DecoderLayer, h: &Tensor, lora: Option<&LoraBatch>) -> Tensor {
        let fc1_adapted = lora.is_some_and(|l| l.adapts(i, Target::Fc1));
        let h = match (&self.config.activation, &layer.fc1.bias) {
            // fc1 and its ReLU as one GEMM on CUDA (the bias and ReLU in cuBLASLt's epilogue): a
            // kernel fewer per layer. It has no autograd derivative: first-order training, which
            // needs one, takes the unfused path.
            (Activation::Relu, Some(bias))
                if !fc1_adapted && ![h, &layer.fc1.weight, bias].iter().any(|t| t.requires_grad()) =>
            {
                let (r, t, w) = h.size3().expect("[rows, seq, width]");
                mezo_core::ops::linear_relu(&h.reshape([r * t, w]), &layer.fc1.weight, bias).view([r, t, -1])
            }
            _ => self.activation(&proj(i, Target::Fc1, &layer.fc1, h, lora)),
        };
        proj(i, Target::Fc2, &layer.fc2, &h, lora)
    }

    fn activation(&self, x: &Tensor) -> Tensor {
        match self.config.activation {
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Silu => x.silu(),
        }
    }

    fn attention(
        &self,
        i: usize,
        a: &Attention,
        x: &Tensor,
        mask: Option<&Tensor>,
        tuning: Option<&Tuning>,
    ) -> Tensor {
        let lora = tuning.and_then(Tuning::lora);
        let (b, t, _) = x.size3().expect("hidden states are [batch, seq, width]");
        let split = |y: Tensor| {
            let len = y.size()[1];
            y.view([b, len, a.heads, a.head_dim]).transpose(1, 2)
        };
        let (mut q, mut k, mut v) = if a.fused() {
            let qkv = a.qkv.forward(x);
            let h = a.heads * a.head_dim;
            if let Some(l) = lora {
                l.add_qkv_delta(i, x, &qkv, h);
            }
            (qkv.narrow(2, 0, h), qkv.narrow(2, h, h), qkv.narrow(2, 2 * h, h))
        } else {
            (
                proj(i, Target::Q, &a.q_proj, x, lora),
                proj(i, Target::K, &a.k_proj, x, lora),
                proj(i, Target::V, &a.v_proj, x, lora),
            )
        };
        let mut skip = 0;
        if let Some(p) = tuning.and_then(Tuning::prefix) {
            // Keys and values as projected (before the head split), as past_key_values hold them.
            let (pk, pv) = p.layer(i, b);
            if mask.is_none() {
                // The fused causal kernels align the mask top-left (query j sees keys 0..=j), so
                // `num_prefix` dummy queries in front make query P+j see the prefix and keys up
                // to its own; their outputs are dropped. Cheaper than an explicit mask, which
                // takes the unfused path.
                q = Tensor::cat(&[pk.zeros_like(), q], 1);
                skip = p.num_prefix;
            }
            k = Tensor::cat(&[pk, k], 1);
            v = Tensor::cat(&[pv, v], 1);
        }
        let (q, k, v) = (split(q), split(k), split(v));
        let o = mezo_core::ops::sdpa(&q, &k, &v, mask, mask.is_none());
        let o = if skip > 0 { o.narrow(2, skip, t) } else { o };
        let o = o.transpose(1, 2).reshape([b, t, a.heads * a.head_dim]);
        proj(i, Target::Out, &a.out_proj, &o, lora)
    }

    /// The LM head over any leading shape of hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None::<&Tensor>)
    }

    /// Each layer's keys and values (k_proj and v_proj outputs) over one row of `tokens`, as a
    /// prefix in PEFT's layout ([`crate::prefix`]): `[tokens * layers * 2 * hidden]` float32.
    /// MeZO's `--prefix_init_by_real_act` initialises the prefix this way.
    pub fn key_values(&self, tokens: &[i64]) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let n = tokens.len() as i64;
        if n == 0 || n > self.config.max_position_embeddings {
            return Err(crate::ModelError::InvalidArgument {
                what: "prefix token count",
                value: n.to_string(),
                expected: "between 1 and config.json's max_position_embeddings",
            });
        }
        let ids = Tensor::from_slice(tokens).view([1, n]).to_device(self.device);
        let positions = Tensor::arange(n, (Kind::Int64, self.device)).view([1, n]) + OPT_POSITION_OFFSET;
        let tok = Tensor::embedding(&self.embed_tokens, &ids, -1, false, false);
        let tok = match &self.project_in {
            Some(p) => p.forward(&tok),
            None => tok,
        };
        let mut x = tok + Tensor::embedding(&self.embed_positions, &positions, -1, false, false);
        let mut per_layer = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            x = move_to(x, self.placement.layer(i));
            // What the layer's attention projects (the same ops as `layer_forward`'s).
            let h = if self.config.do_layer_norm_before {
                layer.self_attn_layer_norm.forward(&x)
            } else {
                x.shallow_clone()
            };
            let k = layer.self_attn.k_proj.forward(&h);
            let v = layer.self_attn.v_proj.forward(&h);
            // [n, 2, hidden], gathered on the first device.
            per_layer.push(move_to(Tensor::stack(&[k.squeeze_dim(0), v.squeeze_dim(0)], 1), self.device));
            x = self.layer_forward(i, layer, &x, None, None, None, None).0;
        }
        Ok(Tensor::stack(&per_layer, 1).to_kind(Kind::Float).flatten(0, -1))
    }

    /// Every parameter by its HF name, for code that walks the weights (full-parameter MeZO,
    /// checksums). Tied weights appear once.
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        fn linear<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, l: &'a Linear) {
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b));
            }
            out.push((format!("{name}.weight"), &l.weight));
        }
        fn norm<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, n: &'a LayerNorm) {
            if let (Some(w), Some(b)) = (&n.weight, &n.bias) {
                out.push((format!("{name}.weight"), w));
                out.push((format!("{name}.bias"), b));
            }
        }
        let p = "model.decoder";
        let mut out: Vec<(String, &Tensor)> = vec![
            (format!("{p}.embed_tokens.weight"), &self.embed_tokens),
            (format!("{p}.embed_positions.weight"), &self.embed_positions),
        ];
        if let Some(l) = &self.project_in {
            linear(&mut out, format!("{p}.project_in"), l);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let l = format!("{p}.layers.{i}");
            let a = &layer.self_attn;
            linear(&mut out, format!("{l}.self_attn.k_proj"), &a.k_proj);
            linear(&mut out, format!("{l}.self_attn.v_proj"), &a.v_proj);
            linear(&mut out, format!("{l}.self_attn.q_proj"), &a.q_proj);
            linear(&mut out, format!("{l}.self_attn.out_proj"), &a.out_proj);
            norm(&mut out, format!("{l}.self_attn_layer_norm"), &layer.self_attn_layer_norm);
            linear(&mut out, format!("{l}.fc1"), &layer.fc1);
            linear(&mut out, format!("{l}.fc2"), &layer.fc2);
            norm(&mut out, format!("{l}.final_layer_norm"), &layer.final_layer_norm);
        }
        if let Some(n) = &self.final_layer_norm {
            norm(&mut out, format!("{p}.final_layer_norm"), n);
        }
        if let Some(l) = &self.project_out {
            linear(&mut out, format!("{p}.project_out"), l);
        }
        if let Some(w) = &self.lm_head {
            out.push(("lm_head.weight".into(), w));
        }
        out
    }
}

/// `x` on `device`: itself when it is there already, else an asynchronous copy (CUDA to CUDA
/// copies are ordered on the streams of both devices without a host synchronisation).
pub(crate) fn move_to(x: Tensor, device: Device) -> Tensor {
    if x.device() == device {
        x
    } else {
        x.to_device_(device, x.kind(), true, false)
    }
}

/// One tensor's copies on the devices of a split model, made on first use.
#[derive(Default)]
pub(crate) struct OnDevices(Vec<(Device, Tensor)>);

impl OnDevices {
    /// `t` on `device` (a copy of it, kept for the next layer on that device).
    pub(crate) fn get(&mut self, t: &Tensor, device: Device) -> Tensor {
        if t.device() == device {
            return t.shallow_clone();
        }
        if let Some((_, c)) = self.0.iter().find(|(d, _)| *d == device) {
            return c.shallow_clone();
        }
        let c = t.to_device_(device, t.kind(), true, false);
        self.0.push((device, c.shallow_clone()));
        c
    }
}

/// Tokens a shared prompt must have before a batch shares it (fewer save too little to pay for
/// the tree's explicit attention mask).
pub const MIN_SHARED_PROMPT: usize = 16;

/// The length of the prompt every row of a batch begins with, where reading it once pays: at
/// least [`MIN_SHARED_PROMPT`] tokens, two or more distinct inputs,
/// and a tree row (the prompt, then each distinct input's remaining tokens) that fits
/// `max_width` and is at most 3/4 of the padded batch it replaces. `MEZO_SHARED_PROMPT=0`
/// turns it off (for comparison).
pub fn shared_prompt(rows: &[Vec<i64>], max_width: usize) -> Option<usize> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var_os("MEZO_SHARED_PROMPT").is_some_and(|v| v == "0")) {
        return None;
    }
    let first = rows.first()?;
    // The common prefix of the rows' reads (a row is read at all its tokens but the last).
    let mut p = first.len() - 1;
    for row in &rows[1..] {
        p = p.min(row.len() - 1);
        p = first[..p].iter().zip(&row[..p]).take_while(|(a, b)| a == b).count();
    }
    if p < MIN_SHARED_PROMPT {
        return None;
    }
    // The lengths of the distinct inputs (rows read at the same tokens share one).
    let mut seen = std::collections::HashSet::new();
    let lens: Vec<usize> = rows.iter().filter(|r| seen.insert(&r[..r.len() - 1])).map(Vec::len).collect();
    let width = p + lens.iter().map(|n| n - p).sum::<usize>();
    let padded = lens.len() * lens.iter().max().copied().unwrap_or(0);
    (lens.len() >= 2 && width <= max_width && 4 * width <= 3 * padded).then_some(p)
}

/// Where a batch's answer tokens are read: for each, the input row and position whose hidden
/// state predicts it, the scored row it counts for and its token; and each scored row's count.
#[derive(Default)]
struct Answers {
    src_row: Vec<i64>,
    row_idx: Vec<i64>,
    pos_idx: Vec<i64>,
    targets: Vec<i64>,
    counts: Vec<f32>,
}

impl Answers {
    fn push(&mut self, src: usize, row: usize, at: usize, target: i64) {
        self.src_row.push(src as i64);
        self.row_idx.push(row as i64);
        self.pos_idx.push(at as i64);
        self.targets.push(target);
    }
}

/// Applies a linear layer plus its LoRA delta, if any.
pub(crate) fn proj(i: usize, t: Target, lin: &Linear, x: &Tensor, lora: Option<&LoraBatch>) -> Tensor {
    let y = lin.forward(x);
    match lora {
        Some(l) => l.add_delta(i, t, x, y),
        None => y,
    }
}

/// Token rows prepared for scoring on a device: right-padded input ids and mask, and for every
/// answer token the input row and position whose hidden state predicts it, its token id and the
/// row it counts for.
///
/// Rows that read the same inputs share one input row: two rows that differ only in their last
/// token (the candidates of a classification prompt with one-token answers, such as SST-2's
/// " great" and " terrible") need the hidden states of the same tokens, because a causal model's
/// state at a position sees nothing after it. So a batch of SST-2 examples with two candidates
/// each runs one row per example, not two, and every candidate's score is read from it.
pub struct ScoreBatch {
    /// `[inputs, width]`: one row per distinct input.
    pub ids: Tensor,
    pub mask: Tensor,
    /// For every answer token: the input row that predicts it.
    pub src_row: Tensor,
    /// For every answer token: the scored row it counts for (`0..rows`).
    pub row_idx: Tensor,
    pub pos_idx: Tensor,
    pub targets: Tensor,
    /// Answer tokens per row, float32 `[rows]`.
    pub counts: Tensor,
    /// Scored rows (the length of the scores).
    pub rows: i64,
    /// Real (unpadded) tokens in the input rows: what one forward reads.
    pub input_tokens: u64,
    /// The input rows are trees ([`Padding::Tree`]; see [`Self::with_trees`]).
    pub tree: bool,
}

impl ScoreBatch {
    pub fn new(rows: &[Vec<i64>], answer_start: &[usize], pad: i64, device: Device) -> Result<Self> {
        Self::build(rows, answer_start, pad, device, None)
    }

    /// [`Self::new`], with candidates of several tokens that share their prompt (the tokens before
    /// `answer_start`, such as COPA's premise or ReCoRD's passage) in one tree row: the prompt
    /// once as the trunk, then each candidate's tokens as a branch that sees the trunk and
    /// itself only ([`Padding::Tree`]), so the prompt is read once rather than once per
    /// candidate. A tree is built only where it is at most `max_width` tokens and every member
    /// is too (so the positions fit); other rows are as [`Self::new`] makes them. The model must
    /// support trees (`Model::supports_trees`).
    pub fn with_trees(
        rows: &[Vec<i64>],
        answer_start: &[usize],
        pad: i64,
        device: Device,
        max_width: usize,
    ) -> Result<Self> {
        Self::build(rows, answer_start, pad, device, Some(max_width))
    }

    fn build(
        rows: &[Vec<i64>],
        answer_start: &[usize],
        pad: i64,
        device: Device,
        max_tree_width: Option<usize>,
    ) -> Result<Self> {
        let rows = &rows[..rows.len().min(answer_start.len())];
        if let Some((row, &start)) = rows.iter().zip(answer_start).find(|(r, &s)| s == 0 || s >= r.len()) {
            return Err(crate::ModelError::InvalidArgument {
                what: "answer start",
                value: format!("{start} in a row of {} tokens", row.len()),
                expected: "at least one context token and at least one answer token",
            });
        }
        // Which rows ride in a tree: the candidates of one prompt, when one of them has several
        // answer tokens and the tree and its members fit `max_tree_width`.
        let mut tree_of: Vec<Option<usize>> = vec![None; rows.len()];
        if let Some(max_width) = max_tree_width {
            let mut groups: HashMap<&[i64], Vec<usize>> = HashMap::new();
            for (r, (row, &start)) in rows.iter().zip(answer_start).enumerate() {
                groups.entry(&row[..start]).or_default().push(r);
            }
            for (prompt, members) in &groups {
                let answers = members.iter().map(|&r| rows[r].len() - prompt.len());
                let width = prompt.len() + answers.clone().sum::<usize>();
                if members.len() > 1
                    && answers.clone().any(|n| n > 1)
                    && width <= max_width
                    && members.iter().all(|&r| rows[r].len() <= max_width)
                {
                    members.iter().for_each(|&r| tree_of[r] = Some(members[0]));
                }
            }
        }
        // Rows that all begin with one long prompt (an instruction or few-shot demonstrations in a
        // custom template) ride in one tree row instead: the prompt once as the trunk, each
        // distinct input's own tokens as a branch (RadixAttention's idea, for the prefix a whole
        // batch shares). Not together with candidate trees (a tree has one level of branches).
        // Its positions are its rows' (each fits already), so only the mask's cost bounds its
        // width: twice a candidate tree's (the model's positions, for `score_batch`).
        let shared = match max_tree_width {
            Some(max_width) if tree_of.iter().all(Option::is_none) => shared_prompt(rows, 2 * max_width),
            _ => None,
        };
        if let Some(p) = shared {
            return Self::shared_tree(rows, answer_start, p, pad, device);
        }
        let mut answers = Answers::default();
        // Input rows as (tokens, parts): parts 1 on a plain row or a tree's trunk, k >= 2 on a
        // tree's branch k. A plain row is the first row read at its tokens (all but the last),
        // and every row read at the same tokens takes it; a tree is made by its first member.
        let mut inputs: Vec<(Vec<i64>, Vec<i64>)> = Vec::new();
        let mut by_reads: HashMap<&[i64], usize> = HashMap::new();
        let mut trees: HashMap<usize, usize> = HashMap::new();
        for (r, (row, &start)) in rows.iter().zip(answer_start).enumerate() {
            let (src, predicted_at): (usize, Vec<usize>) = match tree_of[r] {
                Some(first) => {
                    let src = *trees.entry(first).or_insert_with(|| {
                        inputs.push((row[..start].to_vec(), vec![1; start]));
                        inputs.len() - 1
                    });
                    let (tokens, parts) = &mut inputs[src];
                    let (begin, branch) = (tokens.len(), parts.last().map_or(2, |&k| k.max(1) + 1));
                    tokens.extend_from_slice(&row[start..]);
                    parts.extend(std::iter::repeat_n(branch, row.len() - start));
                    // The first answer token is predicted by the trunk's last; each later one
                    // by the branch token before it.
                    let at = std::iter::once(start - 1).chain(begin..).take(row.len() - start).collect();
                    (src, at)
                }
                None => {
                    let src = *by_reads.entry(&row[..row.len() - 1]).or_insert_with(|| {
                        inputs.push((row.clone(), vec![1; row.len()]));
                        inputs.len() - 1
                    });
                    (src, (start - 1..row.len() - 1).collect())
                }
            };
            for (p, at) in (start..row.len()).zip(predicted_at) {
                answers.push(src, r, at, row[p]);
            }
            answers.counts.push((row.len() - start) as f32);
        }
        let tree = !trees.is_empty();
        Self::assemble(&inputs, tree, &answers, pad, device)
    }

    /// The batch on `device` from its input rows (tokens, parts) and where its answers are read.
    fn assemble(
        inputs: &[(Vec<i64>, Vec<i64>)],
        tree: bool,
        answers: &Answers,
        pad: i64,
        device: Device,
    ) -> Result<Self> {
        let tokens: Vec<&[i64]> = inputs.iter().map(|(t, _)| t.as_slice()).collect();
        let (ids, mut mask) = pad_right(&tokens, pad, device)?;
        if tree {
            let parts: Vec<&[i64]> = inputs.iter().map(|(_, p)| p.as_slice()).collect();
            // The same padding with the parts' labels in place of the ones.
            mask = pad_right(&parts, 0, device)?.0;
        }
        let dev = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        Ok(ScoreBatch {
            ids,
            mask,
            src_row: dev(&answers.src_row),
            row_idx: dev(&answers.row_idx),
            pos_idx: dev(&answers.pos_idx),
            targets: dev(&answers.targets),
            counts: Tensor::from_slice(&answers.counts).to_device(device),
            rows: answers.counts.len() as i64,
            input_tokens: tokens.iter().map(|t| t.len() as u64).sum(),
            tree,
        })
    }

    /// One tree row for rows that share their first `p` tokens (see [`shared_prompt`]): those
    /// tokens once as the trunk, then for each distinct input (the tokens a row is read at, all
    /// but its last) its tokens after the trunk as a branch. A row's token `j` sits at `j` in the
    /// trunk or at its branch's start plus `j - p`, and its position is `j` either way.
    fn shared_tree(
        rows: &[Vec<i64>],
        answer_start: &[usize],
        p: usize,
        pad: i64,
        device: Device,
    ) -> Result<Self> {
        let mut tokens: Vec<i64> = rows[0][..p].to_vec();
        let mut parts: Vec<i64> = vec![1; p];
        let mut branches: HashMap<&[i64], usize> = HashMap::new();
        let mut answers = Answers::default();
        for (r, (row, &start)) in rows.iter().zip(answer_start).enumerate() {
            let begin = *branches.entry(&row[..row.len() - 1]).or_insert_with(|| {
                let (begin, branch) = (tokens.len(), parts.last().map_or(2, |&k| k.max(1) + 1));
                tokens.extend_from_slice(&row[p..]);
                parts.extend(std::iter::repeat_n(branch, row.len() - p));
                begin
            });
            for q in start..row.len() {
                let j = q - 1;
                answers.push(0, r, if j < p { j } else { begin + j - p }, row[q]);
            }
            answers.counts.push((row.len() - start) as f32);
        }
        Self::assemble(&[(tokens, parts)], true, &answers, pad, device)
    }

    /// Pads `ids` and `mask` on the right to `width` columns (nothing when they are that wide
    /// already). The scores are the same function of the rows: padding is masked out of attention
    /// and the answer positions do not move (a wider matmul may round differently).
    pub fn widen(&mut self, width: i64, pad: i64) {
        let (rows, now) = (self.ids.size()[0], self.ids.size()[1]);
        if width <= now {
            return;
        }
        let (dev, extra) = (self.ids.device(), [rows, width - now]);
        self.ids = Tensor::cat(&[&self.ids, &Tensor::full(extra, pad, (Kind::Int64, dev))], 1);
        self.mask = Tensor::cat(&[&self.mask, &Tensor::zeros(extra, (Kind::Int64, dev))], 1);
    }
}

/// Right-pads rows into `[rows, longest]` ids and mask on `device`.
pub fn pad_right<R: AsRef<[i64]>>(rows: &[R], pad: i64, device: Device) -> Result<(Tensor, Tensor)> {
    let width = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let row = row.as_ref();
        ids.extend_from_slice(row);
        ids.extend(std::iter::repeat_n(pad, width - row.len()));
        mask.extend(std::iter::repeat_n(1i64, row.len()));
        mask.extend(std::iter::repeat_n(0i64, width - row.len()));
    }
    let shape = [rows.len() as i64, width as i64];
    Ok((
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_device(device),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(pre: bool) -> Opt {
        let mut json = serde_json::json!({
            "model_type": "opt", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
            "ffn_dim": 32, "num_attention_heads": 4, "max_position_embeddings": 32,
        });
        if !pre {
            json["do_layer_norm_before"] = false.into();
            json["word_embed_proj_dim"] = 8.into();
        }
        let cfg = OptConfig::from_json(&json.to_string(), Path::new("t")).unwrap();
        Opt::random(cfg, Device::Cpu, Kind::Double, 3).unwrap()
    }

    /// A left-padded row (explicit mask) gives the same states at its tokens as the row alone.
    #[test]
    fn left_padding_is_masked_exactly() {
        let _g = tch::no_grad_guard();
        for pre in [true, false] {
            let m = tiny(pre);
            let row = [5i64, 9, 17, 3, 44];
            let alone = Tensor::from_slice(&row).view([1, 5]);
            let ones = Tensor::ones([1, 5], (Kind::Int64, Device::Cpu));
            let h1 = m.hidden_states(&alone, &ones, Padding::Right, None).unwrap();
            let padded = Tensor::from_slice(&[1i64, 1, 1, 5, 9, 17, 3, 44]).view([1, 8]);
            let mask = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1, 1, 1]).view([1, 8]);
            let h2 = m.hidden_states(&padded, &mask, Padding::Any, None).unwrap();
            let diff = (h2.narrow(1, 3, 5) - &h1).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "pre={pre}: left padding changed real positions by {diff}");
            assert_eq!(h2.isnan().any().int64_value(&[]), 0, "NaN at pad positions");
            // Right padding through the causal-only path leaves real positions alone too.
            let rp = Tensor::from_slice(&[5i64, 9, 17, 3, 44, 1, 1]).view([1, 7]);
            let rmask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 0, 0]).view([1, 7]);
            let h3 = m.hidden_states(&rp, &rmask, Padding::Right, None).unwrap();
            let diff = (h3.narrow(1, 0, 5) - &h1).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "pre={pre}: right padding changed real positions by {diff}");
        }
    }

    /// Widening a batch (CUDA's bucketed widths) only appends masked padding: the ids, mask and
    /// answer positions of the rows are kept, and the states at real positions do not change.
    #[test]
    fn widening_a_batch_appends_masked_padding_only() {
        let _g = tch::no_grad_guard();
        let m = tiny(true);
        let rows = vec![vec![5i64, 9, 17, 3, 44], vec![8i64, 2, 6]];
        let mut b = ScoreBatch::new(&rows, &[4, 2], 1, Device::Cpu).unwrap();
        let (ids, mask, pos) = (b.ids.copy(), b.mask.copy(), b.pos_idx.copy());
        b.widen(3, 1);
        assert_eq!(b.ids.size(), [2, 5], "a narrower width changes nothing");
        b.widen(8, 1);
        assert_eq!(b.ids.size(), [2, 8]);
        assert!(b.ids.narrow(1, 0, 5).equal(&ids) && b.mask.narrow(1, 0, 5).equal(&mask));
        assert_eq!(Vec::<i64>::try_from(&b.ids.narrow(1, 5, 3).flatten(0, 1)).unwrap(), [1; 6]);
        assert_eq!(b.mask.narrow(1, 5, 3).sum(Kind::Int64).int64_value(&[]), 0);
        assert!(b.pos_idx.equal(&pos));
        let h1 = m.hidden_states(&ids, &mask, Padding::Right, None).unwrap();
        let h2 = m.hidden_states(&b.ids, &b.mask, Padding::Right, None).unwrap();
        let real = mask.unsqueeze(-1).to_kind(Kind::Double);
        let diff = ((h2.narrow(1, 0, 5) - &h1) * real).abs().max().double_value(&[]);
        assert!(diff < 1e-12, "widening changed real positions by {diff}");
    }

    /// A prefix made of the keys and values of real tokens is exactly the cache of a model that
    /// read them first: the states of a row after the prefix equal those of the tokens followed
    /// by the row (PEFT's positions), for left padding and for two variants in one batch.
    #[test]
    fn a_prefix_of_real_activations_equals_reading_those_tokens_first() {
        let _g = tch::no_grad_guard();
        for pre in [true, false] {
            let m = tiny(pre);
            let (first, row) = ([7i64, 30, 2], [5i64, 9, 17, 3, 44]);
            let cfg = crate::PrefixConfig { num_prefix: 3 };
            let kv = m.key_values(&first).unwrap().to_kind(Kind::Double);
            assert_eq!(kv.size(), [cfg.numel(&m.config)]);
            let both: Vec<i64> = first.iter().chain(&row).copied().collect();
            let joined = Tensor::from_slice(&both).view([1, 8]);
            let expect =
                m.hidden_states(&joined, &joined.ones_like(), Padding::Right, None).unwrap().narrow(1, 3, 5);
            // Variant 0: the real prefix; variant 1: another prefix (must not leak into variant 0).
            let flat = Tensor::stack(&[&kv, &(kv.randn_like() * 0.5)], 0);
            let t =
                Tuning::Prefix(crate::PrefixBatch::from_flat(&flat, &cfg, &m.config, Kind::Double).unwrap());
            let ids = Tensor::from_slice(&row).view([1, 5]).repeat([2, 1]);
            let h = m.hidden_states(&ids, &ids.ones_like(), Padding::Right, Some(&t)).unwrap();
            let diff = (h.get(0) - expect.get(0)).abs().max().double_value(&[]);
            // The prefix is float32 (the trained state's type): its rounding is all that differs.
            assert!(diff < 1e-6, "pre={pre}: prefix states differ from the joined row's by {diff}");
            assert!((h.get(1) - expect.get(0)).abs().max().double_value(&[]) > 1e-3, "variant 1 ignored");
            // Left padding (explicit mask) keeps the prefix visible to every real position.
            let padded = Tensor::from_slice(&[1i64, 1, 5, 9, 17, 3, 44]).view([1, 7]).repeat([2, 1]);
            let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1]).view([1, 7]).repeat([2, 1]);
            let h2 = m.hidden_states(&padded, &mask, Padding::Any, Some(&t)).unwrap();
            let diff = (h2.narrow(1, 2, 5) - &h).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "pre={pre}: left padding changed prefix states by {diff}");
        }
        // Prefix plus row beyond the position table is refused.
        let m = tiny(true);
        let cfg = crate::PrefixConfig { num_prefix: 3 };
        let flat = Tensor::zeros([1, cfg.numel(&m.config)], (Kind::Double, Device::Cpu));
        let t = Tuning::Prefix(crate::PrefixBatch::from_flat(&flat, &cfg, &m.config, Kind::Double).unwrap());
        let ids = Tensor::zeros([1, 30], (Kind::Int64, Device::Cpu));
        let e = m.hidden_states(&ids, &ids.ones_like(), Padding::Right, Some(&t)).unwrap_err().to_string();
        assert!(e.contains("prefix"), "{e}");
    }

    #[test]
    fn parameters_are_named_as_hf() {
        let m = tiny(false);
        let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.decoder.project_in.weight".to_string()));
        assert!(names.contains(&"model.decoder.layers.1.self_attn.q_proj.bias".to_string()));
        assert!(!names.iter().any(|n| n == "model.decoder.final_layer_norm.weight"));
        // 2 embeddings, 2 projections, 2 layers x (4 attn x 2 + 2 norms x 2 + 2 fc x 2).
        assert_eq!(names.len(), 2 + 2 + 2 * (8 + 4 + 4));
        let n: i64 = m.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
        assert!(n > 0);
    }

    #[test]
    fn too_long_sequences_are_refused() {
        let m = tiny(true);
        let ids = Tensor::zeros([1, 33], (Kind::Int64, Device::Cpu));
        let e = m.hidden_states(&ids, &ids.ones_like(), Padding::Right, None).unwrap_err().to_string();
        assert!(e.contains("max_position_embeddings"), "{e}");
    }
}
