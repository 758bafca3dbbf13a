//! The standard normal distribution in f64 on the host: `erfc`, `Phi` and `Phi^-1`.
//!
//! Only used to build the Gaussian inverse-CDF table ([`crate::rng::host_gauss_table`]), whose
//! f32 bits are part of the definition of Z. So these functions are written with IEEE-754 basic
//! operations only (`+ - * /`, `sqrt`, exact rounding/bit tricks): those are correctly rounded on
//! every platform, while the platform libm's `exp`/`ln` may differ in the last ulp between glibc,
//! musl, macOS, ..., which could flip the f32 rounding of a table entry and so change Z. Rust never
//! contracts `a * b + c` into an FMA by itself, so the same source gives the same bits everywhere.

use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI, PI, SQRT_2};

// ln 2 split in two (fdlibm's constants, as published): `k * LN2_HI` is exact for |k| < 2^20.
#[allow(clippy::excessive_precision)]
const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
#[allow(clippy::excessive_precision)]
const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;

/// `2^k` for a normal-range exponent, built from bits (exact).
fn pow2(k: i64) -> f64 {
    assert!((-1022..=1023).contains(&k), "2^{k} out of the normal f64 range");
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// e^x to a few ulp, for |x| <= 700: x = k ln2 + r with |r| <= ln2/2, then a degree-18 Taylor
/// polynomial of e^r (last term < 1e-19 for |r| <= 0.35).
pub(crate) fn exp(x: f64) -> f64 {
    assert!(x.abs() <= 700.0, "exp({x}) out of range");
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0;
    for n in (1..=18).rev() {
        p = 1.0 + p * r / f64::from(n);
    }
    p * pow2(k as i64)
}

/// Natural log to a few ulp for normal positive x: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
/// ln m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.172, by its odd series (22 terms).
pub(crate) fn ln(x: f64) -> f64 {
    assert!(x.is_normal() && x > 0.0, "ln({x}): only normal positive values");
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut acc = 1.0 / 43.0;
    for k in (0..21).rev() {
        acc = 1.0 / f64::from(2 * k + 1) + s2 * acc;
    }
    let e = e as f64;
    e * LN2_HI + (e * LN2_LO + 2.0 * s * acc)
}

/// Below this, erfc = 1 - erf with erf from its series (erfc(0.75) = 0.29, so the subtraction
/// loses < 2 bits); at and above it, the Laplace continued fraction, which takes < 350 steps there
/// (at 1.5 the subtraction would already lose ~1e-14 of relative accuracy).
const ERFC_SERIES_MAX: f64 = 0.75;

/// erf(x) = 2/sqrt(pi) e^{-x^2} sum_n (2x^2)^n x / (2n+1)!!, for |x| < 1 or so: all terms have
/// the sign of x, so no cancellation inside the sum, and relative accuracy ~1e-16 even near 0.
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let (mut term, mut sum) = (x, x);
    let mut n = 0.0;
    while term.abs() > sum.abs() * 1e-18 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    FRAC_2_SQRT_PI * exp(-x2) * sum
}

/// Complementary error function, relative error ~1e-15 for x in [-6, 26] (tested against
/// 40-digit values).
pub fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < ERFC_SERIES_MAX {
        return 1.0 - erf_series(x);
    }
    erfc_cf(x).0
}

/// erfc(x) = e^{-x^2}/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + ...))))), evaluated
/// forwards by modified Lentz until a step changes it by < 1e-17; also returns the step count.
fn erfc_cf(x: f64) -> (f64, u32) {
    let tiny = 1e-300;
    let (mut f, mut c, mut d) = (x, x, 0.0);
    for n in 1..100_000 {
        let a = f64::from(n) * 0.5;
        d = x + a * d;
        if d.abs() < tiny {
            d = tiny;
        }
        d = 1.0 / d;
        c = x + a / c;
        if c.abs() < tiny {
            c = tiny;
        }
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-17 {
            return (exp(-x * x) * (0.5 * FRAC_2_SQRT_PI) / f, n);
        }
    }
    unreachable!("erfc({x}): continued fraction did not converge")
}

/// Standard normal CDF `Phi(x) = erfc(-x/sqrt 2) / 2`; relative accuracy ~1e-15 in the lower
/// tail (x <= 0), which is where the table is built.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x * FRAC_1_SQRT_2)
}

