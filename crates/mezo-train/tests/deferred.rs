//! The deferred full-parameter update (`Engine::set_deferred_update`): each step's update folded
//! into the next step's first perturbation leaves every weight with the bits of the engine that
//! applies it at the end of its own step, whatever comes between steps.

mod common;
use common::two_candidate_batch;
use mezo_core::Distribution;
use mezo_model::{Model, ModelConfig};
use mezo_train::engine::{projected_grads, FullState};
use mezo_train::optim::Rule;
use mezo_train::{Engine, Prepared, StepSettings, Trainable};
use tch::{Device, Kind, Tensor};

fn tiny_model(device: Device, kind: Kind, init: &[Tensor]) -> Model {
    let json = serde_json::json!({
        "model_type": "opt", "vocab_size": 96, "hidden_size": 16, "num_hidden_layers": 2,
        "ffn_dim": 32, "num_attention_heads": 2, "max_position_embeddings": 32,
    });
    let cfg = ModelConfig::from_json(&json.to_string(), std::path::Path::new("tiny")).unwrap();
    let mut m = Model::random(cfg, device, Kind::Float, 11).unwrap();
    let _g = tch::no_grad_guard();
    // The same starting weights in every run (`Model::random` draws from libtorch's global
    // generator, which other tests may draw from at the same time).
    for ((_, t), w) in m.named_parameters().into_iter().zip(init) {
        t.shallow_clone().copy_(w);
    }
    if kind != Kind::Float {
        for (_, t) in m.named_parameters() {
            let h = t.to_kind(kind);
            t.shallow_clone().set_data(&h);
        }
    }
    m.set_kind(kind);
    m
}

fn initial_weights() -> Vec<Tensor> {
    let json = serde_json::json!({
        "model_type": "opt", "vocab_size": 96, "hidden_size": 16, "num_hidden_layers": 2,
        "ffn_dim": 32, "num_attention_heads": 2, "max_position_embeddings": 32,
    });
    let cfg = ModelConfig::from_json(&json.to_string(), std::path::Path::new("tiny")).unwrap();
    let m = Model::random(cfg, Device::Cpu, Kind::Float, 11).unwrap();
    // Larger than HF's init, so the updates move the losses.
    m.named_parameters().into_iter().map(|(_, t)| if t.dim() == 2 { t * 10.0 } else { t.copy() }).collect()
}

fn batch(model: &Model, e0: i64) -> Prepared {
    two_candidate_batch(model, e0..e0 + 3, |e| (0..4 + e % 3).map(|i| (5 * i + 3 * e + 1) % 90 + 4).collect())
}

/// What one run did: every step's losses, and the weights at the end.
struct Run {
    losses: Vec<Vec<(f64, f64)>>,
    weights: Vec<Tensor>,
}

/// A sequence of steps with 1, 2 and 3 directions, a skipped step (a batch whose weight is 0:
/// non-finite losses), a flush between steps (what evaluation does), and a step split into
/// `direction_losses` + `apply_update` (what a worker does), then a final flush.
fn run(device: Device, kind: Kind, dist: Distribution, init: &[Tensor], deferred: bool) -> Run {
    let model = tiny_model(device, kind, init);
    let settings = StepSettings { eps: 1e-3, dist, rule: Rule::Sgd, weight_decay: 0.05 };
    let full = FullState::new(&model, &[]).unwrap();
    let mut engine = Engine::new(Trainable::Full(full), settings, device);
    engine.set_deferred_update(deferred);
    assert_eq!(engine.deferred_update(), deferred);
    let mut losses = Vec::new();
    let lr = 2e-3;
    let step = |engine: &mut Engine, seeds: &[u64], e0: i64, zero_weight: bool| {
        let mut p = batch(&model, e0);
        if zero_weight {
            p.weight = 0.0;
        }
        let (l, g) = engine.step(&model, std::slice::from_ref(&p), seeds, lr).unwrap();
        assert_eq!(g.is_none(), zero_weight, "step {seeds:?}: skipped or not");
        // Only a deferred engine keeps an update pending, and only after a step it applied.
        assert_eq!(engine.has_pending_update(), deferred && !zero_weight, "step {seeds:?}");
        l
    };
    losses.push(step(&mut engine, &[10], 0, false));
    losses.push(step(&mut engine, &[11, 12], 1, false));
    losses.push(step(&mut engine, &[13], 2, true));
    losses.push(step(&mut engine, &[14, 15, 16], 3, false));
    engine.flush(&model).unwrap();
    assert!(!engine.has_pending_update());
    losses.push(step(&mut engine, &[17], 4, false));
    losses.push(step(&mut engine, &[18], 5, false));
    // The worker's split step: direction_losses applies the pending update first.
    let p = batch(&model, 6);
    let l = engine.direction_losses(&model, std::slice::from_ref(&p), &[19, 20]).unwrap();
    assert!(!engine.has_pending_update());
    let g = projected_grads(&l, 1e-3).unwrap();
    engine.apply_update(Some(&model), &[19, 20], &g, lr).unwrap();
    losses.push(l);
    losses.push(step(&mut engine, &[21, 22], 7, false));
    // apply_update applies the pending one before its own.
    engine.apply_update(Some(&model), &[23], &[0.5], lr).unwrap();
    assert!(!engine.has_pending_update());
    losses.push(step(&mut engine, &[24], 8, false));
    engine.flush(&model).unwrap();
    let weights = model.named_parameters().into_iter().map(|(_, t)| t.to_device(Device::Cpu)).collect();
    Run { losses, weights }
}

