//! 64-bit seeds: the per-step direction seeds of a run, and a small host PRNG for data order.
//!
//! All pure and platform independent (integer ops only), so a run is replayable from its
//! `run_seed` alone.

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64 step: the standard constants (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
/// 0x94D049BB133111EB). `splitmix64(s)` is the first output of the splitmix64 stream seeded
/// with `s`; it is a bijection of u64.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Direction seed i of step t of a run: pure, distinct across (run_seed, step, direction).
///
/// Chained bijections: for a fixed (run_seed, step) distinct directions always give distinct
/// seeds, and for a fixed run_seed distinct steps give distinct inner states; any other collision
/// is a 2^-64 accident of a good mixer.
pub fn direction_seed(run_seed: u64, step: u64, direction: u32) -> u64 {
    splitmix64(splitmix64(splitmix64(run_seed) ^ step) ^ u64::from(direction))
}

/// A tiny seeded host PRNG for data shuffles and sampling: the splitmix64 stream
/// (`next_u64` returns `splitmix64(seed)`, `splitmix64(seed + gamma)`, ...).
#[derive(Debug, Clone)]
pub struct HostRng {
    state: u64,
}

impl HostRng {
    pub fn new(seed: u64) -> Self {
        HostRng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.state);
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        out
    }

    /// Uniform in `0..n`, unbiased: rejects the lowest `2^64 mod n` draws so that the accepted
    /// range is a whole number of copies of `0..n`. Panics if n == 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "HostRng::below(0): empty range");
        let reject = n.wrapping_neg() % n; // (2^64 - n) mod n == 2^64 mod n
        loop {
            let x = self.next_u64();
            if x >= reject {
                return x % n;
            }
        }
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn splitmix64_matches_reference_stream() {
        // Reference splitmix64.c seeded with 0.
        let mut r = HostRng::new(0);
        assert_eq!(
            [r.next_u64(), r.next_u64(), r.next_u64()],
            [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]
        );
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn below_in_range_and_uniform() {
        let mut r = HostRng::new(99);
        let n = 10u64;
        let draws = 200_000;
        let mut counts = [0u32; 10];
        for _ in 0..draws {
            let x = r.below(n);
            assert!(x < n);
            counts[x as usize] += 1;
        }
        // chi-square, 9 degrees of freedom: 99.9% quantile is 27.9
        let expect = f64::from(draws) / n as f64;
        let chi2: f64 = counts.iter().map(|&c| (f64::from(c) - expect).powi(2) / expect).sum();
        assert!(chi2 < 27.9, "chi2 {chi2}, counts {counts:?}");
        assert_eq!(r.below(1), 0);
        // A range just above 2^63 rejects almost half the draws and must still terminate in range.
        let big = (1u64 << 63) + 12_345;
        assert!((0..1000).all(|_| r.below(big) < big));
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let base: Vec<u32> = (0..1000).collect();
        let shuffled = |seed| {
            let mut v = base.clone();
            HostRng::new(seed).shuffle(&mut v);
            v
        };
        let a = shuffled(7);
        assert_eq!(a, shuffled(7));
        assert_ne!(a, shuffled(8));
        assert_ne!(a, base);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, base);
        // Each position is uniform over seeds: position 0 takes many distinct values.
        let firsts: HashSet<u32> = (0..200).map(|s| shuffled(s)[0]).collect();
        assert!(firsts.len() > 150);
        let mut empty: [u8; 0] = [];
        HostRng::new(1).shuffle(&mut empty);
    }

    #[test]
    fn direction_seeds_are_distinct() {
        let mut seen = HashSet::new();
        for run in [0, 1, 2, 42, u64::MAX, 1 << 63] {
            for step in 0..200 {
                for dir in 0..16 {
                    assert!(seen.insert(direction_seed(run, step, dir)), "{run} {step} {dir}");
                }
            }
        }
        assert_eq!(direction_seed(5, 6, 7), direction_seed(5, 6, 7));
    }
}
