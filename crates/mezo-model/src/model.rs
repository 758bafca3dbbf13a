//! The model the rest of the system uses: one of the supported architectures, chosen by
//! config.json's `model_type` (`opt`, `llama`, `qwen2`, `mistral`). Everything outside this
//! crate (the engine, the trainer, the CLI, the worker) goes through [`Model`] and
//! [`ModelConfig`], so adding an architecture touches this file and its own module.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::{io_err, ModelError, Result};
use crate::llama::Llama;
use crate::llama_config::{LlamaConfig, LlamaFamily};
use crate::lora::{LoraBatch, Target};
use crate::opt::{Opt, Padding};
use crate::placement::{ParamCounts, Placement};
use crate::{OptConfig, Tuning};

/// The `model_type`s `mezo` loads, for messages.
pub const SUPPORTED_MODEL_TYPES: &str = "opt, llama, qwen2, mistral";

#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Opt(OptConfig),
    Llama(LlamaConfig),
}

/// Where a LoRA target sits in a decoder layer, and its linear layer's sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// HF's module path within the model, e.g. `model.layers.3.self_attn.q_proj`.
    pub path: String,
    pub in_features: i64,
    pub out_features: i64,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(&text, path)
    }

    /// Parses a config.json by its `model_type`; `path` is named in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let json: serde_json::Value = serde_json::from_str(text)
            .map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
        match json.get("model_type").and_then(|v| v.as_str()) {
            Some("opt") => Ok(ModelConfig::Opt(OptConfig::from_json(text, path)?)),
            Some(t) => match LlamaFamily::from_model_type(t) {
                Some(f) => Ok(ModelConfig::Llama(LlamaConfig::from_json(text, path, f)?)),
                None => {
                    Err(ModelError::UnsupportedModelType { path: path.to_path_buf(), model_type: t.into() })
                }
            },
            None => Err(ModelError::Config {
                path: path.to_path_buf(),
                field: "model_type".into(),
                message: format!("missing or not a string (expected one of {SUPPORTED_MODEL_TYPES})"),
            }),
        }
    }

    /// A published shape by name, for benchmarks: OPT's (`125m` … `66b`) and the Llama family's
    /// (`llama2-7b`, `llama2-13b`, `llama3-8b`, `llama3.2-1b`, `qwen2.5-0.5b`, `qwen2.5-7b`,
    /// `mistral-7b`).
    pub fn shape(name: &str) -> Option<Self> {
        OptConfig::shape(name)
            .map(ModelConfig::Opt)
            .or_else(|| LlamaConfig::shape(name).map(ModelConfig::Llama))
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Opt(_) => "opt",
            ModelConfig::Llama(c) => c.family.model_type(),
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match self {
            ModelConfig::Opt(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn num_hidden_layers(&self) -> i64 {
        match self {
            ModelConfig::Opt(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// The longest sequence the model takes: OPT's learned positions end there; RoPE models
    /// run past it (HF does too), so this is only the length they were trained for.
    pub fn max_position_embeddings(&self) -> i64 {
        match self {
            ModelConfig::Opt(c) => c.max_position_embeddings,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    /// The id that fills padded positions.
    pub fn pad_token_id(&self) -> i64 {
        match self {
            ModelConfig::Opt(c) => c.pad_token_id,
            ModelConfig::Llama(c) => c.pad_token_id,
        }
    }

    /// Parameters of each decoder layer and of what surrounds the layers (the sizes
    /// [`Model::named_parameters`] has), for placing the layers on devices.
    pub fn param_counts(&self) -> ParamCounts {
        match self {
            ModelConfig::Opt(c) => {
                let (h, e, f, v) = (c.hidden_size, c.word_embed_proj_dim, c.ffn_dim, c.vocab_size);
                let b = |n: i64| if c.enable_bias { n } else { 0 };
                let norm = if c.layer_norm_elementwise_affine { 2 * h } else { 0 };
                let layer = 4 * (h * h + b(h)) + (f * h + b(f)) + (h * f + b(h)) + 2 * norm;
                let proj = if c.has_projections() { h * e } else { 0 };
                let head = if c.tie_word_embeddings { 0 } else { v * e };
                let positions = (c.max_position_embeddings + crate::config::OPT_POSITION_OFFSET) * h;
                let final_norm = if c.has_final_layer_norm() { norm } else { 0 };
                ParamCounts {
                    layers: vec![layer; c.num_hidden_layers as usize],
                    first: v * e + positions + proj + head,
                    last: final_norm + proj,
                }
            }
            ModelConfig::Llama(c) => {
                let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
                let (q, kv) = (c.q_out(), c.kv_out());
                let b = |on: bool, n: i64| if on { n } else { 0 };
                let attn =
                    h * q + b(c.qkv_bias, q) + 2 * (h * kv + b(c.qkv_bias, kv)) + q * h + b(c.o_bias, h);
                let mlp = 3 * h * f + b(c.mlp_bias, 2 * f + h);
                let head = if c.tie_word_embeddings { 0 } else { v * h };
                ParamCounts {
                    layers: vec![attn + mlp + 2 * h; c.num_hidden_layers as usize],
                    first: v * h + head,
                    last: h,
                }
            }
        }
    }

    /// The LoRA targets this architecture has, in [`Target`] order.
    pub fn lora_targets(&self) -> &'static [Target] {
        use Target::*;
        match self {
            ModelConfig::Opt(_) => &[Q, K, V, Out, Fc1, Fc2],
            ModelConfig::Llama(_) => &[Q, K, V, O, Gate, Up, Down],
        }
    }

    /// Where `target` sits in decoder layer `layer` and its sizes; an error naming the
    /// architecture's modules when it has no such module.
    pub fn lora_module(&self, layer: usize, target: Target) -> Result<LoraModule> {
        let unsupported = || ModelError::UnsupportedTarget {
            target: target.name().into(),
            model_type: self.model_type().into(),
            expected: self.lora_targets().iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
        };
        if !self.lora_targets().contains(&target) {
            return Err(unsupported());
        }
        let (path, inp, out) = match self {
            ModelConfig::Opt(c) => {
                let p = format!("model.decoder.layers.{layer}");
                let h = c.hidden_size;
                match target {
                    Target::Fc1 => (format!("{p}.fc1"), h, c.ffn_dim),
                    Target::Fc2 => (format!("{p}.fc2"), c.ffn_dim, h),
                    t => (format!("{p}.self_attn.{}", t.name()), h, h),
                }
            }
            ModelConfig::Llama(c) => {
                let p = format!("model.layers.{layer}");
                let (h, f) = (c.hidden_size, c.intermediate_size);
                let (attn, mlp) =
                    (format!("{p}.self_attn.{}", target.name()), format!("{p}.mlp.{}", target.name()));
                match target {
                    Target::Q => (attn, h, c.q_out()),
                    Target::K | Target::V => (attn, h, c.kv_out()),
                    Target::O => (attn, c.q_out(), h),
                    Target::Gate | Target::Up => (mlp, h, f),
                    Target::Down => (mlp, f, h),
                    _ => return Err(unsupported()),
                }
            }
        };
        Ok(LoraModule { path, in_features: inp, out_features: out })
    }
}

/// A loaded model of any supported architecture.
pub enum Model {
    Opt(Opt),
    Llama(Llama),
}

impl Model {
    /// Loads `dir/config.json` and the weights beside it onto `device` as `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_on(dir, &[device], kind)
    }

    /// [`Self::load`] with the decoder layers split over `devices` in contiguous blocks balanced
    /// by parameters ([`Placement::for_model`]); one device is the unsplit model.
    pub fn load_on(dir: &Path, devices: &[Device], kind: Kind) -> Result<Self> {
        Ok(match ModelConfig::from_dir(dir)? {
            ModelConfig::Opt(_) => Model::Opt(Opt::load_on(dir, devices, kind)?),
            ModelConfig::Llama(c) => Model::Llama(Llama::load_on(c, dir, devices, kind)?),
        })
    }

    /// Random weights of `config`'s shape (HF's initialisation), seeded.
    pub fn random(config: ModelConfig, device: Device, kind: Kind, seed: i64) -> Result<Self> {
        Self::random_on(config, &[device], kind, seed)
    }

    /// [`Self::random`] split over `devices`; every tensor is made on its own device.
    pub fn random_on(config: ModelConfig, devices: &[Device], kind: Kind, seed: i64) -> Result<Self> {
        Ok(match config {
            ModelConfig::Opt(c) => Model::Opt(Opt::random_on(c, devices, kind, seed)?),
            ModelConfig::Llama(c) => Model::Llama(Llama::random_on(c, devices, kind, seed)?),
        })
    }

    /// Which device holds each decoder layer.
    pub fn placement(&self) -> &Placement {
        match self {
            Model::Opt(m) => &m.placement,
            Model::Llama(m) => &m.placement,
        }
    }

    pub fn config(&self) -> ModelConfig {
        match self {
            Model::Opt(m) => ModelConfig::Opt(m.config.clone()),
            Model::Llama(m) => ModelConfig::Llama(m.config.clone()),
        }
    }

    /// Where the inputs go and the outputs come from (the first device of a split model).
    pub fn device(&self) -> Device {
        match self {
            Model::Opt(m) => m.device,
            Model::Llama(m) => m.device,
        }
    }

    /// The dtype of the weights and activations.
    pub fn kind(&self) -> Kind {
        match self {
            Model::Opt(m) => m.kind,
            Model::Llama(m) => m.kind,
        }
    }

    /// Records that the weights were cast to `kind` (by code that walks `named_parameters`).
    pub fn set_kind(&mut self, kind: Kind) {
        match self {
            Model::Opt(m) => m.kind = kind,
            Model::Llama(m) => m.kind = kind,
        }
    }

    pub fn pad_token_id(&self) -> i64 {
        match self {
            Model::Opt(m) => m.config.pad_token_id,
            Model::Llama(m) => m.config.pad_token_id,
        }
    }

    pub fn eos_token_id(&self) -> i64 {
        match self {
            Model::Opt(m) => m.config.eos_token_id,
            Model::Llama(m) => m.config.eos_token_id,
        }
    }

    /// The LoRA batch of `tuning` for the Llama family, which has no prefix-tuning yet.
    fn llama_lora(tuning: Option<&Tuning>) -> Result<Option<&LoraBatch>> {
        match tuning {
            Some(Tuning::Prefix(_)) => Err(ModelError::InvalidArgument {
                what: "trainable mode",
                value: "prefix on a Llama-family model".into(),
                expected: "lora or full (prefix-tuning supports OPT models)",
            }),
            other => Ok(other.and_then(Tuning::lora)),
        }
    }

    /// The last hidden states, `[batch, seq, width]`, ready for [`Self::logits`]. `ids` and
    /// `mask` are `[batch, seq]` int64, `mask` 1 on tokens and 0 on padding.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        padding: Padding,
        tuning: Option<&Tuning>,
    ) -> Result<Tensor> {
        match self {
            Model::Opt(m) => m.hidden_states(ids, mask, padding, tuning),
            Model::Llama(m) => m.hidden_states(ids, mask, padding, Self::llama_lora(tuning)?),
        }
    }

    /// Whether [`Padding::Tree`] rows read as their branches alone on this model (see
    /// [`crate::ScoreBatch::with_trees`]).
    pub fn supports_trees(&self) -> bool {
        match self {
            Model::Opt(_) => true,
            Model::Llama(m) => m.supports_trees(),
        }
    }

    /// The LM head over any leading shape of hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        match self {
            Model::Opt(m) => m.logits(hidden),
            Model::Llama(m) => m.logits(hidden),
        }
    }

    /// Every parameter by its HF name, for code that walks the weights (full-parameter MeZO,
    /// checksums, saving). Tied weights appear once.
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        match self {
            Model::Opt(m) => m.named_parameters(),
            Model::Llama(m) => m.named_parameters(),
        }
    }
}

impl From<Opt> for Model {
    fn from(m: Opt) -> Self {
        Model::Opt(m)
    }
}

impl From<Llama> for Model {
    fn from(m: Llama) -> Self {
        Model::Llama(m)
    }
}

impl From<OptConfig> for ModelConfig {
    fn from(c: OptConfig) -> Self {
        ModelConfig::Opt(c)
    }
}

impl From<LlamaConfig> for ModelConfig {
    fn from(c: LlamaConfig) -> Self {
        ModelConfig::Llama(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opt::ScoreBatch;
    use crate::CausalLm;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(json, Path::new("m/config.json"))
    }

    #[test]
    fn model_type_picks_the_architecture() {
        assert_eq!(parse(r#"{"model_type": "opt"}"#).unwrap().model_type(), "opt");
        for t in ["llama", "qwen2", "mistral"] {
            assert_eq!(parse(&format!(r#"{{"model_type": "{t}"}}"#)).unwrap().model_type(), t);
        }
        let e = parse(r#"{"model_type": "gpt_neox"}"#).unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains("gpt_neox") && e.contains(SUPPORTED_MODEL_TYPES),
            "{e}"
        );
        let e = parse(r#"{"hidden_size": 8}"#).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains(SUPPORTED_MODEL_TYPES), "{e}");
    }

    #[test]
    fn lora_modules_follow_each_architecture() {
        let l = parse(
            r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                "intermediate_size": 96}"#,
        )
        .unwrap();
        let v = l.lora_module(3, Target::V).unwrap();
        assert_eq!(
            (v.path.as_str(), v.in_features, v.out_features),
            ("model.layers.3.self_attn.v_proj", 64, 16)
        );
        let d = l.lora_module(0, Target::Down).unwrap();
        assert_eq!(
            (d.path.as_str(), d.in_features, d.out_features),
            ("model.layers.0.mlp.down_proj", 96, 64)
        );
        let e = l.lora_module(0, Target::Fc1).unwrap_err().to_string();
        assert!(e.contains("fc1") && e.contains("llama") && e.contains("o_proj"), "{e}");
        let o = parse(r#"{"model_type": "opt"}"#).unwrap();
        assert_eq!(o.lora_module(1, Target::Out).unwrap().path, "model.decoder.layers.1.self_attn.out_proj");
        let e = o.lora_module(0, Target::Gate).unwrap_err().to_string();
        assert!(e.contains("gate_proj") && e.contains("fc2"), "{e}");
    }

    /// Llama through the shared interface: scores from `answer_logprobs` equal a hand-made
    /// log-softmax over full logits.
    #[test]
    fn answer_logprobs_match_full_logits() {
        let _g = tch::no_grad_guard();
        let cfg = parse(
            r#"{"model_type": "qwen2", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 1}"#,
        )
        .unwrap();
        let m = Model::random(cfg, Device::Cpu, Kind::Double, 1).unwrap();
        let rows = vec![vec![3i64, 7, 9, 11], vec![4i64, 5, 6]];
        let got = m.answer_logprobs(&rows, &[2, 1]).unwrap();
        for (r, (row, start)) in rows.iter().zip([2usize, 1]).enumerate() {
            let ids = Tensor::from_slice(row).view([1, -1]);
            let h = m.hidden_states(&ids, &ids.ones_like(), Padding::Right, None).unwrap();
            let logp = m.logits(&h).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
            let mut want = 0.0;
            for (p, &token) in row.iter().enumerate().skip(start) {
                want += logp.double_value(&[0, p as i64 - 1, token]);
            }
            want /= (row.len() - start) as f64;
            let g = got.double_value(&[r as i64]);
            assert!((g - want).abs() < 1e-5, "row {r}: {g} vs {want}");
        }
    }

    fn opt_json(pre: bool, tied: bool) -> serde_json::Value {
        let mut json = serde_json::json!({
            "model_type": "opt", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 4,
            "ffn_dim": 32, "num_attention_heads": 4, "max_position_embeddings": 32,
            "tie_word_embeddings": tied,
        });
        if !pre {
            json["do_layer_norm_before"] = false.into();
            json["word_embed_proj_dim"] = 8.into();
        }
        json
    }

    fn llama_json(model_type: &str) -> serde_json::Value {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 3,
            "intermediate_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 32, "tie_word_embeddings": false, "attention_bias": true,
            "mlp_bias": true, "sliding_window": 4, "use_sliding_window": true, "max_window_layers": 1,
        })
    }

    /// The counts that place layers are the sizes of the tensors the model builds.
    #[test]
    fn param_counts_match_the_built_parameters() {
        let mut configs: Vec<serde_json::Value> = Vec::new();
        for pre in [true, false] {
            for tied in [true, false] {
                configs.push(opt_json(pre, tied));
            }
        }
        configs.extend(["llama", "qwen2", "mistral"].map(llama_json));
        for json in configs {
            let cfg = parse(&json.to_string()).unwrap();
            let counts = cfg.param_counts();
            let m = Model::random(cfg.clone(), Device::Cpu, Kind::Float, 0).unwrap();
            let params = m.named_parameters();
            let numel = |pred: &dyn Fn(&str) -> bool| -> i64 {
                params.iter().filter(|(n, _)| pred(n)).map(|(_, t)| t.numel() as i64).sum()
            };
            let total = numel(&|_| true);
            assert_eq!(counts.total(), total, "{json}");
            for l in 0..cfg.num_hidden_layers() as usize {
                let tag = format!(".layers.{l}.");
                assert_eq!(counts.layers[l], numel(&|n: &str| n.contains(&tag)), "{json} layer {l}");
            }
        }
    }

    /// No tuning, three LoRA variants, and (OPT) two prefix variants, random, as `kind`.
    fn tunings(cfg: &ModelConfig, kind: Kind) -> Vec<Option<Tuning>> {
        let lc = crate::LoraConfig { r: 2, alpha: 4.0, targets: vec![Target::Q, Target::V] };
        let tensors = lc.tensors(cfg).unwrap();
        let p: i64 = tensors.iter().map(crate::LoraTensor::numel).sum();
        let flat = Tensor::randn([3, p], (Kind::Float, Device::Cpu)) * 0.1;
        let lora = Tuning::Lora(LoraBatch::from_flat(&flat, &lc, &tensors, kind).unwrap());
        let mut out = vec![None, Some(lora)];
        if let ModelConfig::Opt(oc) = cfg {
            let pc = crate::PrefixConfig { num_prefix: 2 };
            let flat = Tensor::randn([2, pc.numel(oc)], (Kind::Float, Device::Cpu));
            out.push(Some(Tuning::Prefix(crate::PrefixBatch::from_flat(&flat, &pc, oc, kind).unwrap())));
        }
        out
    }

    /// Every row of `b` (built from `rows`) scores, under every tuning, as the row scored alone.
    fn assert_scores_as_alone(
        m: &Model,
        b: &ScoreBatch,
        rows: &[Vec<i64>],
        starts: &[usize],
        tunings: &[Option<Tuning>],
        what: &serde_json::Value,
    ) {
        for t in tunings {
            let together = m.answer_logprob_sums(b, t.as_ref()).unwrap();
            for (r, row) in rows.iter().enumerate() {
                let one =
                    ScoreBatch::new(&rows[r..=r], &starts[r..=r], m.pad_token_id(), Device::Cpu).unwrap();
                let alone = m.answer_logprob_sums(&one, t.as_ref()).unwrap();
                let diff = (together.select(1, r as i64) - alone.select(1, 0)).abs().max().double_value(&[]);
                assert!(diff < 1e-9, "{what}: row {row:?} scores {diff} apart in the batch and alone");
            }
        }
    }

    /// Candidates that differ only in their last token share one input row, and score as if
    /// each ran alone: for every architecture, with and without adapter variants and prefixes.
    #[test]
    fn candidates_sharing_their_inputs_score_as_if_each_ran_alone() {
        let _g = tch::no_grad_guard();
        let mut configs: Vec<serde_json::Value> = vec![opt_json(true, true), opt_json(false, false)];
        configs.extend(["llama", "mistral"].map(llama_json));
        for json in configs {
            let cfg = parse(&json.to_string()).unwrap();
            let m = Model::random(cfg.clone(), Device::Cpu, Kind::Double, 3).unwrap();
            // Two examples with two one-token candidates each, one with a two-token candidate, and
            // a row that repeats another exactly.
            let rows = vec![
                vec![3i64, 7, 9, 11, 20],
                vec![3i64, 7, 9, 11, 21],
                vec![4i64, 5, 6, 20],
                vec![4i64, 5, 6, 21],
                vec![4i64, 5, 6, 22, 23],
                vec![3i64, 7, 9, 11, 20],
            ];
            let starts = [4, 4, 3, 3, 3, 4];
            let b = ScoreBatch::new(&rows, &starts, m.pad_token_id(), Device::Cpu).unwrap();
            assert_eq!(b.ids.size()[0], 3, "{json}: three distinct inputs");
            assert_eq!(b.input_tokens, 5 + 4 + 5);
            assert_scores_as_alone(&m, &b, &rows, &starts, &tunings(&cfg, Kind::Double), &json);
        }
    }

    /// Candidates of several tokens after a shared prompt ride in one tree row (the prompt once,
    /// each candidate as a branch) and score as each row alone: OPT (pre- and post-LN) with and
    /// without LoRA variants and prefixes, and Llama; a batch mixing trees, shared one-token
    /// candidates and plain rows.
    #[test]
    fn candidates_in_tree_rows_score_as_if_each_ran_alone() {
        let _g = tch::no_grad_guard();
        let mut configs: Vec<serde_json::Value> = vec![opt_json(true, true), opt_json(false, false)];
        configs.push(llama_json("llama"));
        for json in configs {
            let cfg = parse(&json.to_string()).unwrap();
            let m = Model::random(cfg.clone(), Device::Cpu, Kind::Double, 3).unwrap();
            assert!(m.supports_trees(), "{json}");
            let rows = vec![
                // A COPA-like example: a prompt and three candidates of 3, 2 and 4 tokens.
                vec![3i64, 7, 9, 11, 20, 21, 22],
                vec![3i64, 7, 9, 11, 23, 24],
                vec![3i64, 7, 9, 11, 20, 25, 26, 27],
                // SST-2-like: two one-token candidates (one shared row, no tree).
                vec![4i64, 5, 6, 20],
                vec![4i64, 5, 6, 21],
                // A lone row.
                vec![8i64, 9, 10, 11, 12],
            ];
            let starts = [4, 4, 4, 3, 3, 3];
            let b = ScoreBatch::with_trees(&rows, &starts, m.pad_token_id(), Device::Cpu, 64).unwrap();
            assert!(b.tree);
            assert_eq!(b.ids.size(), [3, 4 + 3 + 2 + 4], "{json}: the tree, the shared row, the lone row");
            // A tree wider than allowed falls back to rows of their own.
            let narrow = ScoreBatch::with_trees(&rows, &starts, m.pad_token_id(), Device::Cpu, 10).unwrap();
            assert!(!narrow.tree && narrow.ids.size()[0] == 5, "{json}");
            assert_scores_as_alone(&m, &b, &rows, &starts, &tunings(&cfg, Kind::Double), &json);
        }
        // Sliding windows count positions: a windowed model takes no trees.
        let mistral =
            Model::random(parse(&llama_json("mistral").to_string()).unwrap(), Device::Cpu, Kind::Float, 3)
                .unwrap();
        assert!(!mistral.supports_trees());
    }

    /// Rows that all begin with one long prompt ride in one tree row (the prompt once, each
    /// distinct input's own tokens as a branch) and score as each row alone: OPT (pre- and
    /// post-LN) and Llama, with and without LoRA variants and prefixes; rows whose answers start
    /// right after the prompt, and candidates sharing an input, included. A prompt shorter than
    /// `MIN_SHARED_PROMPT` is not shared.
    #[test]
    fn rows_sharing_a_long_prompt_score_as_if_each_ran_alone() {
        let _g = tch::no_grad_guard();
        let prompt: Vec<i64> = (0..crate::opt::MIN_SHARED_PROMPT as i64).map(|i| 2 + (i * 7) % 50).collect();
        let with = |tail: &[i64]| prompt.iter().chain(tail).copied().collect::<Vec<i64>>();
        let rows = vec![
            with(&[20, 21, 22, 30]),
            with(&[20, 21, 22, 31]), // the same input as the row before
            with(&[23, 24, 32, 33]),
            with(&[25]), // answered right after the prompt
            with(&[26, 27, 28, 29, 34]),
        ];
        let p = prompt.len();
        let starts = [p + 3, p + 3, p + 2, p, p + 4];
        let mut configs: Vec<serde_json::Value> = vec![opt_json(true, true), opt_json(false, false)];
        configs.push(llama_json("llama"));
        for json in configs {
            let cfg = parse(&json.to_string()).unwrap();
            let m = Model::random(cfg.clone(), Device::Cpu, Kind::Double, 3).unwrap();
            let b = ScoreBatch::with_trees(&rows, &starts, m.pad_token_id(), Device::Cpu, 64).unwrap();
            // The prompt once, then 4 + 4 + 1 + 5 tokens of the four distinct inputs.
            assert!(b.tree, "{json}");
            assert_eq!(b.ids.size(), [1, p as i64 + 14], "{json}");
            assert_eq!(b.input_tokens, p as u64 + 14);
            assert_scores_as_alone(&m, &b, &rows, &starts, &tunings(&cfg, Kind::Double), &json);
        }
        // One token fewer in common: rows of their own (the two candidates still share one).
        let mut short = rows.clone();
        short[2][crate::opt::MIN_SHARED_PROMPT - 1] = 60;
        let b = ScoreBatch::with_trees(&short, &starts, 1, Device::Cpu, 64).unwrap();
        assert!(!b.tree && b.ids.size()[0] == 4);
        // Too wide for the tree (twice the candidate trees' width): rows of their own.
        let b = ScoreBatch::with_trees(&rows, &starts, 1, Device::Cpu, (p + 13) / 2).unwrap();
        assert!(!b.tree && b.ids.size()[0] == 4);
    }

    /// A model split over `[Cpu, Cpu]` runs the split's code path (per-layer devices, masks,
    /// adapters and rotary tables moved per device, the head back on the first device) and must
    /// give the unsplit model's bits: no pass, no tensor is lost or reordered by the split.
    #[test]
    fn a_split_over_two_cpus_gives_the_unsplit_bits() {
        let _g = tch::no_grad_guard();
        let mut configs: Vec<serde_json::Value> = vec![opt_json(true, true), opt_json(false, false)];
        configs.extend(["llama", "mistral"].map(llama_json));
        for json in configs {
            let cfg = parse(&json.to_string()).unwrap();
            let one = Model::random(cfg.clone(), Device::Cpu, Kind::Float, 7).unwrap();
            let two = Model::random_on(cfg.clone(), &[Device::Cpu, Device::Cpu], Kind::Float, 7).unwrap();
            assert!(!one.placement().is_split() && two.placement().is_split());
            let sizes: Vec<usize> = two.placement().blocks().iter().map(|(_, r)| r.len()).collect();
            assert_eq!(sizes.iter().sum::<usize>(), cfg.num_hidden_layers() as usize);
            assert!(sizes.iter().all(|&n| n >= 1), "{sizes:?}");
            // The same weights (libtorch's generator is shared with tests running in parallel, so
            // the two draws cannot be relied on to match).
            for ((na, a), (nb, b)) in one.named_parameters().into_iter().zip(two.named_parameters()) {
                assert_eq!((na, a.size()), (nb, b.size()));
                b.shallow_clone().copy_(a);
            }
            let rows = vec![vec![3i64, 7, 9, 11, 20, 21, 5], vec![4i64, 5, 6]];
            let b = ScoreBatch::new(&rows, &[5, 1], one.pad_token_id(), Device::Cpu).unwrap();
            for t in &tunings(&cfg, Kind::Float) {
                let a = one.answer_logprob_sums(&b, t.as_ref()).unwrap();
                let c = two.answer_logprob_sums(&b, t.as_ref()).unwrap();
                assert!(a.equal(&c), "{json}: split scores differ: {a} vs {c}");
                // Left padding: the explicit masks (sliding windows too) on every device.
                let v = t.as_ref().map_or(1, Tuning::variants);
                let ids = Tensor::from_slice(&[1i64, 1, 5, 9, 17, 3, 44, 2]).view([1, 8]).repeat([v, 1]);
                let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1]).view([1, 8]).repeat([v, 1]);
                let h1 = one.hidden_states(&ids, &mask, Padding::Any, t.as_ref()).unwrap();
                let h2 = two.hidden_states(&ids, &mask, Padding::Any, t.as_ref()).unwrap();
                assert!(h1.equal(&h2), "{json}: split hidden states differ with left padding");
            }
            if let (Model::Opt(a), Model::Opt(c)) = (&one, &two) {
                assert!(a.key_values(&[3, 9, 1]).unwrap().equal(&c.key_values(&[3, 9, 1]).unwrap()));
            }
        }
    }

    /// On a GPU, the adapter forward (q, k, v deltas into the fused projection in place, their
    /// `A`s stacked; fc1 and its ReLU as one cuBLASLt GEMM) scores as the CPU's within float
    /// rounding, for adapters on q and v, on q, k and v, and on q and fc1 (which unfuses fc1).
    /// `cargo test --release -p mezo-model lora_on_cuda -- --ignored`.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn lora_on_cuda_scores_as_on_cpu() {
        assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
        let _g = tch::no_grad_guard();
        let gpu = Device::Cuda(0);
        for json in [opt_json(true, true), opt_json(false, false), llama_json("llama")] {
            let cfg = parse(&json.to_string()).unwrap();
            let cpu_model = Model::random(cfg.clone(), Device::Cpu, Kind::Float, 7).unwrap();
            let gpu_model = Model::random(cfg.clone(), gpu, Kind::Float, 7).unwrap();
            // Every tensor random, biases included (a dropped bias must show).
            for ((_, a), (_, b)) in cpu_model.named_parameters().into_iter().zip(gpu_model.named_parameters())
            {
                a.shallow_clone().copy_(&(Tensor::randn_like(a) * 0.3));
                b.shallow_clone().copy_(a);
            }
            let opt = matches!(cfg, ModelConfig::Opt(_));
            let mut sets = vec![vec![Target::Q, Target::V], vec![Target::Q, Target::K, Target::V]];
            if opt {
                sets.push(vec![Target::Q, Target::Fc1]);
            }
            let rows =
                vec![vec![3i64, 7, 9, 11, 20, 21, 5], vec![4i64, 5, 6], vec![8i64, 2, 2, 9], vec![1i64, 30]];
            let starts = [5, 1, 2, 1];
            for targets in sets {
                let lc = crate::LoraConfig { r: 2, alpha: 4.0, targets: targets.clone() };
                let tensors = lc.tensors(&cfg).unwrap();
                let p: i64 = tensors.iter().map(crate::LoraTensor::numel).sum();
                // Two variants (rows grouped by them), every matrix nonzero.
                let flat = Tensor::randn([2, p], (Kind::Float, Device::Cpu)) * 0.1;
                let score = |m: &Model, dev: Device| {
                    let lora =
                        LoraBatch::from_flat(&flat.to_device(dev), &lc, &tensors, Kind::Float).unwrap();
                    let b = ScoreBatch::new(&rows, &starts, m.pad_token_id(), dev).unwrap();
                    m.answer_logprob_sums(&b, Some(&Tuning::Lora(lora))).unwrap().to_device(Device::Cpu)
                };
                let (c, g) = (score(&cpu_model, Device::Cpu), score(&gpu_model, gpu));
                let diff = (&c - &g).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{json} with LoRA on {targets:?}: CUDA scores differ by {diff}");
                assert!(c.abs().max().double_value(&[]) > 0.1, "scores too small to compare");
                // Rows sharing a long prompt, read once as a tree row's trunk on the GPU (the
                // explicit-mask attention), against the same rows each on its own on the CPU.
                let prompt: Vec<i64> =
                    (0..crate::opt::MIN_SHARED_PROMPT as i64).map(|i| 2 + (i * 7) % 50).collect();
                let with = |tail: &[i64]| prompt.iter().chain(tail).copied().collect::<Vec<i64>>();
                let shared_rows = vec![with(&[20, 21, 30]), with(&[22, 31, 32]), with(&[23])];
                let p = prompt.len();
                let shared_starts = [p + 2, p + 1, p];
                let lora = |dev: Device| {
                    Tuning::Lora(
                        LoraBatch::from_flat(&flat.to_device(dev), &lc, &tensors, Kind::Float).unwrap(),
                    )
                };
                let b = ScoreBatch::with_trees(&shared_rows, &shared_starts, 1, gpu, 64).unwrap();
                assert!(b.tree, "{json}: the shared prompt is not read once");
                let g = gpu_model.answer_logprob_sums(&b, Some(&lora(gpu))).unwrap().to_device(Device::Cpu);
                let b = ScoreBatch::new(&shared_rows, &shared_starts, 1, Device::Cpu).unwrap();
                let c = cpu_model.answer_logprob_sums(&b, Some(&lora(Device::Cpu))).unwrap();
                let diff = (&c - &g).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{json} with LoRA on {targets:?}: a shared prompt scores {diff} apart");
            }
        }
    }

    /// A model split over two GPUs gives the one-GPU model's scores within float rounding. Run on
    /// a machine with 2 GPUs: `cargo test --release -p mezo-model split_over_two_gpus -- --ignored`
    /// (or the compiled test binary with `split_over_two_gpus --ignored`).
    #[test]
    #[ignore = "needs 2 CUDA GPUs"]
    fn split_over_two_gpus_matches_one_gpu() {
        let n = tch::Cuda::device_count();
        if n < 2 {
            eprintln!("split_over_two_gpus_matches_one_gpu: skipped, {n} CUDA device(s) here, 2 needed");
            return;
        }
        let _g = tch::no_grad_guard();
        let (g0, g1) = (Device::Cuda(0), Device::Cuda(1));
        for json in [opt_json(true, true), opt_json(false, false), llama_json("mistral")] {
            let cfg = parse(&json.to_string()).unwrap();
            let one = Model::random(cfg.clone(), g0, Kind::Float, 7).unwrap();
            let two = Model::random_on(cfg.clone(), &[g0, g1], Kind::Float, 7).unwrap();
            let last = cfg.num_hidden_layers() as usize - 1;
            assert_eq!((two.placement().layer(0), two.placement().layer(last)), (g0, g1));
            // Each device draws from its own generator: copy the weights across.
            for ((_, a), (_, b)) in one.named_parameters().into_iter().zip(two.named_parameters()) {
                b.shallow_clone().copy_(a);
            }
            let on_cuda1 = two.named_parameters().iter().filter(|(_, t)| t.device() == g1).count();
            assert!(on_cuda1 > 0, "no parameter on cuda:1");
            let rows = vec![vec![3i64, 7, 9, 11, 20, 21, 5], vec![4i64, 5, 6]];
            let b = ScoreBatch::new(&rows, &[5, 1], one.pad_token_id(), g0).unwrap();
            let lc = crate::LoraConfig { r: 2, alpha: 4.0, targets: vec![Target::Q, Target::V] };
            let tensors = lc.tensors(&cfg).unwrap();
            let p: i64 = tensors.iter().map(crate::LoraTensor::numel).sum();
            let flat = Tensor::randn([3, p], (Kind::Float, g0)) * 0.1;
            let lora = Tuning::Lora(LoraBatch::from_flat(&flat, &lc, &tensors, Kind::Float).unwrap());
            for t in [None, Some(lora)] {
                let a = one.answer_logprob_sums(&b, t.as_ref()).unwrap();
                let c = two.answer_logprob_sums(&b, t.as_ref()).unwrap();
                assert_eq!(c.device(), g0, "scores come back to the first device");
                let diff = (a - c).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{json}: split scores differ by {diff}");
            }
        }
    }
}
