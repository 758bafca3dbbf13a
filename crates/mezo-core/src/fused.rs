//! Fused, seeded, in-place kernels for full-parameter MeZO: `θ += s·z` (perturb) and the ZO-SGD
//! update `θ -= η((1/n)Σ g_i z_i + λθ)`, each one pass over the parameter's memory that
//! regenerates `z` on the fly. `z` never exists in memory, not even for one tensor, and no
//! temporaries are made, so full-parameter MeZO runs at inference memory.
//!
//! Every arithmetic step is a single correctly rounded f32 operation in a fixed order (the CUDA
//! kernel uses `__fmul_rn`/`__fadd_rn`, which are never contracted into FMAs), the same sequence
//! as the unfused tensor ops, so all three paths agree bit for bit: CPU loop, CUDA kernel and the
//! reference tensor code.

use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::rng::{
    gaussian_of_bits, host_gauss_table, rademacher_of_bits, Distribution, HostGaussTable, StreamKey,
};
use crate::ztensor::GaussTable;

/// The ZO-SGD update of one tensor: direction keys and projected gradients (as f32), the scale
/// 1/n applied when there are several directions, decoupled weight decay when given.
#[derive(Debug, Clone)]
pub struct SgdUpdate {
    pub keys: Vec<StreamKey>,
    pub grads: Vec<f32>,
    pub lr: f32,
    pub weight_decay: Option<f32>,
    /// A perturbation still applied to `p` that the update undoes first (`p += scale * z(key)`,
    /// rounded to p's dtype exactly as [`perturb_`] would store it): on CUDA in the same sweep.
    pub restore: Option<(StreamKey, f32)>,
}

impl SgdUpdate {
    fn inv_n(&self) -> Option<f32> {
        (self.keys.len() > 1).then(|| (1.0 / self.keys.len() as f64) as f32)
    }
}

/// Whether the fused kernels handle this tensor (contiguous f32, f16 or bf16 on the CPU or CUDA).
pub fn supported(p: &Tensor) -> bool {
    matches!(p.kind(), Kind::Float | Kind::Half | Kind::BFloat16)
        && p.is_contiguous()
        && matches!(p.device(), Device::Cpu | Device::Cuda(_))
        && (p.numel() as u64) <= 1 << 32
}

/// `p += scale * z(key)` in place.
pub fn perturb_(
    p: &Tensor,
    key: StreamKey,
    scale: f32,
    dist: Distribution,
    table: &GaussTable,
) -> Result<()> {
    check(p)?;
    match p.device() {
        Device::Cpu => {
            let t = host_gauss_table();
            for_each_chunk(p, |i, v| v + z_of(key, i, dist, t) * scale);
            Ok(())
        }
        Device::Cuda(_) => crate::cuda::perturb(p, key, scale, dist, table),
        d => Err(unsupported(p, &format!("device {d:?}"))),
    }
}

/// `p -= lr * ((1/n) Σ g_i z_i + wd * p)` in place (the sum in direction order).
pub fn sgd_update_(p: &Tensor, u: &SgdUpdate, dist: Distribution, table: &GaussTable) -> Result<()> {
    check(p)?;
    if u.keys.is_empty() || u.keys.len() != u.grads.len() {
        return Err(CoreError::InvalidArgument {
            what: "update directions",
            value: format!("{} keys, {} gradients", u.keys.len(), u.grads.len()),
            expected: "one projected gradient per direction, at least one",
        });
    }
    match p.device() {
        Device::Cpu => {
            if let Some((key, scale)) = u.restore {
                perturb_(p, key, scale, dist, table)?;
            }
            let t = host_gauss_table();
            let inv_n = u.inv_n();
            for_each_chunk(p, |i, theta| {
                let mut acc = z_of(u.keys[0], i, dist, t) * u.grads[0];
                for (k, g) in u.keys.iter().zip(&u.grads).skip(1) {
                    acc += z_of(*k, i, dist, t) * g;
                }
                if let Some(s) = inv_n {
                    acc *= s;
                }
                if let Some(wd) = u.weight_decay {
                    acc += theta * wd;
                }
                theta - acc * u.lr
            });
            Ok(())
        }
        Device::Cuda(_) => crate::cuda::sgd_update(p, u, u.inv_n(), dist, table),
        d => Err(unsupported(p, &format!("device {d:?}"))),
    }
}

