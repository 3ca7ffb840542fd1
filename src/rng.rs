//! A tiny deterministic random number generator for synthetic weights and inputs.
//!
//! The crate does not depend on `rand`, and synthetic checkpoints must be the same on every machine and every
//! version, so the generator is spelled out here: SplitMix64 (Steele, Lea, Flood 2014), whose output is a fixed
//! function of the seed. The tests and benches draw their data from it too (`tests/common/mod.rs` has the shared
//! helpers), so there is one generator in the whole crate.

/// SplitMix64: 64 bits of state, full period, passes BigCrush; plenty for test data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl SplitMix64 {
    /// A generator whose whole output stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A generator for a named sub-stream: the same `(seed, name)` always gives the same stream, and different names
    /// give unrelated ones, so parts of a synthetic model can be generated independently (and in parallel).
    pub fn for_stream(seed: u64, name: &str) -> Self {
        // FNV-1a over the name, then mixed with the seed through one SplitMix step.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut mixer = SplitMix64::new(seed ^ h.rotate_left(17));
        SplitMix64::new(mixer.next_u64() ^ h)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 random bits (every value exactly representable).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Uniform integer in `0..bound` (`bound > 0`), by multiply-shift (bias below 2^-32 for the bounds used here).
    pub fn below(&mut self, bound: u64) -> u64 {
        ((self.next_u64() >> 32) * bound) >> 32
    }

    /// A standard normal sample (Box–Muller; the second value of each pair is discarded to keep the stream simple).
    pub fn normal(&mut self) -> f32 {
        // 1 - u is in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        // First outputs of SplitMix64 seeded with 0 (published test vector of the algorithm).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = SplitMix64::for_stream(7, "x");
                move |_| r.next_u64()
            })
            .collect();
        let mut r = SplitMix64::for_stream(7, "x");
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        assert_ne!(SplitMix64::for_stream(7, "y").next_u64(), a[0]);
        assert_ne!(SplitMix64::for_stream(8, "x").next_u64(), a[0]);
    }

    #[test]
    fn moments() {
        let mut r = SplitMix64::new(42);
        let n = 200_000;
        let (mut s, mut s2, mut u) = (0f64, 0f64, 0f64);
        for _ in 0..n {
            let x = r.normal() as f64;
            s += x;
            s2 += x * x;
            let v = r.next_f32();
            assert!((0.0..1.0).contains(&v));
            u += v as f64;
            assert!(r.below(10) < 10);
        }
        let mean = s / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((s2 / n as f64 - 1.0).abs() < 0.02);
        assert!((u / n as f64 - 0.5).abs() < 0.01);
    }
}
