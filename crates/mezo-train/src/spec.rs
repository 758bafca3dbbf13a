//! The wire form of a run ([`mezo_proto::v1::RunSpec`]) and [`TrainConfig`], both ways. Zero
//! values on the wire take `mezo train`'s defaults, so a client sets only what it means.

use std::path::PathBuf;

use mezo_proto::v1 as pb;

use crate::engine::LossKind;
use crate::error::{Result, TrainError};
use crate::optim::Schedule;
use crate::trainer::{default_loss, ModeSpec, OptimizerSpec, TrainConfig, DEFAULT_MAX_NEW_TOKENS};
use mezo_data::{Task, UserTemplate};

/// Where the work of a step goes (the service's choice; `mezo train` runs everything locally).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Direction,
    Data,
}

fn or<T: PartialEq + Default>(v: T, d: T) -> T {
    if v == T::default() {
        d
    } else {
        v
    }
}

/// The zeroth-order learning rate when none is given: MeZO's settings for OPT (LoRA 1e-4, full
/// 1e-6, prefix 1e-3).
pub fn default_lr(full: bool, prefix: bool) -> f64 {
    match (full, prefix) {
        (true, _) => 1e-6,
        (_, true) => 1e-3,
        _ => 1e-4,
    }
}

/// ε when none is given: MeZO's settings (LoRA 1e-2, full 1e-3, prefix 1e-1).
pub fn default_eps(full: bool, prefix: bool) -> f64 {
    match (full, prefix) {
        (true, _) => 1e-3,
        (_, true) => 1e-1,
        _ => 1e-2,
    }
}

/// Builds the configuration a run's processes share. `out` is where a local copy writes.
pub fn config_from_spec(s: &pb::RunSpec, out: PathBuf) -> Result<(TrainConfig, Split, u64)> {
    let bad = |m: String| TrainError::Config(m);
    let mode = match &s.mode {
        Some(pb::run_spec::Mode::Lora(l)) => ModeSpec::Lora {
            r: or(l.r, 8),
            alpha: or(l.alpha, 16.0),
            targets: if l.targets.is_empty() {
                vec!["q_proj".into(), "v_proj".into()]
            } else {
                l.targets.clone()
            },
        },
        Some(pb::run_spec::Mode::Full(f)) => ModeSpec::Full { patterns: f.patterns.clone() },
        Some(pb::run_spec::Mode::Prefix(p)) => {
            ModeSpec::Prefix { num_prefix: i64::from(or(p.num_prefix, 5)) }
        }
        None => ModeSpec::Lora { r: 8, alpha: 16.0, targets: vec!["q_proj".into(), "v_proj".into()] },
    };
    let full = matches!(mode, ModeSpec::Full { .. });
    let prefix = matches!(mode, ModeSpec::Prefix { .. });
    let optimizer = match pb::Optimizer::try_from(s.optimizer)
        .map_err(|_| bad(format!("optimizer: unknown value {}", s.optimizer)))?
    {
        pb::Optimizer::Unspecified | pb::Optimizer::ZoSgd => OptimizerSpec::ZoSgd,
        pb::Optimizer::ZoMomentum => OptimizerSpec::ZoMomentum,
        pb::Optimizer::ZoAdam => OptimizerSpec::ZoAdam,
    };
    let schedule = match pb::Schedule::try_from(s.schedule)
        .map_err(|_| bad(format!("schedule: unknown value {}", s.schedule)))?
    {
        pb::Schedule::Unspecified | pb::Schedule::Constant => Schedule::Constant,
        pb::Schedule::Linear => Schedule::Linear,
        pb::Schedule::Cosine => Schedule::Cosine,
    };
    let distribution = match pb::Distribution::try_from(s.distribution)
        .map_err(|_| bad(format!("distribution: unknown value {}", s.distribution)))?
    {
        pb::Distribution::Unspecified | pb::Distribution::Gaussian => "gaussian",
        pb::Distribution::Rademacher => "rademacher",
    };
    let task = or(s.task.clone(), "sst2".into());
    let template = or(s.template.clone(), "mezo".into());
    let user_template = s.user_template.as_ref().map(|u| UserTemplate {
        prompt: u.prompt.clone(),
        candidates: u.candidates.clone(),
        candidates_field: u.candidates_field.clone(),
        label_field: u.label_field.clone(),
        answer_field: u.answer_field.clone(),
    });
    let loss = match pb::Loss::try_from(s.loss).map_err(|_| bad(format!("loss: unknown value {}", s.loss)))? {
        pb::Loss::Unspecified => default_loss(&Task::new(&task, &template, user_template.clone())?),
        pb::Loss::Classification => LossKind::Classification,
        pb::Loss::AnswerCe => LossKind::AnswerCe,
        pb::Loss::Accuracy => LossKind::Accuracy,
        pb::Loss::F1 => LossKind::F1,
    };
    let split = match pb::WorkSplit::try_from(s.split)
        .map_err(|_| bad(format!("split: unknown value {}", s.split)))?
    {
        pb::WorkSplit::Unspecified | pb::WorkSplit::Direction => Split::Direction,
        pb::WorkSplit::Data => Split::Data,
    };
    if s.model.is_empty() || s.data_dir.is_empty() {
        return Err(bad("model and data_dir are required".into()));
    }
    let cfg = TrainConfig {
        model: s.model.clone().into(),
        task,
        data_dir: s.data_dir.clone().into(),
        mode,
        steps: or(s.steps, 20000),
        lr: or(s.lr, default_lr(full, prefix)),
        eps: or(s.eps, default_eps(full, prefix)),
        batch_size: or(s.batch_size, 16) as usize,
        directions: or(s.directions, 1) as usize,
        grad_accum: or(s.grad_accum, 1) as usize,
        seed: s.seed,
        eval_every: s.eval_every,
        optimizer,
        momentum: or(s.momentum, 0.9),
        schedule,
        weight_decay: s.weight_decay,
        distribution: distribution.into(),
        loss,
        template,
        user_template,
        max_new_tokens: or(s.max_new_tokens, DEFAULT_MAX_NEW_TOKENS as u32) as usize,
        n_train: or(s.n_train, 1000) as usize,
        n_dev: or(s.n_dev, 500) as usize,
        min_words: s.min_words as usize,
        test_limit: (s.test_limit > 0).then_some(s.test_limit as usize),
        eval_batch_size: or(s.eval_batch_size, 32) as usize,
        device: "cpu".into(),
        dtype: or(s.dtype.clone(), "fp32".into()),
        out,
    };
    cfg.validate()?;
    Ok((cfg, split, s.snapshot_every))
}

