//! FP8 E4M3 numerics on the CPU, bit-exact with CUDA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)`, and
//! UE8M0 (power-of-two) scale helpers.
//!
//! E4M3 ("fn" variant, as used by NVIDIA and DeepSeek): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no
//! infinities, one NaN pattern per sign (`S.1111.111`), largest finite value 448, smallest subnormal 2^-9.

use bytemuck::{Pod, Zeroable};

/// One FP8 E4M3 value, stored as its bit pattern.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct E4M3(pub u8);

// SAFETY: E4M3 is a transparent wrapper over u8, so it has the same layout on host and device and every bit pattern
// (including zero) is a valid value.
unsafe impl cudarc::driver::DeviceRepr for E4M3 {}
unsafe impl cudarc::driver::ValidAsZeroBits for E4M3 {}

impl std::fmt::Debug for E4M3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "E4M3({:#04x} = {})", self.0, self.to_f32())
    }
}

impl E4M3 {
    /// Largest finite magnitude, 1.75 · 2^8.
    pub const MAX: f32 = 448.0;
    /// Smallest positive normal value, 2^-6.
    pub const MIN_POSITIVE_NORMAL: f32 = 0.015625;
    /// Smallest positive subnormal value, 2^-9.
    pub const MIN_POSITIVE_SUBNORMAL: f32 = 0.001953125;
    /// The canonical NaN (`0x7f`).
    pub const NAN: E4M3 = E4M3(0x7f);
    /// +0.
    pub const ZERO: E4M3 = E4M3(0);

    /// Wraps raw bits.
    pub const fn from_bits(bits: u8) -> Self {
        E4M3(bits)
    }

    /// The raw bits.
    pub const fn to_bits(self) -> u8 {
        self.0
    }

    /// True for the two NaN patterns.
    pub const fn is_nan(self) -> bool {
        self.0 & 0x7f == 0x7f
    }

    /// Rounds to nearest (ties to even), saturating finite overflow and ±infinity to ±448; NaN stays NaN.
    pub fn from_f32(x: f32) -> Self {
        if x.is_nan() {
            return E4M3::NAN;
        }
        let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = (x as f64).abs();
        if a.is_infinite() {
            return E4M3(sign | 0x7e);
        }
        let min_normal = E4M3::MIN_POSITIVE_NORMAL as f64;
        let magnitude: u8 = if a < min_normal {
            // Subnormals are multiples of 2^-9; q == 8 lands exactly on the smallest normal, whose code is also 8.
            (a * 512.0).round_ties_even() as u8
        } else {
            let exponent = a.log2().floor() as i32;
            // log2 of values a hair below a power of two can round up; fix the exponent so that 1 <= a / 2^e < 2.
            let mut e = exponent;
            if a < 2f64.powi(e) {
                e -= 1;
            } else if a >= 2f64.powi(e + 1) {
                e += 1;
            }
            let significand = a / 2f64.powi(e); // exact: dividing by a power of two
            let mut mantissa = ((significand - 1.0) * 8.0).round_ties_even() as i32;
            if mantissa == 8 {
                mantissa = 0;
                e += 1;
            }
            let biased = e + 7;
            if biased > 15 || (biased == 15 && mantissa == 7) {
                0x7e // saturate to 448
            } else {
                ((biased as u8) << 3) | mantissa as u8
            }
        };
        E4M3(sign | magnitude)
    }

    /// Exact conversion to f32.
    pub fn to_f32(self) -> f32 {
        let sign = if self.0 & 0x80 != 0 { -1.0f32 } else { 1.0 };
        let exponent = ((self.0 >> 3) & 0x0f) as i32;
        let mantissa = (self.0 & 0x07) as f32;
        if exponent == 15 && mantissa == 7.0 {
            return f32::NAN;
        }
        let magnitude = if exponent == 0 {
            mantissa * E4M3::MIN_POSITIVE_SUBNORMAL
        } else {
            (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
        };
        sign * magnitude
    }

    /// Converts a slice.
    pub fn quantize_slice(xs: &[f32]) -> Vec<E4M3> {
        xs.iter().map(|&x| E4M3::from_f32(x)).collect()
    }

    /// Converts a slice back to f32.
    pub fn dequantize_slice(xs: &[E4M3]) -> Vec<f32> {
        xs.iter().map(|x| x.to_f32()).collect()
    }
}

impl From<E4M3> for f32 {
    fn from(x: E4M3) -> f32 {
        x.to_f32()
    }
}

/// UE8M0: an unsigned power-of-two scale stored as its 8-bit biased exponent (value = 2^(code − 127)), the scale
/// format of DeepSeek V3.1+/Blackwell checkpoints. Code 255 is NaN.
pub mod ue8m0 {
    /// Rounds a positive, finite, normal f32 up to the next power of two (a power of two stays as it is). This is
    /// a bit operation, the same on CPU and GPU: clear the mantissa and, if it was non-zero, bump the exponent.
    pub fn round_up_pow2(scale: f32) -> f32 {
        let bits = scale.to_bits();
        let mantissa = bits & 0x007f_ffff;
        let exponent_bits = bits & 0x7f80_0000;
        if mantissa == 0 {
            f32::from_bits(exponent_bits)
        } else {
            f32::from_bits(exponent_bits + 0x0080_0000)
        }
    }

    /// Encodes a power-of-two scale as its biased exponent. Returns `None` when `scale` is not a positive normal
    /// power of two.
    pub fn encode(scale: f32) -> Option<u8> {
        let bits = scale.to_bits();
        if scale <= 0.0 || !scale.is_normal() || bits & 0x007f_ffff != 0 {
            return None;
        }
        Some((bits >> 23) as u8)
    }