/// One parameter's stretch of a flat vector: where it starts, how long it is, and its stream key
/// for each direction.
#[derive(Debug, Clone)]
pub struct Segment {
    pub offset: usize,
    pub len: usize,
    pub keys: Vec<StreamKey>,
}

/// [`sgd_update_`] over a CPU f32 vector made of several parameters laid end to end (a LoRA
/// state): element `offset + j` of a segment takes `z(key, j)`. The same arithmetic in the same
/// order as `sgd_update_` on each parameter and as the LoRA path's tensor ops, so the same bits;
/// one pass over the whole vector on every core instead of a dozen int64 tensor passes.
pub fn sgd_update_segments_(
    flat: &Tensor,
    segs: &[Segment],
    grads: &[f32],
    lr: f32,
    weight_decay: Option<f32>,
    dist: Distribution,
) -> Result<()> {
    check(flat)?;
    let n = flat.numel();
    let covered = segs.iter().enumerate().all(|(i, s)| {
        s.keys.len() == grads.len()
            && s.offset == if i == 0 { 0 } else { segs[i - 1].offset + segs[i - 1].len }
    }) && segs.last().is_some_and(|s| s.offset + s.len == n);
    if flat.device() != Device::Cpu || flat.kind() != Kind::Float || grads.is_empty() || !covered {
        return Err(unsupported(flat, "segments must tile a CPU f32 vector, one key per gradient"));
    }
    let t = host_gauss_table();
    let inv_n = (grads.len() > 1).then(|| (1.0 / grads.len() as f64) as f32);
    for_each_chunk(flat, |i, theta| {
        let i = i as usize;
        let s = &segs[segs.partition_point(|s| s.offset <= i) - 1];
        let local = (i - s.offset) as u32;
        let mut acc = z_of(s.keys[0], local, dist, t) * grads[0];
        for (k, g) in s.keys.iter().zip(grads).skip(1) {
            acc += z_of(*k, local, dist, t) * g;
        }
        if let Some(sc) = inv_n {
            acc *= sc;
        }
        if let Some(wd) = weight_decay {
            acc += theta * wd;
        }
        theta - acc * lr
    });
    Ok(())
}

#[inline]
fn z_of(key: StreamKey, i: u32, dist: Distribution, t: &HostGaussTable) -> f32 {
    let bits = key.bits(i);
    match dist {
        Distribution::Gaussian => gaussian_of_bits(bits, t),
        Distribution::Rademacher => rademacher_of_bits(bits),
    }
}

fn unsupported(p: &Tensor, why: &str) -> CoreError {
    CoreError::InvalidArgument {
        what: "tensor for a fused kernel",
        value: format!("{:?} {:?} on {:?} ({why})", p.kind(), p.size(), p.device()),
        expected: "a contiguous f32, f16 or bf16 tensor of at most 2^32 elements on the CPU or CUDA",
    }
}

fn check(p: &Tensor) -> Result<()> {
    if supported(p) {
        Ok(())
    } else {
        Err(unsupported(p, "unsupported"))
    }
}

/// Applies `f(index, value) -> value` to every element of a CPU tensor, in parallel chunks over
/// the threads libtorch uses, reading and writing the tensor's own dtype (round to nearest even).
fn for_each_chunk(p: &Tensor, f: impl Fn(u32, f32) -> f32 + Sync) {
    let n = p.numel();
    if n == 0 {
        return;
    }
    let threads = (tch::get_num_threads().max(1) as usize).min(n.div_ceil(1 << 16));
    let per = n.div_ceil(threads);
    let ptr = p.data_ptr() as usize;
    let kind = p.kind();
    std::thread::scope(|s| {
        for c in 0..threads {
            let f = &f;
            s.spawn(move || {
                let start = c * per;
                let end = n.min(start + per);
                if start >= end {
                    return;
                }
                // SAFETY: `p` is a contiguous CPU tensor of `n` elements of `kind` that nothing
                // else touches while this function runs (tensors never cross threads in mezo),
                // and the chunks are disjoint.
                unsafe {
                    match kind {
                        Kind::Float => {
                            let s = std::slice::from_raw_parts_mut((ptr as *mut f32).add(start), end - start);
                            for (j, v) in s.iter_mut().enumerate() {
                                *v = f((start + j) as u32, *v);
                            }
                        }
                        Kind::Half => {
                            let s = std::slice::from_raw_parts_mut((ptr as *mut u16).add(start), end - start);
                            for (j, v) in s.iter_mut().enumerate() {
                                *v = f32_to_f16(f((start + j) as u32, f16_to_f32(*v)));
                            }
                        }
                        Kind::BFloat16 => {
                            let s = std::slice::from_raw_parts_mut((ptr as *mut u16).add(start), end - start);
                            for (j, v) in s.iter_mut().enumerate() {
                                *v = f32_to_bf16(f((start + j) as u32, f32::from_bits(u32::from(*v) << 16)));
                            }
                        }
                        _ => unreachable!("checked by supported()"),
                    }
                }
            });
        }
    });
}

