//! The definition of the MeZO perturbation `Z[seed, name, i]`, and its host (f32) reference.
//!
//! MeZO never stores Z: it regenerates it from a seed to perturb, restore and update. For that
//! (and to replay a run, or split it over processes and devices) Z must be a pure function of
//! (seed, parameter name, element index) with the *same bits* on CPU and CUDA. The torch global
//! RNG (Philox on CUDA, MT19937 on CPU, state depending on the call history) cannot do that, so:
//!
//! 1. bits: a counter-based generator made of 32-bit xor / shift / multiply only ([`mix32`]),
//!    which int64 tensor ops compute exactly on any device (see [`crate::ztensor`]);
//! 2. floats: bits are mapped with exactly rounded f32 operations only (int->float conversion of
//!    values < 2^24, multiplies by powers of two, one multiply and one add). No transcendental
//!    function runs on the device: `log`, `cos`, `erfinv`, ... differ in the last ulp between
//!    CPU and CUDA math libraries, so Box-Muller or an on-device erfinv would not give equal bits.
//!    The Gaussian instead uses an inverse-CDF table computed once on the host ([`host_gauss_table`]).
//!
//! Changing anything in this file changes Z and breaks replay of every stored run: the golden
//! tests below pin it.

use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::CoreError;
use crate::normal::inverse_normal_cdf;

/// Multiplier constants of [`mix32`]; both < 2^31 so that `x * C` with x < 2^32 is < 2^63 and
/// fits a (signed) int64 tensor without overflow, on every device.
pub(crate) const MIX_C1: u32 = 0x21f0_aaad;
pub(crate) const MIX_C2: u32 = 0x735a_2d97;
const _: () = assert!(MIX_C1 < 1 << 31 && MIX_C2 < 1 << 31);
/// Shift amounts of [`mix32`].
pub(crate) const MIX_S: [u32; 3] = [16, 15, 15];

/// 32-bit bijective integer mixer (xorshift-multiply, a "hash prospector" finalizer with low bias),
/// constants < 2^31 so a product of a value < 2^32 and a constant fits int64 on the device without
/// overflow. Bijective: xorshift and multiplication by an odd constant are both invertible mod 2^32.
#[inline]
pub fn mix32(x: u32) -> u32 {
    let mut x = x;
    x ^= x >> MIX_S[0];
    x = x.wrapping_mul(MIX_C1);
    x ^= x >> MIX_S[1];
    x = x.wrapping_mul(MIX_C2);
    x ^= x >> MIX_S[2];
    x
}

/// FNV-1a 32-bit over the UTF-8 bytes of a parameter name.
pub fn name_hash(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5, |h: u32, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The per-(seed, parameter) key of the element stream.
///
/// For a fixed name, (a, b) is a bijection of the 64-bit seed (a is bijective in the low half, b in
/// the high half given a), so distinct seeds never share a stream for the same parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub a: u32,
    pub b: u32,
}

impl StreamKey {
    /// a = mix32(name_hash(name) ^ seed as u32); b = mix32(a ^ (seed >> 32) as u32 ^ 0x9E3779B9)
    pub fn new(seed: u64, name: &str) -> Self {
        let a = mix32(name_hash(name) ^ seed as u32);
        let b = mix32(a ^ (seed >> 32) as u32 ^ 0x9E37_79B9);
        StreamKey { a, b }
    }

    /// The element's 32 random bits: mix32(mix32(i ^ b) ^ a). Bijective in i, so the 2^32
    /// elements of one stream never repeat a bit pattern.
    #[inline]
    pub fn bits(self, i: u32) -> u32 {
        mix32(mix32(i ^ self.b) ^ self.a)
    }
}

/// Which distribution Z follows. Both have mean 0 and variance 1 (Gaussian up to the table's
/// truncation at |z| ~ 4.33, variance ~0.9997).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    Gaussian,
    Rademacher,
}

impl FromStr for Distribution {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "gaussian" => Ok(Distribution::Gaussian),
            "rademacher" => Ok(Distribution::Rademacher),
            _ => Err(CoreError::InvalidArgument {
                what: "distribution",
                value: s.into(),
                expected: "gaussian or rademacher",
            }),
        }
    }
}