/// The wire form of a configuration (for clients that start runs from `mezo train`'s flags).
pub fn spec_from_config(c: &TrainConfig, split: Split, snapshot_every: u64) -> pb::RunSpec {
    pb::RunSpec {
        model: c.model.to_string_lossy().into(),
        task: c.task.clone(),
        data_dir: c.data_dir.to_string_lossy().into(),
        mode: Some(match &c.mode {
            ModeSpec::Lora { r, alpha, targets } => {
                pb::run_spec::Mode::Lora(pb::LoraSpec { r: *r, alpha: *alpha, targets: targets.clone() })
            }
            ModeSpec::Full { patterns } => {
                pb::run_spec::Mode::Full(pb::FullSpec { patterns: patterns.clone() })
            }
            ModeSpec::Prefix { num_prefix } => {
                pb::run_spec::Mode::Prefix(pb::PrefixSpec { num_prefix: *num_prefix as u32 })
            }
        }),
        steps: c.steps,
        lr: c.lr,
        eps: c.eps,
        batch_size: c.batch_size as u32,
        directions: c.directions as u32,
        grad_accum: c.grad_accum as u32,
        seed: c.seed,
        eval_every: c.eval_every,
        optimizer: match c.optimizer {
            OptimizerSpec::ZoSgd | OptimizerSpec::Adam => pb::Optimizer::ZoSgd,
            OptimizerSpec::ZoMomentum => pb::Optimizer::ZoMomentum,
            OptimizerSpec::ZoAdam => pb::Optimizer::ZoAdam,
        } as i32,
        momentum: c.momentum,
        schedule: match c.schedule {
            Schedule::Constant => pb::Schedule::Constant,
            Schedule::Linear => pb::Schedule::Linear,
            Schedule::Cosine => pb::Schedule::Cosine,
        } as i32,
        weight_decay: c.weight_decay,
        distribution: if c.distribution == "rademacher" {
            pb::Distribution::Rademacher
        } else {
            pb::Distribution::Gaussian
        } as i32,
        loss: match c.loss {
            LossKind::Classification => pb::Loss::Classification,
            LossKind::AnswerCe => pb::Loss::AnswerCe,
            LossKind::Accuracy => pb::Loss::Accuracy,
            LossKind::F1 => pb::Loss::F1,
        } as i32,
        template: c.template.clone(),
        n_train: c.n_train as u32,
        n_dev: c.n_dev as u32,
        min_words: c.min_words as u32,
        test_limit: c.test_limit.unwrap_or(0) as u32,
        eval_batch_size: c.eval_batch_size as u32,
        dtype: c.dtype.clone(),
        split: match split {
            Split::Direction => pb::WorkSplit::Direction,
            Split::Data => pb::WorkSplit::Data,
        } as i32,
        snapshot_every,
        user_template: c.user_template.as_ref().map(|u| pb::UserTemplate {
            prompt: u.prompt.clone(),
            candidates: u.candidates.clone(),
            candidates_field: u.candidates_field.clone(),
            label_field: u.label_field.clone(),
            answer_field: u.answer_field.clone(),
        }),
        max_new_tokens: c.max_new_tokens as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_values_take_the_defaults_and_round_trip() {
        let s = pb::RunSpec { model: "m".into(), data_dir: "d".into(), steps: 7, ..Default::default() };
        let (c, split, snap) = config_from_spec(&s, "out".into()).unwrap();
        assert_eq!((c.steps, c.lr, c.eps, c.batch_size, c.directions), (7, 1e-4, 1e-2, 16, 1));
        assert_eq!(split, Split::Direction);
        assert_eq!(snap, 0);
        let back = spec_from_config(&c, Split::Data, 5);
        let (c2, split2, snap2) = config_from_spec(&back, "out".into()).unwrap();
        assert_eq!(c2, c);
        assert_eq!((split2, snap2), (Split::Data, 5));
        // The prefix mode: 0 virtual tokens means MeZO's 5, and its own lr and ε defaults.
        let s = pb::RunSpec {
            model: "m".into(),
            data_dir: "d".into(),
            mode: Some(pb::run_spec::Mode::Prefix(pb::PrefixSpec { num_prefix: 0 })),
            ..Default::default()
        };
        let (c, _, _) = config_from_spec(&s, "out".into()).unwrap();
        assert_eq!(c.mode, ModeSpec::Prefix { num_prefix: 5 });
        assert_eq!((c.lr, c.eps), (1e-3, 1e-1));
        let back = spec_from_config(&c, Split::Direction, 0);
        assert_eq!(config_from_spec(&back, "out".into()).unwrap().0, c);
    }

    #[test]
    fn tasks_user_templates_and_losses_cross_the_wire() {
        let base = pb::RunSpec { model: "m".into(), data_dir: "d".into(), ..Default::default() };
        // An unset loss is the task's default.
        let s = pb::RunSpec { task: "squad".into(), ..base.clone() };
        let (c, _, _) = config_from_spec(&s, "o".into()).unwrap();
        assert_eq!((c.loss, c.max_new_tokens), (LossKind::AnswerCe, DEFAULT_MAX_NEW_TOKENS));
        let s = pb::RunSpec { task: "copa".into(), loss: pb::Loss::Accuracy as i32, ..base.clone() };
        assert_eq!(config_from_spec(&s, "o".into()).unwrap().0.loss, LossKind::Accuracy);
        let s = pb::RunSpec {
            task: "custom".into(),
            loss: pb::Loss::F1 as i32,
            max_new_tokens: 7,
            user_template: Some(pb::UserTemplate {
                prompt: "Q: {q}\\nA:".into(),
                answer_field: "a".into(),
                ..Default::default()
            }),
            ..base.clone()
        };
        let (c, split, snap) = config_from_spec(&s, "o".into()).unwrap();
        assert_eq!(c.user_template.as_ref().unwrap().answer_field, "a");
        assert_eq!((c.loss, c.max_new_tokens), (LossKind::F1, 7));
        assert_eq!(config_from_spec(&spec_from_config(&c, split, snap), "o".into()).unwrap().0, c);
        // Mismatches are refused with the reason.
        let s = pb::RunSpec { task: "squad".into(), loss: pb::Loss::Accuracy as i32, ..base.clone() };
        let e = config_from_spec(&s, "o".into()).unwrap_err().to_string();
        assert!(e.contains("generates") && e.contains("answer-ce or f1"), "{e}");
        let s = pb::RunSpec { task: "rte".into(), loss: pb::Loss::F1 as i32, ..base.clone() };
        assert!(config_from_spec(&s, "o".into()).unwrap_err().to_string().contains("scores candidates"));
        let s = pb::RunSpec { task: "custom".into(), ..base.clone() };
        assert!(config_from_spec(&s, "o".into()).unwrap_err().to_string().contains("--prompt"));
        let s = pb::RunSpec { task: "rte".into(), user_template: Some(Default::default()), ..base };
        assert!(config_from_spec(&s, "o".into()).unwrap_err().to_string().contains("custom only"));
    }

    #[test]
    fn bad_specs_name_the_field() {
        let e = config_from_spec(&pb::RunSpec::default(), "o".into()).unwrap_err().to_string();
        assert!(e.contains("model and data_dir"), "{e}");
        let s = pb::RunSpec { model: "m".into(), data_dir: "d".into(), optimizer: 42, ..Default::default() };
        assert!(config_from_spec(&s, "o".into()).unwrap_err().to_string().contains("optimizer"));
        let s = pb::RunSpec { model: "m".into(), data_dir: "d".into(), lr: -1.0, ..Default::default() };
        assert!(config_from_spec(&s, "o".into()).unwrap_err().to_string().contains("--lr"));
    }
}