/// f32 -> bf16, round to nearest even (as torch and `cvt.rn.bf16.f32`), NaN kept quiet.
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1F);
    let man = u32::from(h & 0x3FF);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3FF;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (0x1F, 0) => sign | 0x7F80_0000,
        (0x1F, m) => sign | 0x7FC0_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// f32 -> f16, round to nearest even, overflow to infinity, subnormals handled.
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xFF) as i32;
    let man = b & 0x7F_FFFF;
    if exp == 0xFF {
        return sign | 0x7C00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rest > half || (rest == half && (r & 1) == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1FFF;
    if rest > 0x1000 || (rest == 0x1000 && (r & 1) == 1) {
        r += 1; // may carry into the exponent, which is the right rounding
    }
    sign | r as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ztensor::z_tensor;

    #[test]
    fn half_conversions_match_torch() {
        let mut vals: Vec<f32> =
            (0..20000).map(|i| ((i as f32) - 10000.0) * 0.37 + (i as f32).sin() * 1e-3).collect();
        vals.extend([
            0.0,
            -0.0,
            1e-8,
            -6e-8,
            65504.0,
            65520.0,
            1e6,
            f32::INFINITY,
            f32::MIN_POSITIVE,
            3.0e-5,
            6.1e-5,
        ]);
        let t = Tensor::from_slice(&vals);
        let cases: [(Kind, fn(f32) -> u16); 2] = [(Kind::Half, f32_to_f16), (Kind::BFloat16, f32_to_bf16)];
        for (kind, to) in cases {
            let ours: Vec<u16> = vals.iter().map(|&v| to(v)).collect();
            let theirs: Vec<i16> = Vec::try_from(&t.to_kind(kind).view_dtype(Kind::Int16)).unwrap();
            let theirs: Vec<u16> = theirs.into_iter().map(|v| v as u16).collect();
            assert_eq!(ours, theirs, "{kind:?} rounding differs from torch");
        }
        let halves: Vec<i16> = (i16::MIN..=i16::MAX).collect();
        let h = Tensor::from_slice(&halves).view_dtype(Kind::Half).to_kind(Kind::Float);
        let theirs: Vec<f32> = Vec::try_from(&h).unwrap();
        for (x, t) in halves.iter().zip(theirs) {
            let ours = f16_to_f32(*x as u16);
            assert!(ours.to_bits() == t.to_bits() || (ours.is_nan() && t.is_nan()), "{x:#x}: {ours} vs {t}");
        }
    }

    /// The fused CPU kernels give the same bits as the reference tensor ops they replace.
    #[test]
    fn fused_equals_reference_tensor_ops() {
        let table = GaussTable::new(Device::Cpu);
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            for dist in [Distribution::Gaussian, Distribution::Rademacher] {
                let n = 300_001;
                let base = (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.05).to_kind(kind);
                let name = "model.decoder.layers.0.fc1.weight";
                // Perturb.
                let fused = base.copy();
                perturb_(&fused, StreamKey::new(9, name), 1e-3, dist, &table).unwrap();
                let z = z_tensor(9, name, n, dist, &table, Device::Cpu).unwrap();
                let reference = (base.to_kind(Kind::Float) + z * 1e-3f32 as f64).to_kind(kind);
                assert!(fused.equal(&reference), "{kind:?} {dist}: perturb differs");
                // Update with three directions and weight decay.
                let seeds = [3u64, 4, 5];
                let grads = [0.5f32, -2.0, 7.25];
                let u = SgdUpdate {
                    keys: seeds.iter().map(|&s| StreamKey::new(s, name)).collect(),
                    grads: grads.to_vec(),
                    lr: 1e-4,
                    weight_decay: Some(0.01),
                    restore: None,
                };
                let fused = base.copy();
                sgd_update_(&fused, &u, dist, &table).unwrap();
                let theta = base.to_kind(Kind::Float);
                let mut acc =
                    z_tensor(seeds[0], name, n, dist, &table, Device::Cpu).unwrap() * grads[0] as f64;
                for (s, g) in seeds.iter().zip(grads).skip(1) {
                    acc = acc + z_tensor(*s, name, n, dist, &table, Device::Cpu).unwrap() * g as f64;
                }
                acc = acc * (1.0f64 / 3.0) as f32 as f64;
                acc = acc + &theta * 0.01f32 as f64;
                let reference = (&theta - acc * 1e-4f32 as f64).to_kind(kind);
                assert!(fused.equal(&reference), "{kind:?} {dist}: update differs");
            }
        }
    }

    #[test]
    fn bad_tensors_are_refused() {
        let table = GaussTable::new(Device::Cpu);
        let t = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let e = perturb_(&t, StreamKey::new(1, "x"), 1.0, Distribution::Gaussian, &table).unwrap_err();
        assert!(e.to_string().contains("contiguous"), "{e}");
        let t = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        assert!(perturb_(&t, StreamKey::new(1, "x"), 1.0, Distribution::Gaussian, &table).is_err());
    }
}

