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
    GAUSS_TABLE_LEN, TWO_POW_M16,
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
    pub(crate) fn inv_n(&self) -> Option<f32> {
        mean_factor(self.keys.len())
    }
}

/// The mean over `directions` of an update's estimate, as a multiply by the f32 reciprocal
/// (never a division: CUDA turns a division by a scalar into exactly this, the CPU would not);
/// none for one direction.
pub(crate) fn mean_factor(directions: usize) -> Option<f32> {
    (directions > 1).then(|| (1.0 / directions as f64) as f32)
}

/// Whether the fused kernels handle this tensor (contiguous f32, f16 or bf16 on the CPU or CUDA).
pub fn supported(p: &Tensor) -> bool {
    matches!(p.kind(), Kind::Float | Kind::Half | Kind::BFloat16)
        && p.is_contiguous()
        && matches!(p.device(), Device::Cpu | Device::Cuda(_))
        && (p.numel() as u64) <= 1 << 32
}

/// `p += scale * z(key)` in place. `_table` is not read: the CPU uses the host table and CUDA a
/// copy the kernels keep on each device; the argument remains so existing callers compile.
pub fn perturb_(
    p: &Tensor,
    key: StreamKey,
    scale: f32,
    dist: Distribution,
    _table: &GaussTable,
) -> Result<()> {
    perturb_many_(&[p], &[key], scale, dist)
}

/// `p -= lr * ((1/n) Σ g_i z_i + wd * p)` in place (the sum in direction order). `_table` as in
/// [`perturb_`].
pub fn sgd_update_(p: &Tensor, u: &SgdUpdate, dist: Distribution, _table: &GaussTable) -> Result<()> {
    sgd_update_many_(&[p], std::slice::from_ref(u), dist)
}

/// [`perturb_`] of every tensor `ps[j]` with its key `keys[j]`: the same bits as one call per
/// tensor, but on CUDA one kernel launch per device for the whole list (tensors on any CUDA
/// device and on the CPU may be mixed). The tensors must not overlap in memory. Everything is
/// checked before anything is written.
pub fn perturb_many_(ps: &[&Tensor], keys: &[StreamKey], scale: f32, dist: Distribution) -> Result<()> {
    if ps.len() != keys.len() {
        return Err(CoreError::InvalidArgument {
            what: "perturbation keys",
            value: format!("{} tensors, {} keys", ps.len(), keys.len()),
            expected: "one stream key per tensor",
        });
    }
    check_many(ps)?;
    for (device, idx) in by_device(ps) {
        match device {
            Device::Cpu => {
                let t = host_gauss_table();
                for j in idx {
                    let key = keys[j];
                    for_each_chunk(ps[j], |i, v| v + z_of(key, i, dist, t) * scale);
                }
            }
            Device::Cuda(d) => {
                let ts: Vec<&Tensor> = idx.iter().map(|&j| ps[j]).collect();
                let ks: Vec<StreamKey> = idx.iter().map(|&j| keys[j]).collect();
                crate::cuda::perturb_many(d, &ts, &ks, scale, dist)?;
            }
            d => return Err(unsupported(ps[idx[0]], &format!("device {d:?}"))),
        }
    }
    Ok(())
}

/// [`sgd_update_`] of every tensor `ps[j]` with its update `us[j]` (restore included): the same
/// bits as one call per tensor, on CUDA one launch per device. The tensors must not overlap.
/// Everything is checked before anything is written.
pub fn sgd_update_many_(ps: &[&Tensor], us: &[SgdUpdate], dist: Distribution) -> Result<()> {
    update_many(ps, us, None, dist)
}

/// [`sgd_update_many_`] followed by [`perturb_many_`]`(ps, keys, scale, dist)`, the same bits,
/// but on CUDA one sweep instead of two: each element is updated, rounded to its tensor's dtype
/// exactly as the update's store rounds it, then perturbed with the perturb kernel's arithmetic.
/// How a full-parameter step folds the previous step's update into its first perturbation.
pub fn sgd_update_then_perturb_many_(
    ps: &[&Tensor],
    us: &[SgdUpdate],
    keys: &[StreamKey],
    scale: f32,
    dist: Distribution,
) -> Result<()> {
    if ps.len() != keys.len() {
        return Err(CoreError::InvalidArgument {
            what: "perturbation keys",
            value: format!("{} tensors, {} keys", ps.len(), keys.len()),
            expected: "one stream key per tensor",
        });
    }
    update_many(ps, us, Some((keys, scale)), dist)
}