impl std::fmt::Display for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Distribution::Gaussian => "gaussian",
            Distribution::Rademacher => "rademacher",
        })
    }
}

/// 2^-24 and 2^-16: multiplying by a power of two is exact in f32.
pub(crate) const TWO_POW_M24: f32 = 1.0 / 16_777_216.0;
pub(crate) const TWO_POW_M16: f32 = 1.0 / 65_536.0;

/// Length of both Gaussian table arrays: 2^16 bins need 2^16 + 1 knots.
pub const GAUSS_TABLE_LEN: usize = 65_537;

/// The Gaussian inverse-CDF table on the host. `t[j] = Phi^-1((j + 0.5) / 65537)` rounded to f32;
/// `d[j] = t[j+1] - t[j]` (of the f32 knots, computed in f64, rounded to f32), `d[65536] = 0`.
///
/// A Gaussian is `t[hi] + d[hi] * (lo / 2^16)` with hi, lo the high and low 16 bits: linear
/// interpolation of the inverse CDF between knots, each of the 2^16 bins drawn with probability
/// 2^-16. Why a table: it needs only a gather, one multiply and one add on the device, all exact
/// or correctly rounded, where Box-Muller or erfinv would need transcendental functions whose last
/// ulp differs between CPU and CUDA. The knots at (j + 0.5)/65537 are symmetric
/// (`t[65536 - j] = -t[j]`, `t[32768] = 0`), so Z is symmetric; they stop at |z| = 4.33.
#[derive(Debug)]
pub struct HostGaussTable {
    pub t: Vec<f32>,
    pub d: Vec<f32>,
}

/// The host table, built once per process (~40 ms) from [`inverse_normal_cdf`], which uses only
/// IEEE basic operations so the bits are the same on every platform (a golden checksum pins them).
pub fn host_gauss_table() -> &'static HostGaussTable {
    static TABLE: OnceLock<HostGaussTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let n = GAUSS_TABLE_LEN;
        let mut t = vec![0f32; n];
        // Lower half from its own p (exact tail accuracy), upper half by exact symmetry:
        // (j + 0.5) + (65536 - j + 0.5) = 65537.
        for j in 0..n / 2 {
            let x = inverse_normal_cdf((j as f64 + 0.5) / n as f64) as f32;
            t[j] = x;
            t[n - 1 - j] = -x;
        }
        t[n / 2] = 0.0;
        let mut d: Vec<f32> = t.windows(2).map(|w| (f64::from(w[1]) - f64::from(w[0])) as f32).collect();
        d.push(0.0);
        HostGaussTable { t, d }
    })
}

/// Uniform in [0, 1) with 24 bits: `(bits >> 8) * 2^-24` (both steps exact).
pub fn uniform_of_bits(bits: u32) -> f32 {
    ((bits >> 8) as f32) * TWO_POW_M24
}

/// +-1 from the top bit.
#[inline]
pub fn rademacher_of_bits(bits: u32) -> f32 {
    if bits >> 31 == 1 {
        -1.0
    } else {
        1.0
    }
}

/// Gaussian from the table: `t[hi] + d[hi] * (lo * 2^-16)`, as three separate f32 operations
/// (lo * 2^-16 is exact; then one rounded multiply and one rounded add). Rust never fuses these
/// into an FMA, and neither do separate tensor ops, so host and device agree bit for bit.
pub fn gaussian_of_bits(bits: u32, table: &HostGaussTable) -> f32 {
    let hi = (bits >> 16) as usize;
    let frac = ((bits & 0xFFFF) as f32) * TWO_POW_M16;
    let step = table.d[hi] * frac;
    table.t[hi] + step
}

/// Host reference of Z: element `i` of parameter `name` for direction seed `seed`.
pub fn z_host(seed: u64, name: &str, i: u32, dist: Distribution) -> f32 {
    let bits = StreamKey::new(seed, name).bits(i);
    match dist {
        Distribution::Gaussian => gaussian_of_bits(bits, host_gauss_table()),
        Distribution::Rademacher => rademacher_of_bits(bits),
    }
}

