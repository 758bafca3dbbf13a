//! Z on tensors: the same definition as [`crate::rng`], computed by tch ops on any device, bit
//! for bit equal to the host reference.
//!
//! u32 values live in int64 tensors (torch has no uint32 arithmetic on every device). Each
//! multiply by a mixer constant C < 2^31 of a value < 2^32 stays < 2^63, so int64 never overflows
//! (signed overflow is undefined behaviour in the C++/CUDA kernels, so it must not happen), and
//! `& 0xFFFF_FFFF` afterwards gives the wrapping u32 product exactly. Right shifts of non-negative int64 are
//! logical shifts. Integer ops are exact on every device, so the bits match everywhere.
//!
//! Floats: every f32 op used is exact or a single correctly rounded IEEE op, each its own kernel,
//! so no device can fuse or reassociate them.

use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::rng::{
    host_gauss_table, Distribution, StreamKey, MIX_C1, MIX_C2, MIX_S, TWO_POW_M16, TWO_POW_M24,
};

const MASK32: i64 = 0xFFFF_FFFF;

/// The Gaussian inverse-CDF table ([`crate::rng::HostGaussTable`]) as two f32 tensors
/// `[65537]` on one device. Make one per device and reuse it.
#[derive(Debug)]
pub struct GaussTable {
    pub t: Tensor,
    pub d: Tensor,
}

impl GaussTable {
    pub fn new(device: Device) -> Self {
        let host = host_gauss_table();
        GaussTable {
            t: Tensor::from_slice(&host.t).to_device(device),
            d: Tensor::from_slice(&host.d).to_device(device),
        }
    }

    pub fn device(&self) -> Device {
        self.t.device()
    }
}

/// [`crate::rng::mix32`] on an int64 tensor of u32 values, in place.
fn mix32_(x: &mut Tensor) {
    for (shift, mul) in [(MIX_S[0], Some(MIX_C1)), (MIX_S[1], Some(MIX_C2)), (MIX_S[2], None)] {
        let s = x.bitwise_right_shift_tensor_scalar(i64::from(shift));
        let _ = x.bitwise_xor_tensor_(&s);
        if let Some(c) = mul {
            let _ = x.g_mul_scalar_(i64::from(c));
            let _ = x.bitwise_and_(MASK32);
        }
    }
}

/// Element bits for a batch: `idx` int64 (values < 2^32), `a` and `b` int64 tensors broadcastable
/// against idx (u32 values, e.g. 0-dim tensors of one [`StreamKey`], or one key per element to
/// draw for several parameters in one pass). Returns int64 `mix32(mix32(idx ^ b) ^ a)`.
pub fn bits_tensor(idx: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
    let mut x = idx.bitwise_xor_tensor(b);
    mix32_(&mut x);
    let mut x = x.bitwise_xor_tensor(a); // out of place: `a` may broadcast x to a larger shape
    mix32_(&mut x);
    x
}

/// Uniform in [0, 1), f32: `(bits >> 8) * 2^-24` (conversion of a value < 2^24 and a power-of-two
/// multiply, both exact).
pub fn uniform_from_bits(bits: &Tensor) -> Tensor {
    bits.bitwise_right_shift_tensor_scalar(8).to_kind(Kind::Float) * f64::from(TWO_POW_M24)
}

/// +-1, f32, from the top bit: `1 - 2 * (bits >> 31)` (exact).
pub fn rademacher_from_bits(bits: &Tensor) -> Tensor {
    let top = bits.bitwise_right_shift_tensor_scalar(31).to_kind(Kind::Float);
    top * -2.0 + 1.0
}