fn update_many(
    ps: &[&Tensor],
    us: &[SgdUpdate],
    then: Option<(&[StreamKey], f32)>,
    dist: Distribution,
) -> Result<()> {
    if ps.len() != us.len() {
        return Err(CoreError::InvalidArgument {
            what: "updates",
            value: format!("{} tensors, {} updates", ps.len(), us.len()),
            expected: "one update per tensor",
        });
    }
    check_many(ps)?;
    for u in us {
        if u.keys.is_empty() || u.keys.len() != u.grads.len() {
            return Err(CoreError::InvalidArgument {
                what: "update directions",
                value: format!("{} keys, {} gradients", u.keys.len(), u.grads.len()),
                expected: "one projected gradient per direction, at least one",
            });
        }
    }
    for (device, idx) in by_device(ps) {
        match device {
            Device::Cpu => {
                let t = host_gauss_table();
                for j in idx {
                    update_cpu(ps[j], &us[j], dist, t);
                    // The CPU keeps the separate pass: the update's store, then the perturb.
                    if let Some((keys, scale)) = then {
                        let key = keys[j];
                        for_each_chunk(ps[j], |i, v| v + z_of(key, i, dist, t) * scale);
                    }
                }
            }
            Device::Cuda(d) => {
                let ts: Vec<&Tensor> = idx.iter().map(|&j| ps[j]).collect();
                let vs: Vec<&SgdUpdate> = idx.iter().map(|&j| &us[j]).collect();
                let ks: Option<Vec<StreamKey>> = then.map(|(keys, _)| idx.iter().map(|&j| keys[j]).collect());
                let then = ks.as_deref().zip(then.map(|(_, s)| s));
                crate::cuda::sgd_update_many(d, &ts, &vs, then, dist)?;
            }
            d => return Err(unsupported(ps[idx[0]], &format!("device {d:?}"))),
        }
    }
    Ok(())
}

/// The CPU update of one tensor: the restore as its own pass (rounded to the dtype like a
/// perturb), then the update pass.
fn update_cpu(p: &Tensor, u: &SgdUpdate, dist: Distribution, t: &HostGaussTable) {
    if let Some((key, scale)) = u.restore {
        for_each_chunk(p, |i, v| v + z_of(key, i, dist, t) * scale);
    }
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
}

/// The indices of `ps` grouped by device, devices in order of first appearance.
fn by_device(ps: &[&Tensor]) -> Vec<(Device, Vec<usize>)> {
    let mut groups: Vec<(Device, Vec<usize>)> = Vec::new();
    for (j, p) in ps.iter().enumerate() {
        let d = p.device();
        match groups.iter_mut().find(|(g, _)| *g == d) {
            Some((_, v)) => v.push(j),
            None => groups.push((d, vec![j])),
        }
    }
    groups
}

/// Every tensor supported, and no two sharing memory: one launch updates them all at once, so
/// an overlap would race where one call per tensor would apply both in turn.
fn check_many(ps: &[&Tensor]) -> Result<()> {
    for p in ps {
        check(p)?;
    }
    let mut spans: Vec<(Device, usize, usize, usize)> = ps
        .iter()
        .enumerate()
        .filter(|(_, p)| p.numel() > 0)
        .map(|(j, p)| {
            let start = p.data_ptr() as usize;
            (p.device(), start, start + p.numel() * p.kind().elt_size_in_bytes(), j)
        })
        .collect();
    spans.sort_by_key(|&(d, start, _, _)| (device_order(d), start));
    for w in spans.windows(2) {
        let ((d0, _, end0, j0), (d1, start1, _, j1)) = (w[0], w[1]);
        if d0 == d1 && start1 < end0 {
            return Err(CoreError::InvalidArgument {
                what: "tensors of one fused sweep",
                value: format!("tensors {j0} and {j1} share memory on {d0:?}"),
                expected: "distinct, non-overlapping tensors",
            });
        }
    }
    Ok(())
}