#[cfg(test)]
mod cuda_tests {
    use super::*;

    /// The fused kernels give the same bits on CUDA as on the CPU, for every dtype.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_fused_equals_cpu_fused() {
        let gpu = Device::Cuda(0);
        crate::cuda::available(gpu).expect("NVRTC kernels build");
        let (tc, tg) = (GaussTable::new(Device::Cpu), GaussTable::new(gpu));
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            for dist in [Distribution::Gaussian, Distribution::Rademacher] {
                let n = 5_000_003;
                let base = (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.05).to_kind(kind);
                let (c, g) = (base.copy(), base.to_device(gpu));
                let key = StreamKey::new(77, "model.decoder.embed_tokens.weight");
                perturb_(&c, key, 1e-3, dist, &tc).unwrap();
                perturb_(&g, key, 1e-3, dist, &tg).unwrap();
                assert!(c.equal(&g.to_device(Device::Cpu)), "{kind:?} {dist}: perturb differs on CUDA");
                let u = SgdUpdate {
                    keys: (0..4).map(|s| StreamKey::new(s, "w")).collect(),
                    grads: vec![1.5, -0.25, 3.0, 0.125],
                    lr: 3e-4,
                    weight_decay: Some(0.1),
                    restore: None,
                };
                sgd_update_(&c, &u, dist, &tc).unwrap();
                sgd_update_(&g, &u, dist, &tg).unwrap();
                assert!(c.equal(&g.to_device(Device::Cpu)), "{kind:?} {dist}: update differs on CUDA");
                // The restore fused into the update sweep (CUDA) against the CPU's two passes.
                let u = SgdUpdate { restore: Some((StreamKey::new(5, "w"), 2e-3)), ..u };
                sgd_update_(&c, &u, dist, &tc).unwrap();
                sgd_update_(&g, &u, dist, &tg).unwrap();
                assert!(
                    c.equal(&g.to_device(Device::Cpu)),
                    "{kind:?} {dist}: restore+update differs on CUDA"
                );
                // A view that starts one element in: not aligned for the kernels' vector path.
                let (cv, gv) = (c.narrow(0, 1, 100_001), g.narrow(0, 1, 100_001));
                perturb_(&cv, key, -2e-3, dist, &tc).unwrap();
                perturb_(&gv, key, -2e-3, dist, &tg).unwrap();
                sgd_update_(&cv, &u, dist, &tc).unwrap();
                sgd_update_(&gv, &u, dist, &tg).unwrap();
                assert!(
                    c.equal(&g.to_device(Device::Cpu)),
                    "{kind:?} {dist}: unaligned view differs on CUDA"
                );
            }
        }
    }
}
