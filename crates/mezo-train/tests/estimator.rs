//! The estimator is right: averaged over many directions, MeZO's projected-gradient estimate
//! points along the true gradient (E[z zᵀ] = I), here measured against libtorch autograd.

mod common;
use common::two_candidate_batch;
use mezo_core::Distribution;
use mezo_model::{LoraConfig, Model, ModelConfig, Target};
use mezo_train::engine::LoraState;
use mezo_train::optim::Rule;
use mezo_train::{Engine, Prepared, StepSettings, Trainable};
use tch::{Device, Kind, Tensor};

fn tiny_model() -> Model {
    let json = serde_json::json!({
        "model_type": "opt", "vocab_size": 96, "hidden_size": 16, "num_hidden_layers": 2,
        "ffn_dim": 32, "num_attention_heads": 2, "max_position_embeddings": 32,
    });
    let cfg = ModelConfig::from_json(&json.to_string(), std::path::Path::new("tiny")).unwrap();
    let mut m = Model::random(cfg, Device::Cpu, Kind::Float, 11).unwrap();
    // Larger weights than HF's init, so the loss has a gradient worth measuring.
    let _g = tch::no_grad_guard();
    for (_, t) in m.named_parameters() {
        if t.dim() == 2 {
            let _ = t.shallow_clone().g_mul_scalar_(10.0);
        }
    }
    m.set_kind(Kind::Float);
    m
}

fn batch(model: &Model) -> Prepared {
    two_candidate_batch(model, 0..4, |e| (0..5 + e).map(|i| (7 * i + 3 * e + 1) % 90 + 4).collect())
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    (a.dot(b) / (a.norm() * b.norm())).double_value(&[])
}

#[test]
fn averaged_spsa_estimates_align_with_autograd() {
    let model = tiny_model();
    let prepared = batch(&model);
    let cfg = LoraConfig { r: 2, alpha: 4.0, targets: vec![Target::Q, Target::V] };
    let mut state = LoraState::init(cfg.clone(), &model.config(), model.device(), 5).unwrap();
    // B = 0 at PEFT's init makes A's gradient vanish; start from a point with both non-zero.
    state.state.flat = Tensor::randn([state.state.flat.numel() as i64], (Kind::Float, Device::Cpu)) * 0.3;
    let theta = state.state.flat.copy();
    let p = theta.numel() as f64;

    // The true gradient, by backprop.
    let leaf = theta.detach().set_requires_grad(true);
    let lb = mezo_model::LoraBatch::from_flat(&leaf.unsqueeze(0), &cfg, &state.tensors, Kind::Float).unwrap();
    let loss = prepared.loss_sums(&model, Some(&mezo_model::Tuning::Lora(lb))).unwrap().sum(Kind::Float)
        / prepared.weight;
    loss.backward();
    let grad = leaf.grad().detach();
    assert!(grad.norm().double_value(&[]) > 1e-3, "degenerate test point");

    // MeZO: many directions, each g_i = (L+ - L-) / 2ε. With lr = 1 and plain SGD the update is
    // exactly θ - mean_i(g_i z_i), so the estimate is read off the parameter change.
    let eps = 1e-3;
    let settings = StepSettings { eps, dist: Distribution::Gaussian, rule: Rule::Sgd, weight_decay: 0.0 };
    let mut engine = Engine::new(Trainable::Lora(state), settings, Device::Cpu);
    let (chunks, per) = (12u64, 500u64);
    let mut sum = Tensor::zeros_like(&theta);
    for c in 0..chunks {
        let seeds: Vec<u64> = (0..per).map(|i| 1_000 + c * per + i).collect();
        let losses = engine.direction_losses(&model, std::slice::from_ref(&prepared), &seeds).unwrap();
        let grads = mezo_train::engine::projected_grads(&losses, eps).unwrap();
        if let Trainable::Lora(l) = &mut engine.trainable {
            l.state.flat = theta.copy();
        }
        engine.apply_update(Some(&model), &seeds, &grads, 1.0).unwrap();
        let Trainable::Lora(l) = &engine.trainable else { unreachable!() };
        sum += (&theta - &l.state.flat) * per as f64;
        if let Trainable::Lora(l) = &mut engine.trainable {
            l.state.flat = theta.copy();
        }
    }
    let n = (chunks * per) as f64;
    let estimate = sum / n;
    let cos = cosine(&estimate, &grad);
    // With Gaussian z the estimate's cosine with the gradient is about sqrt(N / (N + P)).
    let expected = (n / (n + p)).sqrt();
    eprintln!("P = {p}, N = {n}: cosine {cos:.4} (ideal {expected:.4})");
    assert!(cos >= 0.9, "cosine {cos} < 0.9");
    // And the scale is right too (the estimator is unbiased, not just aligned).
    let ratio = (estimate.norm() / grad.norm()).double_value(&[]);
    assert!((0.9..1.25).contains(&ratio), "norm ratio {ratio}");
}

/// `Engine::step` (full-parameter: the last restore folded into the update sweep) leaves the
/// weights bit-identical to `direction_losses` followed by `apply_update`, in fp32 and in fp16.
#[test]
fn fused_step_equals_losses_then_update() {
    // Both runs start from the same weights, copied: `Model::random` draws from libtorch's global
    // generator, which the other test of this file may draw from at the same time.
    let init: Vec<Tensor> = tiny_model().named_parameters().into_iter().map(|(_, t)| t.copy()).collect();
    for kind in [Kind::Float, Kind::Half] {
        let run = |fused: bool| -> Vec<Tensor> {
            let mut model = tiny_model();
            {
                let _g = tch::no_grad_guard();
                for ((_, t), w) in model.named_parameters().into_iter().zip(&init) {
                    t.shallow_clone().copy_(w);
                }
            }
            if kind != Kind::Float {
                let _g = tch::no_grad_guard();
                for (_, t) in model.named_parameters() {
                    let h = t.to_kind(kind);
                    t.shallow_clone().set_data(&h);
                }
                model.set_kind(kind);
            }
            let prepared = batch(&model);
            let settings =
                StepSettings { eps: 1e-3, dist: Distribution::Gaussian, rule: Rule::Sgd, weight_decay: 0.01 };
            let full = mezo_train::engine::FullState::new(&model, &[]).unwrap();
            let mut engine = Engine::new(Trainable::Full(full), settings, Device::Cpu);
            let mut losses = Vec::new();
            for t in 0..3u64 {
                let seeds = [100 + 2 * t, 101 + 2 * t];
                if fused {
                    let (l, g) = engine.step(&model, std::slice::from_ref(&prepared), &seeds, 1e-3).unwrap();
                    assert!(g.is_some());
                    losses.push(l);
                } else {
                    let l = engine.direction_losses(&model, std::slice::from_ref(&prepared), &seeds).unwrap();
                    let g = mezo_train::engine::projected_grads(&l, 1e-3).unwrap();
                    engine.apply_update(Some(&model), &seeds, &g, 1e-3).unwrap();
                    losses.push(l);
                }
            }
            let mut out: Vec<Tensor> = model.named_parameters().into_iter().map(|(_, t)| t.copy()).collect();
            out.push(Tensor::from_slice(
                &losses.concat().iter().flat_map(|(a, b)| [*a, *b]).collect::<Vec<_>>(),
            ));
            out
        };
        let (a, b) = (run(true), run(false));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(x.equal(y), "{kind:?}: the fused step differs from losses + update");
        }
    }
}