fn device_order(d: Device) -> i64 {
    match d {
        Device::Cpu => -1,
        Device::Cuda(i) => i as i64,
        _ => -2,
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

/// [`sgd_update_`] over an f32 vector made of several parameters laid end to end (a LoRA
/// state): element `offset + j` of a segment takes `z(key, j)`. The same arithmetic in the same
/// order as `sgd_update_` on each parameter and as the LoRA path's tensor ops, so the same bits;
/// on the CPU one pass over the whole vector on every core instead of a dozen int64 tensor
/// passes, on CUDA one launch with a descriptor per segment.
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
    if flat.kind() != Kind::Float || grads.is_empty() || !covered {
        return Err(unsupported(flat, "segments must tile an f32 vector, one key per gradient"));
    }
    if let Device::Cuda(index) = flat.device() {
        // One launch over the segments, by address (the same descriptors as views would give).
        return crate::cuda::sgd_update_segments(index, flat, segs, grads, lr, weight_decay, dist);
    }
    update_segments_cpu(flat, segs, grads, lr, weight_decay, dist);
    Ok(())
}

/// Elements a block of the CPU segment update draws at once, per direction.
const SEG_BLOCK: usize = 256;

/// What one block of the CPU segment update needs besides its elements.
struct SegBlock<'a> {
    keys: &'a [StreamKey],
    grads: &'a [f32],
    inv_n: Option<f32>,
    weight_decay: Option<f32>,
    lr: f32,
    dist: Distribution,
    t: &'a [f32; GAUSS_TABLE_LEN],
    d: &'a [f32; GAUSS_TABLE_LEN],
}