/// Standard normal density.
pub fn normal_pdf(x: f64) -> f64 {
    exp(-0.5 * x * x) / (2.0 * PI).sqrt()
}

/// `Phi^-1(p)` for p in (0, 1): Acklam's rational approximation (relative error 1.15e-9) refined
/// by two Halley steps on `Phi(x) - p` (each step cubes the error), so the result is limited by the
/// accuracy of [`normal_cdf`]: relative error ~1e-15 for p <= 1/2. For p > 1/2 it uses the symmetry `Phi^-1(p) = -Phi^-1(1-p)`.
#[allow(clippy::excessive_precision)] // Acklam's coefficients as published
pub fn inverse_normal_cdf(p: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0, "inverse_normal_cdf({p}): p must be in (0, 1)");
    if p > 0.5 {
        return -inverse_normal_cdf(1.0 - p);
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_690e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let mut x = if p < 0.02425 {
        let q = (-2.0 * ln(p)).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    let sqrt_2pi = (2.0 * PI).sqrt();
    for _ in 0..2 {
        // Near the centre Phi(x) - p cancels: write it as -erf(-x/sqrt2)/2 - (p - 1/2), where
        // p - 1/2 is exact for p in [1/4, 1/2] (Sterbenz), so small x keep their relative accuracy.
        let e = if p >= 0.25 { -0.5 * erf_series(-x * FRAC_1_SQRT_2) - (p - 0.5) } else { normal_cdf(x) - p };
        let u = e * sqrt_2pi * exp(0.5 * x * x);
        x -= u / (1.0 + 0.5 * x * u);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        ((a - b) / b).abs()
    }

    #[test]
    fn exp_and_ln_are_accurate() {
        // std's libm is fine as a reference for accuracy (just not for cross-platform bits).
        for i in -2000..=2000 {
            let x = f64::from(i) * 0.0173;
            assert!(rel(exp(x), x.exp()) < 4e-16, "exp({x})");
            let y = exp(x * 0.3);
            assert!((ln(y) - y.ln()).abs() < 4e-16 * y.ln().abs().max(1.0), "ln({y})");
        }
    }

    #[test]
    #[allow(clippy::excessive_precision)] // reference digits as mpmath printed them
    fn erfc_matches_40_digit_values() {
        // mpmath at 40 digits, of the exact f64 inputs (0.1 is not 1/10: that matters at 1e-15).
        let golden = [
            (0.1, 0.887537083981715101595),
            (0.5, 0.479500122186953462317),
            (0.6, 0.396143909152074094918),
            (0.75, 0.288844366346484868401),
            (0.9, 0.203091787577167860335),
            (1.0, 0.157299207050285130659),
            (1.3, 0.0659920550593475541498),
            (1.41, 0.0461475606402945575059),
            (1.49, 0.0351021351567957889855),
            (1.5, 0.033894853524689272933),
            (2.0, 0.00467773498104726583793),
            (3.0, 0.0000220904969985854413728),
            (3.1, 0.0000116486573671995893135),
            (4.0, 1.54172579002800188522e-8),
            (5.0, 1.53745979442803485019e-12),
        ];
        let mut worst = 0.0f64;
        for (x, want) in golden {
            let e = rel(erfc(x), want);
            worst = worst.max(e);
            assert!(e < 2e-15, "erfc({x}) = {} want {want}: rel err {e:e}", erfc(x));
        }
        println!("erfc worst relative error vs mpmath: {worst:e}");
        assert!(rel(erfc(-1.0), 2.0 - 0.15729920705028513066) < 1e-15);
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn inverse_normal_cdf_matches_40_digit_values() {
        let golden = [
            (1e-5, -4.26489079392282461023),
            (0.001, -3.09023230616781353536),
            (0.02, -2.05374891063182304434),
            (0.25, -0.674489750196081743202),
            (0.3, -0.524400512708040815969),
            (0.4999, -0.000250662830088007492389),
        ];
        let mut worst = 0.0f64;
        for (p, want) in golden {
            let x = inverse_normal_cdf(p);
            worst = worst.max(rel(x, want));
            assert!(rel(x, want) < 2e-15, "Phi^-1({p}) = {x} want {want}");
            assert!(rel(-inverse_normal_cdf(1.0 - p), want) < 1e-11);
        }
        println!("Phi^-1 worst relative error vs mpmath: {worst:e}");
        assert_eq!(inverse_normal_cdf(0.5), 0.0);
    }
}