    /// Decodes a biased exponent back to the f32 scale (`255` is NaN, `0` is 2^-127, a subnormal).
    pub fn decode(code: u8) -> f32 {
        match code {
            255 => f32::NAN,
            0 => f32::from_bits(0x0040_0000),
            c => f32::from_bits((c as u32) << 23),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes() {
        assert_eq!(E4M3(0x00).to_f32(), 0.0);
        assert_eq!(E4M3(0x01).to_f32(), 2f32.powi(-9));
        assert_eq!(E4M3(0x07).to_f32(), 7.0 * 2f32.powi(-9));
        assert_eq!(E4M3(0x08).to_f32(), 2f32.powi(-6));
        assert_eq!(E4M3(0x38).to_f32(), 1.0);
        assert_eq!(E4M3(0x7e).to_f32(), 448.0);
        assert_eq!(E4M3(0xfe).to_f32(), -448.0);
        assert!(E4M3(0x7f).to_f32().is_nan());
        assert!(E4M3(0xff).to_f32().is_nan());
        assert_eq!(E4M3(0x80).to_f32(), 0.0);
        assert!(E4M3(0x80).to_f32().is_sign_negative());
    }

    #[test]
    fn every_code_round_trips() {
        for bits in 0u8..=255 {
            let x = E4M3(bits);
            let f = x.to_f32();
            if x.is_nan() {
                assert!(f.is_nan());
                assert!(E4M3::from_f32(f).is_nan());
            } else {
                assert_eq!(E4M3::from_f32(f), x, "code {bits:#04x} -> {f}");
            }
        }
    }

    /// All finite non-negative values in increasing order.
    fn positive_values() -> Vec<(u8, f32)> {
        (0u8..0x7f).map(|b| (b, E4M3(b).to_f32())).collect()
    }

    #[test]
    fn values_are_monotonic() {
        let v = positive_values();
        for w in v.windows(2) {
            assert!(w[0].1 < w[1].1);
        }
    }

    #[test]
    fn rounding_at_every_midpoint_is_to_even() {
        let v = positive_values();
        for w in v.windows(2) {
            let (lo_code, lo) = w[0];
            let (hi_code, hi) = w[1];
            let mid = (lo + hi) / 2.0; // exact in f32: both are short dyadic rationals
            let even = if lo_code % 2 == 0 { lo_code } else { hi_code };
            assert_eq!(E4M3::from_f32(mid).0, even, "midpoint of {lo} and {hi}");
            assert_eq!(E4M3::from_f32(-mid).0, even | 0x80);
            // Just either side of the midpoint goes to the nearer value.
            let below = f32::from_bits(mid.to_bits() - 1);
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(E4M3::from_f32(below).0, lo_code, "just below midpoint of {lo} and {hi}");
            assert_eq!(E4M3::from_f32(above).0, hi_code, "just above midpoint of {lo} and {hi}");
        }
    }

    #[test]
    fn saturates_and_keeps_nan() {
        assert_eq!(E4M3::from_f32(448.0).0, 0x7e);
        assert_eq!(E4M3::from_f32(463.99).0, 0x7e);
        assert_eq!(E4M3::from_f32(464.0).0, 0x7e);
        assert_eq!(E4M3::from_f32(1.0e6).0, 0x7e);
        assert_eq!(E4M3::from_f32(f32::INFINITY).0, 0x7e);
        assert_eq!(E4M3::from_f32(f32::NEG_INFINITY).0, 0xfe);
        assert_eq!(E4M3::from_f32(f32::MAX).0, 0x7e);
        assert!(E4M3::from_f32(f32::NAN).is_nan());
        // Below half the smallest subnormal rounds to zero; exactly half is a tie to even (zero).
        assert_eq!(E4M3::from_f32(2f32.powi(-10)).0, 0x00);
        assert_eq!(E4M3::from_f32(2f32.powi(-10) * 1.0001).0, 0x01);
        assert_eq!(E4M3::from_f32(-1e-30).0, 0x80);
        assert_eq!(E4M3::from_f32(f32::MIN_POSITIVE / 4.0).0, 0x00);
    }

    #[test]
    fn quantization_error_is_at_most_half_an_ulp() {
        let v = positive_values();
        let mut x = 1e-4f32;
        while x < 448.0 {
            let q = E4M3::from_f32(x).to_f32();
            let (i, _) = v.iter().enumerate().min_by(|a, b| (a.1 .1 - x).abs().total_cmp(&(b.1 .1 - x).abs())).unwrap();
            let best = v[i].1;
            assert!((q - x).abs() <= (best - x).abs(), "{x}: got {q}, nearest {best}");
            x *= 1.013;
        }
    }

    #[test]
    fn ue8m0_rounds_up_and_round_trips() {
        assert_eq!(ue8m0::round_up_pow2(1.0), 1.0);
        assert_eq!(ue8m0::round_up_pow2(1.0000001), 2.0);
        assert_eq!(ue8m0::round_up_pow2(0.75), 1.0);
        assert_eq!(ue8m0::round_up_pow2(3.0 / 448.0), 2f32.powi(-7));
        for e in -126i32..=127 {
            let s = 2f32.powi(e);
            let code = ue8m0::encode(s).unwrap();
            assert_eq!(code as i32, e + 127);
            assert_eq!(ue8m0::decode(code), s);
        }
        assert_eq!(ue8m0::encode(3.0), None);
        assert_eq!(ue8m0::encode(0.0), None);
        assert_eq!(ue8m0::encode(-2.0), None);
        assert!(ue8m0::decode(255).is_nan());
    }
}