/// The segment update on the CPU (the coordinator's LoRA state each step: 8 directions x 1.6M
/// values for OPT-1.3B). Each thread takes a contiguous range of the vector and walks the
/// segments it covers; a block of [`SEG_BLOCK`] elements of one segment draws each direction's z
/// for the whole block before the next direction, a loop the compiler vectorises (the hash is
/// 32-bit integer arithmetic, the table reads gathers; with AVX2 where the CPU has it). Each
/// element still takes the same f32 operations in the same order as [`sgd_update_`], so the
/// same bits. It was a binary search for the segment and one bounds-checked scalar draw at a
/// time per element: ~13 ms a step on 32 cores, which slowed the workers sharing the host.
fn update_segments_cpu(
    flat: &Tensor,
    segs: &[Segment],
    grads: &[f32],
    lr: f32,
    weight_decay: Option<f32>,
    dist: Distribution,
) {
    let n = flat.numel();
    let t = host_gauss_table();
    let blk = SegBlock {
        keys: &[],
        grads,
        inv_n: mean_factor(grads.len()),
        weight_decay,
        lr,
        dist,
        t: t.t.as_slice().try_into().expect("the table has GAUSS_TABLE_LEN knots"),
        d: t.d.as_slice().try_into().expect("the table has GAUSS_TABLE_LEN differences"),
    };
    let threads = (tch::get_num_threads().max(1) as usize).min(n.div_ceil(1 << 16));
    let per = n.div_ceil(threads);
    let ptr = flat.data_ptr() as usize;
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    std::thread::scope(|sc| {
        for c in 0..threads {
            let blk = &blk;
            sc.spawn(move || {
                let (start, end) = (c * per, n.min((c + 1) * per));
                if start >= end {
                    return;
                }
                // SAFETY: `flat` is a contiguous f32 CPU tensor of `n` elements (checked by the
                // caller) that nothing else touches while this runs; the ranges are disjoint.
                let data =
                    unsafe { std::slice::from_raw_parts_mut((ptr as *mut f32).add(start), end - start) };
                let mut i = start;
                let mut si = segs.partition_point(|s| s.offset <= i) - 1;
                while i < end {
                    let s = &segs[si];
                    let seg_end = end.min(s.offset + s.len);
                    let b = SegBlock { keys: &s.keys, ..*blk };
                    while i < seg_end {
                        let len = SEG_BLOCK.min(seg_end - i);
                        let theta = &mut data[i - start..i - start + len];
                        let local0 = (i - s.offset) as u32;
                        #[cfg(target_arch = "x86_64")]
                        if avx2 {
                            // SAFETY: the CPU has AVX2 (checked above).
                            unsafe { seg_block_avx2(theta, local0, &b) };
                            i += len;
                            continue;
                        }
                        seg_block(theta, local0, &b);
                        i += len;
                    }
                    si += 1;
                }
            });
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn seg_block_avx2(theta: &mut [f32], local0: u32, b: &SegBlock) {
    seg_block(theta, local0, b)
}

/// One block: `theta[j]` is element `local0 + j` of its segment (at most [`SEG_BLOCK`]).
#[inline(always)]
fn seg_block(theta: &mut [f32], local0: u32, b: &SegBlock) {
    let len = theta.len();
    let mut acc = [0f32; SEG_BLOCK];
    let acc = &mut acc[..len];
    let mut z = [0f32; SEG_BLOCK];
    let z = &mut z[..len];
    for (k, (key, &g)) in b.keys.iter().zip(b.grads).enumerate() {
        match b.dist {
            Distribution::Gaussian => {
                for (j, zj) in z.iter_mut().enumerate() {
                    let bits = key.bits(local0 + j as u32);
                    let hi = (bits >> 16) as usize; // < 65536 < GAUSS_TABLE_LEN: no bounds check
                    *zj = b.t[hi] + b.d[hi] * ((bits & 0xFFFF) as f32 * TWO_POW_M16);
                }
            }
            Distribution::Rademacher => {
                for (j, zj) in z.iter_mut().enumerate() {
                    *zj = rademacher_of_bits(key.bits(local0 + j as u32));
                }
            }
        }
        if k == 0 {
            acc.iter_mut().zip(z.iter()).for_each(|(a, &zj)| *a = zj * g);
        } else {
            acc.iter_mut().zip(z.iter()).for_each(|(a, &zj)| *a += zj * g);
        }
    }
    for (th, &a) in theta.iter_mut().zip(acc.iter()) {
        let mut a = a;
        if let Some(sc) = b.inv_n {
            a *= sc;
        }
        if let Some(wd) = b.weight_decay {
            a += *th * wd;
        }
        *th -= a * b.lr;
    }
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

    /// The CPU segment update over a vector large enough to be split over threads (the splits
    /// fall inside segments, blocks end at segment and split boundaries) equals the reference
    /// tensor ops on each segment, for both distributions, one and several directions, with and
    /// without weight decay.
    #[test]
    fn segment_update_over_threads_equals_reference() {
        let lens = [1usize, 70_001, 3, 255, 257, 130_000, 513];
        let total: usize = lens.iter().sum();
        let flat0 = Tensor::randn([total as i64], (Kind::Float, Device::Cpu)) * 0.05;
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            for (dirs, wd) in [(1usize, None), (3, Some(0.01f32))] {
                let grads: Vec<f32> = (0..dirs).map(|k| 0.75 - k as f32).collect();
                let mut offset = 0;
                let segs: Vec<Segment> = lens
                    .iter()
                    .enumerate()
                    .map(|(m, &len)| {
                        let keys =
                            (0..dirs as u64).map(|k| StreamKey::new(k + 7, &format!("seg{m}"))).collect();
                        offset += len;
                        Segment { offset: offset - len, len, keys }
                    })
                    .collect();
                let flat = flat0.copy();
                sgd_update_segments_(&flat, &segs, &grads, 1e-2, wd, dist).unwrap();
                for s in &segs {
                    let part = flat0.narrow(0, s.offset as i64, s.len as i64);
                    let u = SgdUpdate {
                        keys: s.keys.clone(),
                        grads: grads.clone(),
                        lr: 1e-2,
                        weight_decay: wd,
                        restore: None,
                    };
                    assert!(
                        flat.narrow(0, s.offset as i64, s.len as i64)
                            .equal(&reference_update(&part, &u, dist)),
                        "{dist}, {dirs} directions: the segment at {} differs",
                        s.offset
                    );
                }
            }
        }
    }

    /// `p + scale z(key)` by tensor ops, rounded once to p's dtype: the reference for one tensor.
    pub(super) fn reference_perturb(p: &Tensor, key: StreamKey, scale: f32, dist: Distribution) -> Tensor {
        let z = reference_z(p, key, dist);
        (p.to_kind(Kind::Float) + z * scale as f64).to_kind(p.kind()).view(p.size().as_slice())
    }

    fn reference_z(p: &Tensor, key: StreamKey, dist: Distribution) -> Tensor {
        let table = GaussTable::new(Device::Cpu);
        let idx = Tensor::arange(p.numel() as i64, (Kind::Int64, Device::Cpu));
        let bits = crate::ztensor::bits_tensor(
            &idx,
            &Tensor::from(i64::from(key.a)),
            &Tensor::from(i64::from(key.b)),
        );
        crate::ztensor::z_from_bits(&bits, dist, &table).view(p.size().as_slice())
    }

    /// The update of one tensor by tensor ops (restore rounded to the dtype first).
    pub(super) fn reference_update(p: &Tensor, u: &SgdUpdate, dist: Distribution) -> Tensor {
        let p = match u.restore {
            Some((key, s)) => reference_perturb(p, key, s, dist),
            None => p.shallow_clone(),
        };
        let theta = p.to_kind(Kind::Float);
        let mut acc = reference_z(&p, u.keys[0], dist) * u.grads[0] as f64;
        for (k, g) in u.keys.iter().zip(&u.grads).skip(1) {
            acc += reference_z(&p, *k, dist) * *g as f64;
        }
        if let Some(s) = u.inv_n() {
            acc *= s as f64;
        }
        if let Some(wd) = u.weight_decay {
            acc += &theta * wd as f64;
        }
        (&theta - acc * u.lr as f64).to_kind(p.kind())
    }

    /// Tensors of every dtype and very different lengths (0, 1, odd, a table-load's worth, large),
    /// plus unaligned views into a larger tensor, as one list.
    pub(super) fn mixed_tensors(device: Device) -> (Vec<Tensor>, Tensor) {
        let kinds = [Kind::Float, Kind::Half, Kind::BFloat16];
        let lens = [0i64, 1, 3, 5, 2048, 4097, 65_539, 300_001];
        let mut ts = Vec::new();
        for (j, &n) in lens.iter().enumerate() {
            for (k, &kind) in kinds.iter().enumerate() {
                if (j + k) % 2 == 0 || n < 5000 {
                    ts.push(
                        (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.05)
                            .to_kind(kind)
                            .to_device(device),
                    );
                }
            }
        }
        ts.push((Tensor::randn([3, 7, 11], (Kind::Float, Device::Cpu)) * 0.05).to_device(device));
        // One backing tensor, viewed at element offsets 1 and 10_003 (not vector-aligned).
        let backing = (Tensor::randn([30_000], (Kind::Float, Device::Cpu)) * 0.05)
            .to_kind(Kind::Half)
            .to_device(device);
        (ts, backing)
    }

    pub(super) fn views(backing: &Tensor) -> [Tensor; 2] {
        [backing.narrow(0, 1, 10_001), backing.narrow(0, 10_003, 19_990)]
    }

    pub(super) fn updates_for(n: usize, restore: bool) -> Vec<SgdUpdate> {
        (0..n)
            .map(|j| {
                let m = 1 + j % 3;
                let name = format!("t{j}");
                SgdUpdate {
                    keys: (0..m as u64).map(|s| StreamKey::new(100 + s, &name)).collect(),
                    grads: (0..m).map(|s| 0.75 - s as f32 * 1.5 + j as f32 * 0.01).collect(),
                    lr: 3e-3,
                    weight_decay: (j % 2 == 0).then_some(0.05),
                    restore: restore.then(|| (StreamKey::new(9, &name), 2e-3)),
                }
            })
            .collect()
    }

    /// The multi-tensor sweeps give every tensor the bits of the reference tensor ops.
    #[test]
    fn many_equals_reference_per_tensor() {
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            let (ts, backing) = mixed_tensors(Device::Cpu);
            let vs = views(&backing);
            let all: Vec<&Tensor> = ts.iter().chain(vs.iter()).collect();
            let keys: Vec<StreamKey> = (0..all.len()).map(|j| StreamKey::new(5, &format!("t{j}"))).collect();
            let want: Vec<Tensor> =
                all.iter().zip(&keys).map(|(p, k)| reference_perturb(p, *k, -1e-2, dist)).collect();
            perturb_many_(&all, &keys, -1e-2, dist).unwrap();
            for (j, (p, w)) in all.iter().zip(&want).enumerate() {
                assert!(p.equal(w), "{dist}: tensor {j} ({:?} {:?}) perturb differs", p.kind(), p.size());
            }
            for restore in [false, true] {
                let us = updates_for(all.len(), restore);
                let want: Vec<Tensor> =
                    all.iter().zip(&us).map(|(p, u)| reference_update(p, u, dist)).collect();
                sgd_update_many_(&all, &us, dist).unwrap();
                for (j, (p, w)) in all.iter().zip(&want).enumerate() {
                    assert!(
                        p.equal(w),
                        "{dist} restore {restore}: tensor {j} ({:?} {:?}) update differs",
                        p.kind(),
                        p.size()
                    );
                }
            }
        }
    }

    /// The update with a trailing perturbation gives the bits of the update sweep followed by the
    /// perturb sweep, and of the reference tensor ops (each rounded to the dtype in between):
    /// every dtype, odd lengths, unaligned views, with and without restore and weight decay.
    #[test]
    fn update_then_perturb_equals_the_two_sweeps() {
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            for restore in [false, true] {
                let (ts, backing) = mixed_tensors(Device::Cpu);
                let vs = views(&backing);
                let all: Vec<&Tensor> = ts.iter().chain(vs.iter()).collect();
                let copies: Vec<Tensor> = all.iter().map(|t| t.copy()).collect();
                let seq: Vec<&Tensor> = copies.iter().collect();
                let us = updates_for(all.len(), restore);
                let keys: Vec<StreamKey> =
                    (0..all.len()).map(|j| StreamKey::new(6, &format!("t{j}"))).collect();
                let want: Vec<Tensor> = all
                    .iter()
                    .zip(&us)
                    .zip(&keys)
                    .map(|((p, u), k)| reference_perturb(&reference_update(p, u, dist), *k, 1e-2, dist))
                    .collect();
                sgd_update_then_perturb_many_(&all, &us, &keys, 1e-2, dist).unwrap();
                sgd_update_many_(&seq, &us, dist).unwrap();
                perturb_many_(&seq, &keys, 1e-2, dist).unwrap();
                for (j, ((p, w), q)) in all.iter().zip(&want).zip(&seq).enumerate() {
                    let what =
                        format!("{dist} restore {restore}: tensor {j} ({:?} {:?})", p.kind(), p.size());
                    assert!(p.equal(w), "{what}: differs from the reference");
                    assert!(p.equal(q), "{what}: differs from the two sweeps");
                }
            }
        }
    }

    #[test]
    fn many_refuses_bad_lists_before_writing() {
        let a = Tensor::zeros([100], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([100], (Kind::Float, Device::Cpu));
        let key = StreamKey::new(1, "x");
        let g = Distribution::Gaussian;
        // The same tensor twice, and a view overlapping another tensor of the list.
        for second in [a.shallow_clone(), a.narrow(0, 50, 10)] {
            let e = perturb_many_(&[&b, &a, &second], &[key; 3], 1.0, g).unwrap_err();
            assert!(e.to_string().contains("share memory"), "{e}");
        }
        // Adjacent views do not overlap.
        perturb_many_(&[&a.narrow(0, 0, 50), &a.narrow(0, 50, 50)], &[key; 2], 1.0, g).unwrap();
        let a_before = a.copy();
        let e = perturb_many_(&[&a, &b], &[key], 1.0, g).unwrap_err();
        assert!(e.to_string().contains("2 tensors, 1 keys"), "{e}");
        let bad = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        assert!(perturb_many_(&[&a, &bad], &[key; 2], 1.0, g).is_err());
        let u = SgdUpdate { keys: vec![key], grads: vec![], lr: 1.0, weight_decay: None, restore: None };
        let ok = SgdUpdate { grads: vec![1.0], ..u.clone() };
        let e = sgd_update_many_(&[&a, &b], &[ok, u.clone()], g).unwrap_err();
        assert!(e.to_string().contains("1 keys, 0 gradients"), "{e}");
        let ok = SgdUpdate { grads: vec![1.0], ..u.clone() };
        let e = sgd_update_then_perturb_many_(&[&a, &b], &[ok.clone(), ok], &[key], 1.0, g).unwrap_err();
        assert!(e.to_string().contains("2 tensors, 1 keys"), "{e}");
        assert!(a.equal(&a_before), "a refused list wrote to a tensor");
        // The empty list is a no-op.
        perturb_many_(&[], &[], 1.0, g).unwrap();
        sgd_update_many_(&[], &[], g).unwrap();
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
    use super::tests::{mixed_tensors, updates_for, views};
    use super::*;

    fn cpu_copies(ts: &[&Tensor]) -> Vec<Tensor> {
        ts.iter().map(|t| t.to_device(Device::Cpu)).collect()
    }

    fn assert_same(gpu: &[&Tensor], cpu: &[&Tensor], what: &str) {
        for (j, (g, c)) in gpu.iter().zip(cpu).enumerate() {
            assert!(
                g.to_device(Device::Cpu).equal(c),
                "{what}: tensor {j} ({:?} {:?} on {:?}) differs from the CPU",
                g.kind(),
                g.size(),
                g.device()
            );
        }
    }

    /// A flat state's update on CUDA (one launch, a descriptor per segment by address) equals
    /// the CPU's pass bit for bit: segments of odd lengths (unaligned ones take the scalar path),
    /// one and three directions, with and without weight decay.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_segments_update_equals_cpu() {
        let gpu = Device::Cuda(0);
        let lens = [300usize, 1, 4097, 77, 65_536];
        let flat = Tensor::randn([lens.iter().sum::<usize>() as i64], (Kind::Float, Device::Cpu));
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            for seeds in [vec![5u64], vec![5, 6, 7]] {
                for wd in [None, Some(0.01f32)] {
                    let mut offset = 0;
                    let segs: Vec<Segment> = lens
                        .iter()
                        .enumerate()
                        .map(|(j, &len)| {
                            let keys = seeds.iter().map(|&s| StreamKey::new(s, &format!("s{j}"))).collect();
                            offset += len;
                            Segment { offset: offset - len, len, keys }
                        })
                        .collect();
                    let grads: Vec<f32> = (0..seeds.len()).map(|i| 0.5 - i as f32).collect();
                    let (c, g) = (flat.copy(), flat.to_device(gpu));
                    sgd_update_segments_(&c, &segs, &grads, 1e-2, wd, dist).unwrap();
                    sgd_update_segments_(&g, &segs, &grads, 1e-2, wd, dist).unwrap();
                    assert!(!c.equal(&flat), "the update changed nothing");
                    assert!(
                        g.to_device(Device::Cpu).equal(&c),
                        "{dist} {seeds:?} {wd:?}: CUDA differs from the CPU"
                    );
                }
            }
        }
    }

    /// One sweep of each kind over `gpu` (on any mix of devices) and the same on CPU copies.
    fn sweeps_match_cpu(gpu: &[&Tensor], label: &str) {
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            let cpu_t = cpu_copies(gpu);
            let cpu: Vec<&Tensor> = cpu_t.iter().collect();
            let keys: Vec<StreamKey> = (0..gpu.len()).map(|j| StreamKey::new(77, &format!("p{j}"))).collect();
            perturb_many_(gpu, &keys, 1e-3, dist).unwrap();
            perturb_many_(&cpu, &keys, 1e-3, dist).unwrap();
            assert_same(gpu, &cpu, &format!("{label} {dist}: perturb"));
            perturb_many_(gpu, &keys, -2e-3, dist).unwrap();
            perturb_many_(&cpu, &keys, -2e-3, dist).unwrap();
            assert_same(gpu, &cpu, &format!("{label} {dist}: second perturb"));
            for restore in [false, true] {
                let us = updates_for(gpu.len(), restore);
                sgd_update_many_(gpu, &us, dist).unwrap();
                sgd_update_many_(&cpu, &us, dist).unwrap();
                assert_same(gpu, &cpu, &format!("{label} {dist}: update (restore {restore})"));
                // The next step's first perturbation in the update's sweep (CUDA: one kernel;
                // the CPU: the two passes).
                let next: Vec<StreamKey> =
                    (0..gpu.len()).map(|j| StreamKey::new(78, &format!("p{j}"))).collect();
                sgd_update_then_perturb_many_(gpu, &us, &next, 1e-3, dist).unwrap();
                sgd_update_then_perturb_many_(&cpu, &us, &next, 1e-3, dist).unwrap();
                assert_same(gpu, &cpu, &format!("{label} {dist}: update then perturb (restore {restore})"));
            }
        }
    }

    /// The multi-tensor kernels on cuda:0: fp32, fp16 and bf16 mixed in one launch, lengths from
    /// 0 to 5M (odd ones: the scalar tail), unaligned views (the scalar path), restore or not.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_many_equals_cpu_many() {
        let gpu = Device::Cuda(0);
        crate::cuda::available(gpu).expect("NVRTC kernels build");
        let (mut ts, backing) = mixed_tensors(gpu);
        ts.push(
            (Tensor::randn([5_000_003], (Kind::Float, Device::Cpu)) * 0.05)
                .to_kind(Kind::Half)
                .to_device(gpu),
        );
        let vs = views(&backing);
        let all: Vec<&Tensor> = ts.iter().chain(vs.iter()).collect();
        sweeps_match_cpu(&all, "cuda:0");
        // The same list reversed: a different layout of the launch's index space.
        let rev: Vec<&Tensor> = all.iter().rev().copied().collect();
        sweeps_match_cpu(&rev, "cuda:0 reversed");
    }

    /// More tensors than one launch takes (split into several launches), most of them tiny.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_many_splits_long_lists() {
        let gpu = Device::Cuda(0);
        let ts: Vec<Tensor> = (0..2600)
            .map(|j| {
                let kind = [Kind::Float, Kind::Half, Kind::BFloat16][j % 3];
                let n = [1, 7, 2048, 4099][j % 4];
                (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.05).to_kind(kind).to_device(gpu)
            })
            .collect();
        let all: Vec<&Tensor> = ts.iter().collect();
        sweeps_match_cpu(&all, "2600 tensors");
    }

    /// A model split across GPUs: tensors on cuda:1 alone, and cuda:0, cuda:1 and the CPU in one
    /// list (one launch per device, each in its device's context, with its own table copy).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_many_on_a_second_device() {
        if tch::Cuda::device_count() < 2 {
            println!(
                "skipped: cuda_many_on_a_second_device needs two CUDA devices, this machine has {}",
                tch::Cuda::device_count()
            );
            return;
        }
        let (d0, d1) = (Device::Cuda(0), Device::Cuda(1));
        crate::cuda::available(d1).expect("NVRTC kernels build on cuda:1");
        let (ts1, backing1) = mixed_tensors(d1);
        let vs1 = views(&backing1);
        let only1: Vec<&Tensor> = ts1.iter().chain(vs1.iter()).collect();
        sweeps_match_cpu(&only1, "cuda:1");
        // The single-tensor entry points on cuda:1 too.
        let table0 = GaussTable::new(d0);
        let p = (Tensor::randn([100_003], (Kind::Float, Device::Cpu)) * 0.05).to_kind(Kind::BFloat16);
        let (c, g) = (p.copy(), p.to_device(d1));
        let key = StreamKey::new(3, "w");
        perturb_(&c, key, 1e-3, Distribution::Gaussian, &table0).unwrap();
        perturb_(&g, key, 1e-3, Distribution::Gaussian, &table0).unwrap();
        assert!(c.equal(&g.to_device(Device::Cpu)), "single perturb on cuda:1 differs");
        let (ts0, _) = mixed_tensors(d0);
        let (tc, _) = mixed_tensors(Device::Cpu);
        let mixed: Vec<&Tensor> = ts0.iter().zip(&ts1).flat_map(|(a, b)| [a, b]).chain(tc.iter()).collect();
        sweeps_match_cpu(&mixed, "cuda:0 + cuda:1 + cpu");
        // libtorch still works on both devices afterwards (the contexts were popped again).
        let _ = (&ts0[0] + 1.0).sum(Kind::Float).double_value(&[]);
        let _ = (&ts1[0] + 1.0).sum(Kind::Float).double_value(&[]);
    }

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
                // Restore, update and the next perturbation in one sweep, without and with decay.
                for wd in [None, Some(0.1)] {
                    let u = SgdUpdate { weight_decay: wd, ..u.clone() };
                    let next = [StreamKey::new(78, "w")];
                    sgd_update_then_perturb_many_(&[&c], std::slice::from_ref(&u), &next, 1e-3, dist)
                        .unwrap();
                    sgd_update_then_perturb_many_(&[&g], std::slice::from_ref(&u), &next, 1e-3, dist)
                        .unwrap();
                    assert!(
                        c.equal(&g.to_device(Device::Cpu)),
                        "{kind:?} {dist} decay {wd:?}: update then perturb differs on CUDA"
                    );
                }
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