/// Both runs on `device` give the same losses and weights, and the weights moved.
fn compare(device: Device, kind: Kind, dist: Distribution, init: &[Tensor]) {
    let (a, b) = (run(device, kind, dist, init, true), run(device, kind, dist, init, false));
    assert_eq!(a.losses, b.losses, "{device:?} {kind:?} {dist}: the losses differ");
    assert_eq!(a.weights.len(), b.weights.len());
    for (j, (x, y)) in a.weights.iter().zip(&b.weights).enumerate() {
        assert_eq!(x.kind(), kind);
        assert!(
            x.equal(y),
            "{device:?} {kind:?} {dist}: weight {j} differs between deferred and immediate updates"
        );
    }
    let start = tiny_model(Device::Cpu, kind, init);
    let moved = start.named_parameters().iter().zip(&a.weights).filter(|((_, s), w)| !s.equal(w)).count();
    assert!(moved > a.weights.len() / 2, "{device:?} {kind:?} {dist}: only {moved} weights changed");
}

#[test]
fn deferred_steps_equal_immediate_steps_bit_for_bit() {
    let init = initial_weights();
    // Every dtype; both distributions (the kernels' own tests cover every pairing).
    for (kind, dist) in [
        (Kind::Float, Distribution::Gaussian),
        (Kind::Half, Distribution::Rademacher),
        (Kind::BFloat16, Distribution::Gaussian),
    ] {
        compare(Device::Cpu, kind, dist, &init);
    }
}

/// The same on a GPU: the fused CUDA sweep (update, then the next perturbation) in a training
/// run, against separate sweeps on the same GPU.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_deferred_steps_equal_immediate_steps_bit_for_bit() {
    let init = initial_weights();
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            compare(Device::Cuda(0), kind, dist, &init);
        }
    }
}

/// A pending update belongs to the model it was computed on: flushing it into another model's
/// weights is refused (and it stays pending); updates without the model are refused too.
#[test]
fn a_pending_update_needs_its_own_model() {
    let init = initial_weights();
    let model = tiny_model(Device::Cpu, Kind::Float, &init);
    let other = tiny_model(Device::Cpu, Kind::Float, &init);
    let settings =
        StepSettings { eps: 1e-3, dist: Distribution::Gaussian, rule: Rule::Sgd, weight_decay: 0.0 };
    let mut engine =
        Engine::new(Trainable::Full(FullState::new(&model, &[]).unwrap()), settings, Device::Cpu);
    engine.set_deferred_update(true);
    let p = batch(&model, 0);
    engine.step(&model, std::slice::from_ref(&p), &[1], 1e-3).unwrap();
    let before: Vec<Tensor> = other.named_parameters().into_iter().map(|(_, t)| t.copy()).collect();
    let e = engine.flush(&other).unwrap_err();
    assert!(e.to_string().contains("another model"), "{e}");
    let e = engine.apply_update(None, &[2], &[1.0], 1e-3).unwrap_err();
    assert!(e.to_string().contains("pending"), "{e}");
    assert!(engine.has_pending_update());
    for ((_, t), b) in other.named_parameters().iter().zip(&before) {
        assert!(t.equal(b), "a refused flush wrote to the other model");
    }
    engine.flush(&model).unwrap();
    assert!(!engine.has_pending_update());
    // Flushing with nothing pending is a no-op.
    engine.flush(&other).unwrap();
}

/// Settings changed between steps (here the distribution): the pending update keeps the ones its
/// step ran under, and the next perturbation takes the new ones, as with immediate updates.
#[test]
fn a_pending_update_keeps_its_step_settings() {
    let init = initial_weights();
    let weights = |deferred: bool| {
        let model = tiny_model(Device::Cpu, Kind::Float, &init);
        let settings =
            StepSettings { eps: 1e-3, dist: Distribution::Gaussian, rule: Rule::Sgd, weight_decay: 0.1 };
        let mut engine =
            Engine::new(Trainable::Full(FullState::new(&model, &[]).unwrap()), settings, Device::Cpu);
        engine.set_deferred_update(deferred);
        let p = batch(&model, 0);
        engine.step(&model, std::slice::from_ref(&p), &[1], 1e-3).unwrap();
        engine.settings.dist = Distribution::Rademacher;
        engine.settings.weight_decay = 0.0;
        engine.step(&model, std::slice::from_ref(&p), &[2], 1e-3).unwrap();
        engine.flush(&model).unwrap();
        model.named_parameters().into_iter().map(|(_, t)| t.copy()).collect::<Vec<_>>()
    };
    let (a, b) = (weights(true), weights(false));
    for (j, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x.equal(y), "weight {j} differs");
    }
}
