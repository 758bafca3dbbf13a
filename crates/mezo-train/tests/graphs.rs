//! CUDA graphs change nothing but speed: a run whose forwards replay captured graphs gives the
//! same losses and the same trained state, bit for bit, as the same run with every forward eager.
//! Needs a GPU: `cargo test -p mezo-train --test graphs -- --ignored`.

mod common;
use common::two_candidate_batch;
use mezo_core::Distribution;
use mezo_model::{LoraConfig, Model, ModelConfig, Target};
use mezo_train::engine::{FullState, LoraState};
use mezo_train::optim::Rule;
use mezo_train::{Engine, Prepared, StepSettings, Trainable};
use tch::{Device, Kind};

/// One test on the GPU at a time. A process trains from one thread (a worker's engine thread,
/// `mezo train`'s main thread); a capture in one test thread while another test thread launched
/// eager work on the same GPU gave graphed losses that differ from the eager ones (seen on an
/// H200 when the second test here was added), so these tests take turns.
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(device: Device, kind: Kind) -> Model {
    let json = serde_json::json!({
        "model_type": "opt", "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 3,
        "ffn_dim": 128, "num_attention_heads": 4, "max_position_embeddings": 64,
    });
    let cfg = ModelConfig::from_json(&json.to_string(), std::path::Path::new("tiny")).unwrap();
    Model::random(cfg, device, kind, 11).unwrap()
}

/// Four examples with two candidates each; `shift` changes the prompt lengths (another shape).
fn batch(model: &Model, shift: i64) -> Prepared {
    tokens_batch(model, shift, 7)
}

/// As [`batch`], with the tokens drawn by another stride: the same shape, other contents.
fn tokens_batch(model: &Model, shift: i64, stride: i64) -> Prepared {
    two_candidate_batch(model, 0..4, |e| {
        (0..5 + e + shift).map(|i| (stride * i + 3 * e + shift + 1) % 90 + 4).collect()
    })
}

fn engine(mode: &str, model: &Model, graphs: bool) -> Engine {
    let trainable = match mode {
        "lora" => {
            let cfg = LoraConfig { r: 4, alpha: 8.0, targets: vec![Target::Q, Target::V] };
            Trainable::Lora(LoraState::init(cfg, &model.config(), model.device(), 5).unwrap())
        }
        _ => Trainable::Full(FullState::new(model, &[]).unwrap()),
    };
    let settings =
        StepSettings { eps: 1e-2, dist: Distribution::Gaussian, rule: Rule::Sgd, weight_decay: 0.0 };
    let mut e = Engine::new(trainable, settings, model.device());
    e.set_cuda_graphs(graphs);
    e
}

fn bits(t: &tch::Tensor) -> Vec<u16> {
    let f = t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1);
    let v: Vec<f32> = Vec::try_from(&f).unwrap();
    // The upper and lower halves of every f32, so any difference shows.
    v.iter().flat_map(|x| [(x.to_bits() >> 16) as u16, x.to_bits() as u16]).collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graphed_steps_equal_eager_steps() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    if !tch::Cuda::is_available() {
        panic!("this test needs a CUDA GPU");
    }
    let dev = Device::Cuda(0);
    for mode in ["lora", "full"] {
        for kind in [Kind::Float, Kind::Half] {
            let (m_eager, m_graph) = (model(dev, kind), model(dev, kind));
            let mut eager = engine(mode, &m_eager, false);
            let mut graphed = engine(mode, &m_graph, true);
            assert!(graphed.cuda_graphs(), "this build has no CUDA graphs");
            assert!(!eager.cuda_graphs());
            // Batches a and c share a shape (one graph), b has another. A batch replayed again on
            // its graph skips the input copy; a and c alternating must refill it.
            let shapes = [0, 0, 3, 0, 3, 3, 0, 3, 0, 0, 9, 0, 9, 9, 0, 3, 9];
            let (a_eager, b_eager, c_eager) =
                (batch(&m_eager, 0), batch(&m_eager, 3), tokens_batch(&m_eager, 0, 11));
            let (a_graph, b_graph, c_graph) =
                (batch(&m_graph, 0), batch(&m_graph, 3), tokens_batch(&m_graph, 0, 11));
            for (t, &which) in shapes.iter().enumerate() {
                let seeds: Vec<u64> = (0..2).map(|i| mezo_core::direction_seed(9, t as u64, i)).collect();
                let (pe, pg) = match which {
                    0 => (&a_eager, &a_graph),
                    3 => (&b_eager, &b_graph),
                    _ => (&c_eager, &c_graph),
                };
                let (le, ge) = eager.step(&m_eager, std::slice::from_ref(pe), &seeds, 1e-3).unwrap();
                let (lg, gg) = graphed.step(&m_graph, std::slice::from_ref(pg), &seeds, 1e-3).unwrap();
                assert_eq!(le, lg, "{mode} {kind:?}: losses of step {t}");
                assert_eq!(ge, gg, "{mode} {kind:?}: projected gradients of step {t}");
            }
            match (&eager.trainable, &graphed.trainable) {
                (Trainable::Lora(a), Trainable::Lora(b)) => {
                    assert_eq!(bits(&a.state.flat), bits(&b.state.flat), "{mode} {kind:?}: LoRA state");
                }
                _ => {
                    let (pa, pb) = (m_eager.named_parameters(), m_graph.named_parameters());
                    for ((name, a), (_, b)) in pa.iter().zip(&pb) {
                        assert_eq!(bits(a), bits(b), "{mode} {kind:?}: weight {name}");
                    }
                }
            }
            eprintln!("{mode} {kind:?}: {} graphed steps equal the eager ones", shapes.len());
        }
    }
}

/// On CUDA a batch is padded to a bucketed width so that batches of nearby lengths share one
/// graph: the padding is masked, so the losses are those of the unpadded batch within rounding.
#[test]
#[ignore = "needs a CUDA GPU"]
fn bucketed_widths_share_a_shape_and_keep_the_losses() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    if !tch::Cuda::is_available() {
        panic!("this test needs a CUDA GPU");
    }
    let dev = Device::Cuda(0);
    let m = model(dev, Kind::Float);
    let (mut a, mut b) = (batch(&m, 0), batch(&m, 3));
    let seeds: Vec<u64> = (0..2).map(|i| mezo_core::direction_seed(4, 0, i)).collect();
    let (plain, _) = engine("lora", &m, false).step(&m, std::slice::from_ref(&a), &seeds, 0.0).unwrap();
    // Two widths of one bucket (9 and 12 tokens: each example's candidates share a row that
    // ends before its answer token).
    let (wa, wb) = (a.width().unwrap(), b.width().unwrap());
    assert!(wa != wb && wa > 8 && wb < 16, "widths {wa} and {wb}");
    a.pad_to_bucket(64, m.pad_token_id());
    b.pad_to_bucket(64, m.pad_token_id());
    assert_eq!((a.width(), b.width()), (Some(16), Some(16)), "one bucket: one graph for both");
    let (padded, _) = engine("lora", &m, false).step(&m, std::slice::from_ref(&a), &seeds, 0.0).unwrap();
    for (p, q) in plain.iter().zip(&padded) {
        for (x, y) in [(p.0, q.0), (p.1, q.1)] {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "loss {x} unpadded, {y} padded");
        }
    }
}