/// Gaussian, f32: `T[hi] + D[hi] * (lo * 2^-16)` on `table`'s device (which must be `bits`'):
/// two gathers, then the exact scaling, one multiply and one add as separate ops (never `addcmul`,
/// which may fuse into an FMA and round once instead of twice).
pub fn gaussian_from_bits(bits: &Tensor, table: &GaussTable) -> Tensor {
    let shape = bits.size();
    let flat = bits.reshape([-1]);
    let hi = flat.bitwise_right_shift_tensor_scalar(16);
    let frac = flat.bitwise_and(0xFFFF).to_kind(Kind::Float) * f64::from(TWO_POW_M16);
    let step = table.d.index_select(0, &hi) * frac;
    (table.t.index_select(0, &hi) + step).reshape(shape)
}

/// Z of the given distribution from element bits, f32.
pub fn z_from_bits(bits: &Tensor, dist: Distribution, table: &GaussTable) -> Tensor {
    match dist {
        Distribution::Gaussian => gaussian_from_bits(bits, table),
        Distribution::Rademacher => rademacher_from_bits(bits),
    }
}

/// Convenience: Z of one parameter tensor of `numel` elements (flat index order), f32 `[numel]`,
/// on `device` (`table` must live there too for Gaussian). Errors if an element index would not
/// fit u32.
pub fn z_tensor(
    seed: u64,
    name: &str,
    numel: i64,
    dist: Distribution,
    table: &GaussTable,
    device: Device,
) -> Result<Tensor> {
    if !(0..=1 << 32).contains(&numel) {
        return Err(CoreError::TooManyElements { name: name.into(), numel });
    }
    let key = StreamKey::new(seed, name);
    let a = Tensor::scalar_tensor(i64::from(key.a), (Kind::Int64, device));
    let b = Tensor::scalar_tensor(i64::from(key.b), (Kind::Int64, device));
    let idx = Tensor::arange(numel, (Kind::Int64, device));
    Ok(z_from_bits(&bits_tensor(&idx, &a, &b), dist, table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normal::normal_cdf;
    use crate::rng::{uniform_host, z_host};

    const SEEDS: [u64; 6] = [0, 1, u64::MAX, 0xDEAD_BEEF_CAFE_BABE, 1 << 63, 12_345_678_901_234_567_890];
    const NAMES: [&str; 4] =
        ["", "model.decoder.layers.0.self_attn.q_proj.weight", "lm_head.weight", "ünïcödé"];

    fn to_bits(t: &Tensor) -> Vec<u32> {
        Vec::<f32>::try_from(&t.to_device(Device::Cpu).reshape([-1]))
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// The three variates of one stream at `idx` (int64 CPU tensor), as tensors.
    fn tensor_variates(seed: u64, name: &str, idx: &Tensor, table: &GaussTable) -> [Vec<u32>; 3] {
        let key = StreamKey::new(seed, name);
        let dev = idx.device();
        let a = Tensor::scalar_tensor(i64::from(key.a), (Kind::Int64, dev));
        let b = Tensor::scalar_tensor(i64::from(key.b), (Kind::Int64, dev));
        let bits = bits_tensor(idx, &a, &b);
        [
            to_bits(&uniform_from_bits(&bits)),
            to_bits(&z_from_bits(&bits, Distribution::Rademacher, table)),
            to_bits(&z_from_bits(&bits, Distribution::Gaussian, table)),
        ]
    }

    #[test]
    fn tensor_bits_equal_host_bits_on_cpu() {
        let table = GaussTable::new(Device::Cpu);
        let mut indices: Vec<u32> = (0..100_000).collect();
        indices.extend((u32::MAX - 2_000)..=u32::MAX);
        indices.extend([1 << 31, (1 << 31) - 1, 1 << 16, (1 << 24) + 3]);
        let idx = Tensor::from_slice(&indices.iter().map(|&i| i64::from(i)).collect::<Vec<_>>());
        for seed in SEEDS {
            for name in NAMES {
                let key = StreamKey::new(seed, name);
                let [u, r, g] = tensor_variates(seed, name, &idx, &table);
                for (k, &i) in indices.iter().enumerate() {
                    let what = format!("seed {seed} name {name:?} i {i}");
                    assert_eq!(u[k], uniform_host(seed, name, i).to_bits(), "uniform {what}");
                    let rh = z_host(seed, name, i, Distribution::Rademacher);
                    assert_eq!(r[k], rh.to_bits(), "rademacher {what}");
                    let gh = z_host(seed, name, i, Distribution::Gaussian);
                    assert_eq!(g[k], gh.to_bits(), "gaussian {what}");
                }
                // The raw bits as well.
                let bits =
                    bits_tensor(&idx, &Tensor::from(i64::from(key.a)), &Tensor::from(i64::from(key.b)));
                let bits = Vec::<i64>::try_from(&bits).unwrap();
                for (k, &i) in indices.iter().enumerate() {
                    assert_eq!(bits[k], i64::from(key.bits(i)));
                }
            }
        }
    }

    #[test]
    fn bits_tensor_broadcasts_per_element_keys() {
        // Two parameters in one pass: keys as [2, 1] columns against idx [1, n].
        let keys = [StreamKey::new(5, "x.weight"), StreamKey::new(5, "x.bias")];
        let a = Tensor::from_slice(&keys.map(|k| i64::from(k.a))).reshape([2, 1]);
        let b = Tensor::from_slice(&keys.map(|k| i64::from(k.b))).reshape([2, 1]);
        let idx = Tensor::arange(1000, (Kind::Int64, Device::Cpu)).reshape([1, -1]);
        let bits = bits_tensor(&idx, &a, &b);
        assert_eq!(bits.size(), [2, 1000]);
        let bits = Vec::<Vec<i64>>::try_from(&bits).unwrap();
        for (row, key) in bits.iter().zip(keys) {
            for (i, &v) in row.iter().enumerate() {
                assert_eq!(v, i64::from(key.bits(i as u32)));
            }
        }
    }

    #[test]
    fn z_tensor_matches_host_and_checks_numel() {
        let table = GaussTable::new(Device::Cpu);
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            let z = z_tensor(3, "w", 5000, dist, &table, Device::Cpu).unwrap();
            assert_eq!((z.size(), z.kind()), (vec![5000], Kind::Float));
            for (i, v) in to_bits(&z).into_iter().enumerate() {
                assert_eq!(v, z_host(3, "w", i as u32, dist).to_bits());
            }
        }
        assert_eq!(z_tensor(3, "w", 0, Distribution::Gaussian, &table, Device::Cpu).unwrap().numel(), 0);
        for bad in [-1, (1 << 32) + 1] {
            let err = z_tensor(3, "w", bad, Distribution::Gaussian, &table, Device::Cpu).unwrap_err();
            assert!(matches!(err, CoreError::TooManyElements { numel, .. } if numel == bad));
        }
    }

    fn mean_var_kurt(x: &[f64]) -> (f64, f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let m2 = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let m4 = x.iter().map(|v| (v - mean).powi(4)).sum::<f64>() / n;
        (mean, m2, m4 / (m2 * m2))
    }

    fn corr(x: &[f64], y: &[f64]) -> f64 {
        let (mx, vx, _) = mean_var_kurt(x);
        let (my, vy, _) = mean_var_kurt(y);
        let cov = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum::<f64>() / x.len() as f64;
        cov / (vx * vy).sqrt()
    }

    fn sample(seed: u64, name: &str, dist: Option<Distribution>, table: &GaussTable) -> Vec<f64> {
        let n = 1 << 20;
        let t = match dist {
            Some(d) => z_tensor(seed, name, n, d, table, Device::Cpu).unwrap(),
            None => {
                let key = StreamKey::new(seed, name);
                let idx = Tensor::arange(n, (Kind::Int64, Device::Cpu));
                let bits =
                    bits_tensor(&idx, &Tensor::from(i64::from(key.a)), &Tensor::from(i64::from(key.b)));
                uniform_from_bits(&bits)
            }
        };
        Vec::<f32>::try_from(&t).unwrap().into_iter().map(f64::from).collect()
    }

    #[test]
    fn distribution_quality() {
        let table = GaussTable::new(Device::Cpu);
        let name = "model.decoder.layers.3.fc1.weight";
        let g = sample(17, name, Some(Distribution::Gaussian), &table);
        let (mean, var, kurt) = mean_var_kurt(&g);
        println!("gaussian 2^20: mean {mean:.5} var {var:.5} kurtosis {kurt:.5}");
        assert!(mean.abs() < 0.005 && (var - 1.0).abs() < 0.01 && (kurt - 3.0).abs() < 0.05);
        for x in [-2.0, -1.0, 0.0, 1.0, 2.0] {
            let ecdf = g.iter().filter(|&&v| v <= x).count() as f64 / g.len() as f64;
            println!("  ecdf({x:+}) = {ecdf:.5}, Phi = {:.5}", normal_cdf(x));
            assert!((ecdf - normal_cdf(x)).abs() < 0.003, "ecdf at {x}");
        }
        let r = sample(17, name, Some(Distribution::Rademacher), &table);
        let rmean = r.iter().sum::<f64>() / r.len() as f64;
        assert!(r.iter().all(|&v| v == 1.0 || v == -1.0));
        let u = sample(17, name, None, &table);
        let umean = u.iter().sum::<f64>() / u.len() as f64;
        assert!(u.iter().all(|&v| (0.0..1.0).contains(&v)));
        let c_name =
            corr(&g, &sample(17, "model.decoder.layers.3.fc2.weight", Some(Distribution::Gaussian), &table));
        let c_seed = corr(&g, &sample(18, name, Some(Distribution::Gaussian), &table));
        let c_gu = corr(&g[1..], &g[..g.len() - 1]);
        println!("rademacher mean {rmean:.5}; uniform mean {umean:.5}; corr other name {c_name:.5}, other seed {c_seed:.5}, lag 1 {c_gu:.5}");
        assert!(rmean.abs() < 0.005);
        assert!((umean - 0.5).abs() < 0.002);
        assert!(c_name.abs() < 0.01 && c_seed.abs() < 0.01 && c_gu.abs() < 0.01);
    }

    /// Run with `cargo test --release -p mezo-core -- --ignored` on a machine with a GPU.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_bits_equal_cpu_bits() {
        assert!(tch::Cuda::is_available(), "no CUDA device");
        let cuda = Device::Cuda(0);
        let (tc, tg) = (GaussTable::new(Device::Cpu), GaussTable::new(cuda));
        let n = 10_000_000;
        let seed = 0xDEAD_BEEF_CAFE_BABE;
        let name = "model.decoder.layers.0.self_attn.q_proj.weight";
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            let zc = z_tensor(seed, name, n, dist, &tc, Device::Cpu).unwrap();
            let zg = z_tensor(seed, name, n, dist, &tg, cuda).unwrap();
            assert_eq!(zg.device(), cuda);
            let diff = to_bits(&zc).iter().zip(to_bits(&zg)).filter(|(c, g)| **c != *g).count();
            assert_eq!(diff, 0, "{dist}: {diff} of {n} elements differ between CPU and CUDA");
        }
        // Uniform, and indices near 2^32, through bits_tensor directly.
        let idx_c = Tensor::arange(n, (Kind::Int64, Device::Cpu)) + ((1i64 << 32) - n);
        for (s, nm) in [(0u64, ""), (u64::MAX, "lm_head.weight"), (seed, name)] {
            let [uc, rc, gc] = tensor_variates(s, nm, &idx_c, &tc);
            let [ug, rg, gg] = tensor_variates(s, nm, &idx_c.to_device(cuda), &tg);
            assert!(uc == ug && rc == rg && gc == gg, "seed {s} name {nm:?}: CPU and CUDA differ");
            // Spot-check against the host reference too.
            for k in (0..n as usize).step_by(9973) {
                let i = ((1u64 << 32) - n as u64 + k as u64) as u32;
                assert_eq!(gg[k], z_host(s, nm, i, Distribution::Gaussian).to_bits());
                assert_eq!(ug[k], uniform_host(s, nm, i).to_bits());
            }
        }
    }
}
