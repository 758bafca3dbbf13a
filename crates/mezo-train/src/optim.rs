//! Learning-rate schedules and the update rules applied to a projected-gradient estimate
//! `ĝ = (1/n) Σ g_i z_i`. Every update is a sequence of separate element-wise tensor ops (no
//! fused multiply-add, no reduction) so it gives the same bits on CPU and CUDA: a replica that
//! replays the log on another device stays identical.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(TrainError::Config(format!(
                "unknown --schedule `{s}`: expected constant, linear or cosine"
            ))),
        }
    }

    /// η_t for step `t` of `total` (0-based).
    pub fn lr(self, base: f64, t: u64, total: u64) -> f64 {
        let frac = if total == 0 { 0.0 } else { t as f64 / total as f64 };
        match self {
            Schedule::Constant => base,
            Schedule::Linear => base * (1.0 - frac),
            Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
        }
    }
}

/// The update rule. ZO-SGD keeps no state; momentum keeps one buffer the size of the trainable
/// parameters (float32), Adam two.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Rule {
    Sgd,
    Momentum { beta: f64 },
    Adam { beta1: f64, beta2: f64, eps: f64 },
}

/// Per-tensor optimizer state.
#[derive(Default)]
pub struct Slot {
    m: Option<Tensor>,
    v: Option<Tensor>,
    t: i32,
}

impl Slot {
    /// Counts a step applied outside [`apply`] (a fused SGD update, which keeps no state).
    pub fn count_step(&mut self) {
        self.t += 1;
    }

    pub fn state_bytes(&self) -> i64 {
        [&self.m, &self.v].iter().filter_map(|t| t.as_ref()).map(|t| t.numel() as i64 * 4).sum()
    }

    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = Vec::new();
        if let Some(m) = &self.m {
            out.push(("m", m));
        }
        if let Some(v) = &self.v {
            out.push(("v", v));
        }
        out
    }

    pub fn step_count(&self) -> i32 {
        self.t
    }

    pub fn restore(&mut self, m: Option<Tensor>, v: Option<Tensor>, t: i32) {
        self.m = m;
        self.v = v;
        self.t = t;
    }
}

/// Returns θ' from θ (float32) and ĝ: `θ - η(u + λθ)` with `u` the rule's direction; the
/// decay term only where `decay` (matrices, not biases or norms).
pub fn apply(
    rule: Rule,
    slot: &mut Slot,
    theta: &Tensor,
    ghat: &Tensor,
    lr: f64,
    wd: f64,
    decay: bool,
) -> Tensor {
    debug_assert_eq!(theta.kind(), Kind::Float);
    slot.t += 1;
    let u = match rule {
        Rule::Sgd => ghat.shallow_clone(),
        Rule::Momentum { beta } => {
            let m = match &slot.m {
                Some(m) => (m * beta) + ghat,
                None => ghat.copy(),
            };
            slot.m = Some(m.shallow_clone());
            m
        }
        Rule::Adam { beta1, beta2, eps } => {
            let g2 = ghat * ghat;
            let m = match &slot.m {
                Some(m) => (m * beta1) + (ghat * (1.0 - beta1)),
                None => ghat * (1.0 - beta1),
            };
            let v = match &slot.v {
                Some(v) => (v * beta2) + (g2 * (1.0 - beta2)),
                None => g2 * (1.0 - beta2),
            };
            slot.m = Some(m.shallow_clone());
            slot.v = Some(v.shallow_clone());
            // Reciprocals multiplied, not scalars divided: see `Engine::apply_update`.
            let mhat = m * (1.0 / (1.0 - beta1.powi(slot.t)));
            let vhat = v * (1.0 / (1.0 - beta2.powi(slot.t)));
            mhat / (vhat.sqrt() + eps)
        }
    };
    let u = if decay && wd != 0.0 { u + (theta * wd) } else { u };
    theta - (u * lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(Schedule::Constant.lr(1.0, 5, 10), 1.0);
        assert!((Schedule::Linear.lr(1.0, 5, 10) - 0.5).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1.0, 5, 10) - 0.5).abs() < 1e-12);
        assert!(Schedule::Cosine.lr(1.0, 0, 10) == 1.0);
        assert!(Schedule::parse("exp").unwrap_err().to_string().contains("constant, linear or cosine"));
    }

    #[test]
    fn rules_follow_their_definitions() {
        let theta = Tensor::from_slice(&[1.0f32, -2.0]);
        let g = Tensor::from_slice(&[0.5f32, 0.25]);
        let mut s = Slot::default();
        let out = apply(Rule::Sgd, &mut s, &theta, &g, 0.1, 0.0, true);
        assert_eq!(Vec::<f32>::try_from(&out).unwrap(), vec![1.0 - 0.05, -2.0 - 0.025]);
        // Weight decay only where asked.
        let out = apply(Rule::Sgd, &mut Slot::default(), &theta, &g, 0.1, 0.5, false);
        assert_eq!(Vec::<f32>::try_from(&out).unwrap(), vec![0.95, -2.025]);
        let out = apply(Rule::Sgd, &mut Slot::default(), &theta, &g, 0.1, 0.5, true);
        let v = Vec::<f32>::try_from(&out).unwrap();
        assert!((v[0] - (1.0 - 0.1 * (0.5 + 0.5))).abs() < 1e-7);
        // Momentum accumulates.
        let mut s = Slot::default();
        let _ = apply(Rule::Momentum { beta: 0.9 }, &mut s, &theta, &g, 0.1, 0.0, true);
        let out = apply(Rule::Momentum { beta: 0.9 }, &mut s, &theta, &g, 0.1, 0.0, true);
        let v = Vec::<f32>::try_from(&out).unwrap();
        assert!((v[0] - (1.0 - 0.1 * 0.95)).abs() < 1e-6, "{v:?}");
        assert_eq!(s.state_bytes(), 8);
        // Adam's first step moves each coordinate by about lr.
        let mut s = Slot::default();
        let out =
            apply(Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, &mut s, &theta, &g, 0.1, 0.0, true);
        let v = Vec::<f32>::try_from(&out).unwrap();
        assert!((v[0] - 0.9).abs() < 1e-5 && (v[1] + 2.1).abs() < 1e-5, "{v:?}");
        assert_eq!(s.state_bytes(), 16);
    }
}
