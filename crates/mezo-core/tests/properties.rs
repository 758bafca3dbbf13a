//! Property tests of the core math (issue #7, item 3): for any seed, parameter name, length,
//! dtype and gradients, Z on tensors is the host definition bit for bit, and the fused CPU
//! kernels equal the reference tensor ops and each other.

use mezo_core::fused::{perturb_, sgd_update_, sgd_update_segments_, Segment, SgdUpdate};
use mezo_core::{z_host, z_tensor, Distribution, GaussTable, StreamKey};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

fn dist() -> impl Strategy<Value = Distribution> {
    prop_oneof![Just(Distribution::Gaussian), Just(Distribution::Rademacher)]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Float), Just(Kind::Half), Just(Kind::BFloat16)]
}

/// Projected gradients as the estimator makes them: finite, of any sign and a wide range.
fn grad() -> impl Strategy<Value = f32> {
    (-1e3f32..1e3f32).prop_map(|g| if g.abs() < 1e-6 { 0.0 } else { g })
}

thread_local! {
    static TABLE: &'static GaussTable = Box::leak(Box::new(GaussTable::new(Device::Cpu)));
}

fn table() -> &'static GaussTable {
    TABLE.with(|t| *t)
}

fn values(n: i64, seed: i64, kind: Kind) -> Tensor {
    tch::manual_seed(seed);
    (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.05).to_kind(kind)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Z on tensors equals the host definition at every index, for any seed and name; Gaussian
    /// values are finite and inside the table's range, Rademacher values are ±1.
    #[test]
    fn z_tensor_is_the_host_definition(seed: u64, name in ".{0,40}", n in 1i64..3000, dist in dist()) {
        let z: Vec<f32> = Vec::try_from(&z_tensor(seed, &name, n, dist, table(), Device::Cpu).unwrap()).unwrap();
        for (i, v) in z.iter().enumerate() {
            let host = z_host(seed, &name, i as u32, dist);
            prop_assert_eq!(v.to_bits(), host.to_bits(), "index {}", i);
            match dist {
                Distribution::Gaussian => prop_assert!(v.is_finite() && v.abs() < 6.0, "{}", v),
                Distribution::Rademacher => prop_assert!(*v == 1.0 || *v == -1.0),
            }
        }
    }

    /// The fused perturbation and SGD update equal the reference tensor ops bit for bit, for any
    /// length (vector body and scalar tail), dtype, direction count, rate and weight decay.
    #[test]
    fn fused_kernels_equal_reference_ops(
        n in 1i64..5000, kind in kind(), dist in dist(), seed: u64, init in 0i64..1000,
        scale in -1e-1f32..1e-1, grads in prop::collection::vec(grad(), 1..5),
        lr in 1e-7f32..1e-1, wd in prop::option::of(0.0f32..0.1),
    ) {
        let name = "model.decoder.layers.3.fc2.weight";
        let base = values(n, init, kind);
        let fused = base.copy();
        perturb_(&fused, StreamKey::new(seed, name), scale, dist, table()).unwrap();
        let z = z_tensor(seed, name, n, dist, table(), Device::Cpu).unwrap();
        let reference = (base.to_kind(Kind::Float) + z * scale as f64).to_kind(kind);
        prop_assert!(fused.equal(&reference), "perturb differs");

        let seeds: Vec<u64> = (0..grads.len() as u64).map(|i| seed.wrapping_add(i * 7919)).collect();
        let u = SgdUpdate {
            keys: seeds.iter().map(|&s| StreamKey::new(s, name)).collect(),
            grads: grads.clone(),
            lr,
            weight_decay: wd,
            restore: None,
        };
        let fused = base.copy();
        sgd_update_(&fused, &u, dist, table()).unwrap();
        let theta = base.to_kind(Kind::Float);
        let mut acc = z_tensor(seeds[0], name, n, dist, table(), Device::Cpu).unwrap() * grads[0] as f64;
        for (s, g) in seeds.iter().zip(&grads).skip(1) {
            acc = acc + z_tensor(*s, name, n, dist, table(), Device::Cpu).unwrap() * *g as f64;
        }
        if grads.len() > 1 {
            acc = acc * (1.0f64 / grads.len() as f64) as f32 as f64;
        }
        if let Some(wd) = wd {
            acc = acc + &theta * wd as f64;
        }
        let reference = (&theta - acc * lr as f64).to_kind(kind);
        prop_assert!(fused.equal(&reference), "update differs");
    }

    /// The one-pass update over a LoRA state (matrices laid end to end, each with its own key)
    /// equals updating each matrix on its own.
    #[test]
    fn segment_update_equals_per_matrix_updates(
        lens in prop::collection::vec(1usize..700, 1..6), seed: u64, dist in dist(),
        grads in prop::collection::vec(grad(), 1..4), lr in 1e-7f32..1e-1, wd in prop::option::of(0.0f32..0.1),
    ) {
        let total: usize = lens.iter().sum();
        let flat = values(total as i64, seed as i64 & 0xFFFF, Kind::Float);
        let before = flat.copy();
        let seeds: Vec<u64> = (0..grads.len() as u64).map(|i| seed ^ (i + 1).wrapping_mul(0x9E37_79B9)).collect();
        let mut offset = 0;
        let segs: Vec<Segment> = lens.iter().enumerate().map(|(m, &len)| {
            let name = format!("base_model.model.layers.{m}.lora_A.weight");
            let s = Segment { offset, len, keys: seeds.iter().map(|&s| StreamKey::new(s, &name)).collect() };
            offset += len;
            s
        }).collect();
        sgd_update_segments_(&flat, &segs, &grads, lr, wd, dist).unwrap();
        for s in &segs {
            let part = before.narrow(0, s.offset as i64, s.len as i64).copy();
            let u = SgdUpdate { keys: s.keys.clone(), grads: grads.clone(), lr, weight_decay: wd, restore: None };
            sgd_update_(&part, &u, dist, table()).unwrap();
            prop_assert!(part.equal(&flat.narrow(0, s.offset as i64, s.len as i64)), "segment at {} differs", s.offset);
        }
    }
}