/// Host reference of the uniform variate of the same stream (for sparse masks, sampling, ...).
pub fn uniform_host(seed: u64, name: &str, i: u32) -> f32 {
    uniform_of_bits(StreamKey::new(seed, name).bits(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normal::{normal_cdf, normal_pdf};

    #[test]
    fn name_hash_is_fnv1a() {
        // Published FNV-1a 32 test vectors.
        assert_eq!(name_hash(""), 0x811c_9dc5);
        assert_eq!(name_hash("a"), 0xe40c_292c);
        assert_eq!(name_hash("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn stream_key_uses_all_seed_bits() {
        let name = "model.decoder.layers.0.fc1.weight";
        let base = StreamKey::new(0x0123_4567_89ab_cdef, name);
        for bit in 0..64 {
            assert_ne!(StreamKey::new(0x0123_4567_89ab_cdef ^ (1 << bit), name), base, "bit {bit}");
        }
        assert_ne!(StreamKey::new(7, "a.weight"), StreamKey::new(7, "a.bias"));
    }

    #[test]
    fn distribution_parses() {
        assert_eq!("gaussian".parse::<Distribution>().unwrap(), Distribution::Gaussian);
        assert_eq!("rademacher".parse::<Distribution>().unwrap(), Distribution::Rademacher);
        let err = "normal".parse::<Distribution>().unwrap_err().to_string();
        assert!(err.contains("`normal`") && err.contains("gaussian or rademacher"), "{err}");
        assert_eq!(Distribution::Gaussian.to_string(), "gaussian");
    }

    /// GOLDEN VALUES. These pin the definition of Z (mixer, key derivation, bit-to-float maps,
    /// table). Changing any of them breaks replay of every stored run (runs store seeds, not Z):
    /// never "fix" them to make a change pass.
    #[test]
    fn golden_values() {
        let golden: [(u64, &str, u32, u32, u32); 8] = GOLDEN;
        for (seed, name, i, gauss_bits, unif_bits) in golden {
            let g = z_host(seed, name, i, Distribution::Gaussian);
            let u = uniform_host(seed, name, i);
            assert_eq!(
                (g.to_bits(), u.to_bits()),
                (gauss_bits, unif_bits),
                "Z changed for seed {seed}, name {name:?}, i {i}: gaussian {g} uniform {u}"
            );
        }
        assert_eq!(table_checksum(), GOLDEN_TABLE_CHECKSUM, "Gaussian table bits changed");
    }

    /// (seed, name, i, Gaussian f32 bits, uniform f32 bits)
    const GOLDEN: [(u64, &str, u32, u32, u32); 8] = [
        (0, "", 0, 0xbfc4_fe25, 0x3d7d_8550), // -1.5390059, 0.061894715
        (0, "model.decoder.embed_tokens.weight", 1, 0x3e98_5ab3, 0x3f1d_f2b9), // 0.29756698, 0.6169849
        (1, "model.decoder.layers.0.self_attn.q_proj.weight", 12345, 0x3f9e_e0cc, 0x3f64_8b0a), // 1.2412353, 0.89274657
        (42, "model.decoder.layers.11.fc2.bias", 999_999, 0x3f26_d0f6, 0x3f3e_2070), // 0.651626, 0.74268246
        (u64::MAX, "lm_head.weight", u32::MAX, 0x3fe9_f698, 0x3f77_5a34),            // 1.827838, 0.96622014
        (0xDEAD_BEEF_CAFE_BABE, "model.decoder.final_layer_norm.weight", 7, 0xbfef_ab10, 0x3cfa_6980), // -1.8724079, 0.030567884
        (1 << 63, "model.decoder.layers.23.self_attn.out_proj.weight", 1 << 31, 0xbf3b_c439, 0x3e6d_3174), // -0.73346287, 0.23163396
        (12_345_678_901_234_567_890, "ünïcödé", 65_536, 0xbde5_6271, 0x3ee9_2b6a), // -0.11200417, 0.45540935
    ];
    /// FNV-1a 64 of all the f32 bits of the Gaussian table (t then d).
    const GOLDEN_TABLE_CHECKSUM: u64 = 0x82db_bac5_9d54_9a11;

    /// FNV-1a 64 over the bits of t then d.
    fn table_checksum() -> u64 {
        let tab = host_gauss_table();
        tab.t.iter().chain(&tab.d).fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            x.to_bits().to_le_bytes().iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
        })
    }

    /// What the CUDA kernels rely on to keep only half the table in shared memory: every
    /// difference is one f32 subtraction of its two knots, and the upper half mirrors the lower.
    #[test]
    fn gauss_table_halves_and_differences_are_exact() {
        let tab = host_gauss_table();
        let n = GAUSS_TABLE_LEN;
        for j in 0..n - 1 {
            assert_eq!(tab.d[j].to_bits(), (tab.t[j + 1] - tab.t[j]).to_bits(), "d[{j}]");
            // (The middle knot mirrors to -0.0; the kernel adds a non-negative d*frac to it,
            // which gives +0.0 or the same nonzero value as the host's 0.0 + d*frac.)
            if j != n / 2 {
                assert_eq!(tab.t[n - 1 - j].to_bits(), (-tab.t[j]).to_bits(), "t mirror at {j}");
            }
        }
        for j in 0..n - 1 {
            assert_eq!(tab.d[n - 2 - j].to_bits(), tab.d[j].to_bits(), "d mirror at {j}");
        }
    }

    #[test]
    fn gauss_table_is_the_correctly_rounded_inverse_cdf() {
        let tab = host_gauss_table();
        let n = GAUSS_TABLE_LEN;
        assert_eq!((tab.t.len(), tab.d.len()), (n, n));
        assert_eq!(tab.t[n / 2], 0.0);
        assert_eq!(tab.d[n - 1], 0.0);
        let mut worst_rel = 0.0f64;
        for j in 0..n {
            let p = (j as f64 + 0.5) / n as f64;
            let x = tab.t[j];
            assert_eq!(tab.t[n - 1 - j], -x, "symmetry at {j}");
            if j + 1 < n {
                assert!(tab.t[j + 1] > x, "monotone at {j}");
                assert_eq!(tab.d[j], (f64::from(tab.t[j + 1]) - f64::from(x)) as f32);
            }
            if j >= n / 2 {
                continue; // upper half is the mirror image
            }
            // Phi(t[j]) vs p: relative error limited by rounding t[j] to f32.
            let xf = f64::from(x);
            let got = normal_cdf(xf);
            let rel = ((got - p) / p).abs();
            worst_rel = worst_rel.max(rel);
            let bound = normal_pdf(xf) * xf.abs().max(1e-30) * f64::from(f32::EPSILON) / p;
            assert!(rel <= bound, "j {j}: Phi(t) = {got}, p = {p}, rel {rel:e} > {bound:e}");
            // Correct rounding: p lies between Phi at the midpoints to the neighbouring f32s.
            let below = f64::from(f32::from_bits(x.to_bits() + 1)); // x < 0: +1 ulp is more negative
            let above = f64::from(f32::from_bits(x.to_bits() - 1));
            assert!(
                normal_cdf((xf + below) / 2.0) <= p && p <= normal_cdf((xf + above) / 2.0),
                "t[{j}] = {x} is not Phi^-1({p}) correctly rounded"
            );
        }
        // And the f64 inverse itself, before rounding.
        let mut worst_f64 = 0.0f64;
        for j in (0..n / 2).step_by(7) {
            let p = (j as f64 + 0.5) / n as f64;
            worst_f64 = worst_f64.max(((normal_cdf(inverse_normal_cdf(p)) - p) / p).abs());
        }
        println!("table: max rel |Phi(t[j]) - p|/p = {worst_rel:e} (f32 knots), {worst_f64:e} (f64)");
        assert!(worst_f64 < 1e-14);
    }
}
