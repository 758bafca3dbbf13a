//! Replay properties (issue #7, item 3): whatever the logged updates (seeds, gradients of any
//! sign, rates, skipped steps), the LoRA state a worker or a restarted coordinator rebuilds is
//! the live state bit for bit: replaying the log from the start, restoring a snapshot at any step
//! and replaying the rest, and reading the records back through the store's encoding all agree.

use mezo_core::Distribution;
use mezo_model::{LoraConfig, ModelConfig, Target};
use mezo_store::StepRecord;
use mezo_train::engine::LoraState;
use mezo_train::optim::Rule;
use mezo_train::trainer::{flat_state_bytes, flat_values_from_bytes};
use mezo_train::{Engine, StepSettings, Trainable};
use proptest::prelude::*;
use tch::{Device, Tensor};

fn config() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "opt", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
        "ffn_dim": 32, "num_attention_heads": 2, "max_position_embeddings": 32,
    });
    ModelConfig::from_json(&json.to_string(), std::path::Path::new("tiny")).unwrap()
}

fn lora() -> LoraConfig {
    LoraConfig { r: 4, alpha: 8.0, targets: vec![Target::Q, Target::V] }
}

fn engine(state: LoraState, dist: Distribution, wd: f64) -> Engine {
    let settings = StepSettings { eps: 1e-3, dist, rule: Rule::Sgd, weight_decay: wd };
    Engine::new(Trainable::Lora(state), settings, Device::Cpu)
}

fn replay(e: &mut Engine, records: &[StepRecord]) {
    for r in records.iter().filter(|r| !r.skipped) {
        e.apply_update(None, &r.seeds, &r.grads, r.lr).unwrap();
    }
}

fn record() -> impl Strategy<Value = StepRecord> {
    (
        prop::collection::vec(any::<u64>(), 1..4),
        1e-6f64..1e-2,
        any::<bool>(),
        prop::collection::vec(-50.0f64..50.0, 4),
    )
        .prop_map(|(seeds, lr, skip, g)| {
            let n = seeds.len();
            StepRecord {
                step: 0,
                grads: g[..n].to_vec(),
                losses: g[..n].iter().map(|x| (0.7 + x * 1e-3, 0.7 - x * 1e-3)).collect(),
                seeds,
                lr,
                // A skipped step (non-finite losses) is logged and changes nothing.
                skipped: skip && n == 1,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn snapshot_and_log_replay_rebuild_the_live_state(
        init_seed: u64, dist in prop_oneof![Just(Distribution::Gaussian), Just(Distribution::Rademacher)],
        wd in prop_oneof![Just(0.0), 0.0f64..0.1],
        mut records in prop::collection::vec(record(), 1..12), cut in 0usize..12,
    ) {
        for (t, r) in records.iter_mut().enumerate() {
            r.step = t as u64;
        }
        let cut = cut.min(records.len());
        let fresh = || LoraState::init(lora(), &config(), Device::Cpu, init_seed).unwrap();

        // The live run: updates applied as they happen, a snapshot taken at `cut`.
        let mut live = engine(fresh(), dist, wd);
        replay(&mut live, &records[..cut]);
        let snapshot = flat_state_bytes(&live.trainable);
        replay(&mut live, &records[cut..]);
        let expected = flat_state_bytes(&live.trainable);

        // A replica built from scratch by replaying the whole log, read back from the store's
        // encoding.
        let decoded: Vec<StepRecord> =
            records.iter().map(|r| StepRecord::decode(&r.encode()).unwrap()).collect();
        prop_assert_eq!(&decoded, &records);
        let mut from_log = engine(fresh(), dist, wd);
        replay(&mut from_log, &decoded);
        prop_assert_eq!(flat_state_bytes(&from_log.trainable), expected.clone());

        // A replica restored from the snapshot, then the log after it.
        let base = fresh();
        let values = flat_values_from_bytes(&snapshot, base.state.flat.numel()).unwrap();
        let restored =
            LoraState::from_flat(base.config.clone(), base.tensors.clone(), Tensor::from_slice(&values), Device::Cpu)
                .unwrap();
        let mut from_snapshot = engine(restored, dist, wd);
        replay(&mut from_snapshot, &decoded[cut..]);
        prop_assert_eq!(flat_state_bytes(&from_snapshot.trainable), expected);
    }
}
