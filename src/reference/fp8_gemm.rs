//! FP8 block-scaled GEMM reference (DeepSeek-V3's contract):
//! `D[m, n] = Σ_k A[m, k] · B[n, k] · sa[m, k/128] · sb[n/128, k/128]`, A and B E4M3 row-major (K-major, "NT").
//!
//! Scales here are row-major: `sa` is `[m, ceil(k/128)]` (per 1×128 group of A), `sb` is `[ceil(n/128),
//! ceil(k/128)]` (per 128×128 block of B). The GPU kernels read `sa` MN-major; convert with
//! [`crate::reference::quant::scales_from_mn_major`].
//!
//! Besides the f64 ground truth, this module models Hopper's limited-precision FP8 tensor-core accumulation
//! ([`fp8_gemm_limited_acc`]) so the need for promotion can be shown on the CPU, and provides DeepGEMM's
//! similarity metric [`calc_diff`].

use crate::error::{Error, Result};
use crate::fp8::E4M3;

/// Scale-group width along K (and block height along N for B).
pub const BLOCK: usize = 128;

/// Explicit mantissa bits kept by the modelled FP8 tensor-core accumulator. DeepSeek-V3's report measures roughly
/// 14 bits of precision for Hopper's FP8 MMA accumulation (13 explicit + the implicit one).
pub const FP8_ACC_MANTISSA_BITS: u32 = 13;

/// Width along K of one modelled tensor-core step whose internal sum is exact before it meets the accumulator
/// (one `wgmma ... k32` instruction).
pub const FP8_MMA_K: usize = 32;

fn check(a: &[E4M3], sa: &[f32], b: &[E4M3], sb: &[f32], m: usize, n: usize, k: usize) -> Result<()> {
    let mul = |arg: &'static str, x: usize, y: usize| {
        x.checked_mul(y).ok_or_else(|| Error::shape(arg, "a size that fits in usize", format!("{x}×{y}")))
    };
    let kb = k.div_ceil(BLOCK);
    for (arg, len, want) in [
        ("a", a.len(), mul("a", m, k)?),
        ("b", b.len(), mul("b", n, k)?),
        ("sa", sa.len(), mul("sa", m, kb)?),
        ("sb", sb.len(), mul("sb", n.div_ceil(BLOCK), kb)?),
    ] {
        if len != want {
            return Err(Error::shape(arg, want, len));
        }
    }
    Ok(())
}

fn decode_table() -> [f64; 256] {
    let mut t = [0f64; 256];
    for (code, v) in t.iter_mut().enumerate() {
        *v = f64::from(E4M3(code as u8).to_f32());
    }
    t
}

/// f64 dot product with four partial sums: E4M3 products are exact in f64 and a 128-long sum of them loses at most a
/// few ulps of f64 in any order, so the split only buys speed (it vectorizes).
fn dot_f64(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (xc, yc) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail: f64 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for i in 0..4 {
            acc[i] += a[i] * b[i];
        }
    }
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

/// The reference: f64 accumulation of each 128-wide K group, scaled by `sa · sb` (both widened to f64) and summed in
/// f64. Returns row-major `[m, n]` f32 (one rounding at the end).
pub fn fp8_gemm(a: &[E4M3], sa: &[f32], b: &[E4M3], sb: &[f32], m: usize, n: usize, k: usize) -> Result<Vec<f32>> {
    let rows: Vec<usize> = (0..m).collect();
    fp8_gemm_rows(a, sa, b, sb, m, n, k, &rows)
}

/// [`fp8_gemm`] for a subset of output rows (for spot-checking large GPU results): returns `[rows.len(), n]`.
#[allow(clippy::too_many_arguments)]
pub fn fp8_gemm_rows(
    a: &[E4M3],
    sa: &[f32],
    b: &[E4M3],
    sb: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rows: &[usize],
) -> Result<Vec<f32>> {
    check(a, sa, b, sb, m, n, k)?;
    if let Some((position, &bad)) = rows.iter().enumerate().find(|(_, &r)| r >= m) {
        return Err(Error::IndexOutOfRange { arg: "rows", position, value: bad as i64, bound: m as i64 });
    }
    let lut = decode_table();
    let kb = k.div_ceil(BLOCK);
    // Decode the requested rows of A once, then stream B row by row (memory stays O((rows + 1)·k)).
    let arows: Vec<f64> = rows.iter().flat_map(|&i| a[i * k..(i + 1) * k].iter().map(|c| lut[c.0 as usize])).collect();
    let mut out = vec![0f32; rows.len() * n];
    let mut brow = vec![0f64; k];
    for j in 0..n {
        for (x, c) in brow.iter_mut().zip(&b[j * k..(j + 1) * k]) {
            *x = lut[c.0 as usize];
        }
        for (oi, &i) in rows.iter().enumerate() {
            let arow = &arows[oi * k..(oi + 1) * k];
            let mut acc = 0f64;
            for g in 0..kb {
                let (k0, k1) = (g * BLOCK, ((g + 1) * BLOCK).min(k));
                let part = dot_f64(&arow[k0..k1], &brow[k0..k1]);
                acc += part * f64::from(sa[i * kb + g]) * f64::from(sb[(j / BLOCK) * kb + g]);
            }
            out[oi * n + j] = acc as f32;
        }
    }
    Ok(out)
}

/// Rounds `x` toward zero to `bits` explicit mantissa bits (the modelled tensor-core accumulator register).
pub fn truncate_mantissa(x: f32, bits: u32) -> f32 {
    if !x.is_finite() || bits >= 23 {
        return x;
    }
    let mask = !((1u32 << (23 - bits)) - 1);
    f32::from_bits(x.to_bits() & mask)
}

/// A model of Hopper's FP8 GEMM numerics: each [`FP8_MMA_K`]-wide slice of products (scaled by `sa · sb`) is summed
/// exactly, then added into a low-precision accumulator that keeps [`FP8_ACC_MANTISSA_BITS`] explicit mantissa bits
/// (truncating, which biases the error the same way every step). Every `promote_every` elements of K the low-precision
/// accumulator is added into an fp32 accumulator and cleared: DeepGEMM's "promotion". `promote_every ≥ k` means no
/// promotion at all. `promote_every` must be a positive multiple of [`FP8_MMA_K`].
///
/// Folding the scales in before the low-precision sum is a simplification (the hardware scales after the MMA), but
/// the rounding error is relative, so the model reproduces the drift that grows with the number of low-precision
/// additions.
#[allow(clippy::too_many_arguments)]
pub fn fp8_gemm_limited_acc(
    a: &[E4M3],
    sa: &[f32],
    b: &[E4M3],
    sb: &[f32],
    m: usize,
    n: usize,
    k: usize,
    promote_every: usize,
) -> Result<Vec<f32>> {
    check(a, sa, b, sb, m, n, k)?;
    if promote_every == 0 || !promote_every.is_multiple_of(FP8_MMA_K) {
        return Err(Error::InvalidConfig(format!(
            "promote_every must be a positive multiple of {FP8_MMA_K}, got {promote_every}"
        )));
    }
    let lut = decode_table();
    let kb = k.div_ceil(BLOCK);
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut promoted = 0f32;
            let mut low = 0f32;
            let mut k0 = 0;
            while k0 < k {
                let k1 = (k0 + FP8_MMA_K).min(k);
                let mut step = 0f64;
                for kk in k0..k1 {
                    let s = f64::from(sa[i * kb + kk / BLOCK]) * f64::from(sb[(j / BLOCK) * kb + kk / BLOCK]);
                    step += lut[a[i * k + kk].0 as usize] * lut[b[j * k + kk].0 as usize] * s;
                }
                low = truncate_mantissa(low + step as f32, FP8_ACC_MANTISSA_BITS);
                k0 = k1;
                if k0 % promote_every == 0 || k0 == k {
                    promoted += low;
                    low = 0.0;
                }
            }
            out[i * n + j] = promoted;
        }
    }
    Ok(out)
}

/// DeepGEMM's similarity metric `1 − 2Σxy / Σ(x² + y²)` in f64: 0 for identical vectors, ≈ ½·(relative L2 error)²
/// for close ones. Returns 0 for two all-zero vectors and 1 for different lengths.
pub fn calc_diff(x: &[f32], y: &[f32]) -> f64 {
    if x.len() != y.len() {
        return 1.0;
    }
    let (mut xy, mut sq) = (0f64, 0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (f64::from(a), f64::from(b));
        xy += a * b;
        sq += a * a + b * b;
    }
    if sq == 0.0 {
        return 0.0;
    }
    1.0 - 2.0 * xy / sq
}

/// Largest `|x − y|` over the two slices (infinite when a value is NaN or the lengths differ).
pub fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
    if x.len() != y.len() {
        return f32::INFINITY;
    }
    x.iter().zip(y).fold(0f32, |m, (&a, &b)| {
        let d = (a - b).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::quant::quantize_per_token_group;
    use crate::reference::quant::{dequantize_per_block, dequantize_per_token_group, quantize_per_block};

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32) / (1u64 << 24) as f32
        }
    }

    fn naive(a: &[E4M3], sa: &[f32], b: &[E4M3], sb: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let ad = dequantize_per_token_group(a, sa, m, k, BLOCK).unwrap();
        let bd = dequantize_per_block(b, sb, n, k, BLOCK).unwrap();
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|kk| f64::from(ad[i * k + kk]) * f64::from(bd[j * k + kk])).sum();
            }
        }
        out
    }

    fn random_problem(m: usize, n: usize, k: usize, seed: u64) -> (Vec<E4M3>, Vec<f32>, Vec<E4M3>, Vec<f32>) {
        let mut r = Lcg(seed);
        let x: Vec<f32> = (0..m * k).map(|_| (r.next() - 0.5) * 6.0).collect();
        let w: Vec<f32> = (0..n * k).map(|_| (r.next() - 0.5) * 0.2).collect();
        let (a, sa) = quantize_per_token_group(&x, m, k, BLOCK).unwrap();
        let (b, sb) = quantize_per_block(&w, n, k, BLOCK).unwrap();
        (a, sa, b, sb)
    }

    #[test]
    fn hand_computed() {
        // m=1, n=2, k=3: one K group. A = [1, 2, 0.5], B rows [1, 1, 1] and [-2, 0.25, 4].
        let a = E4M3::quantize_slice(&[1.0, 2.0, 0.5]);
        let b = E4M3::quantize_slice(&[1.0, 1.0, 1.0, -2.0, 0.25, 4.0]);
        let d = fp8_gemm(&a, &[2.0], &b, &[0.5], 1, 2, 3).unwrap();
        assert_eq!(d, vec![3.5, 0.5]);
        // Two K groups with different scales: k = 130, A ones, B ones, sa = [1, 3], sb = [2, 10].
        let a = vec![E4M3::from_f32(1.0); 130];
        let b = vec![E4M3::from_f32(1.0); 130];
        let d = fp8_gemm(&a, &[1.0, 3.0], &b, &[2.0, 10.0], 1, 1, 130).unwrap();
        assert_eq!(d, vec![128.0 * 2.0 + 2.0 * 30.0]);
    }

    #[test]
    fn n_block_scale_indexing() {
        // n = 130: rows 128, 129 use the second sb row.
        let (m, n, k) = (1, 130, 4);
        let a = vec![E4M3::from_f32(1.0); m * k];
        let b = vec![E4M3::from_f32(0.5); n * k];
        let d = fp8_gemm(&a, &[1.0], &b, &[1.0, 4.0], m, n, k).unwrap();
        assert!(d[..128].iter().all(|&v| v == 2.0));
        assert!(d[128..].iter().all(|&v| v == 8.0));
    }

    #[test]
    fn matches_naive_dequantized_matmul() {
        for &(m, n, k) in &[(3, 5, 7), (4, 130, 256), (9, 129, 300), (2, 256, 512)] {
            let (a, sa, b, sb) = random_problem(m, n, k, (m * 1000 + n * 10 + k) as u64);
            let d = fp8_gemm(&a, &sa, &b, &sb, m, n, k).unwrap();
            let want = naive(&a, &sa, &b, &sb, m, n, k);
            for (x, y) in d.iter().zip(&want) {
                assert!((f64::from(*x) - y).abs() <= 1e-6 * (1.0 + y.abs()), "{m}x{n}x{k}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn rows_subset_matches_full() {
        let (m, n, k) = (6, 40, 200);
        let (a, sa, b, sb) = random_problem(m, n, k, 7);
        let full = fp8_gemm(&a, &sa, &b, &sb, m, n, k).unwrap();
        let sub = fp8_gemm_rows(&a, &sa, &b, &sb, m, n, k, &[5, 0, 3]).unwrap();
        for (oi, &i) in [5usize, 0, 3].iter().enumerate() {
            assert_eq!(&sub[oi * n..(oi + 1) * n], &full[i * n..(i + 1) * n]);
        }
        assert!(fp8_gemm_rows(&a, &sa, &b, &sb, m, n, k, &[6]).is_err());
    }

    #[test]
    fn empty_and_bad_lengths() {
        assert_eq!(fp8_gemm(&[], &[], &[], &[], 0, 0, 0).unwrap(), Vec::<f32>::new());
        let d = fp8_gemm(&[], &[], &[E4M3::ZERO; 0], &[0.0; 0], 0, 0, 128).unwrap();
        assert!(d.is_empty());
        // k = 0: zero-length sums.
        assert_eq!(fp8_gemm(&[], &[], &[], &[], 2, 3, 0).unwrap(), vec![0.0; 6]);
        let a = vec![E4M3::ZERO; 128];
        assert!(fp8_gemm(&a, &[1.0], &a, &[1.0], 1, 1, 127).is_err());
        assert!(fp8_gemm(&a, &[1.0, 1.0], &a, &[1.0], 1, 1, 128).is_err());
        assert!(fp8_gemm(&a, &[1.0], &a, &[], 1, 1, 128).is_err());
    }

    #[test]
    fn calc_diff_properties() {
        let x = [1.0f32, -2.0, 3.0];
        assert_eq!(calc_diff(&x, &x), 0.0);
        assert_eq!(calc_diff(&[0.0; 3], &[0.0; 3]), 0.0);
        assert!((calc_diff(&x, &[-1.0, 2.0, -3.0]) - 2.0).abs() < 1e-12);
        // Hand-computed: x = [1, 0], y = [0, 1] -> 1 - 0 / 2 = 1.
        assert_eq!(calc_diff(&[1.0, 0.0], &[0.0, 1.0]), 1.0);
        // 1% relative error -> about 0.5e-4.
        let y: Vec<f32> = x.iter().map(|v| v * 1.01).collect();
        let d = calc_diff(&x, &y);
        assert!(d > 0.0 && d < 1e-4, "{d}");
        assert_eq!(calc_diff(&x, &x[..2]), 1.0);
    }

    #[test]
    fn truncate_mantissa_hand_cases() {
        assert_eq!(truncate_mantissa(1.0 + 2f32.powi(-13), 13), 1.0 + 2f32.powi(-13));
        assert_eq!(truncate_mantissa(1.0 + 2f32.powi(-14), 13), 1.0);
        assert_eq!(truncate_mantissa(-(1.0 + 3.0 * 2f32.powi(-15)), 13), -1.0);
        assert!(truncate_mantissa(f32::NAN, 13).is_nan());
    }

    fn max_rel_err(x: &[f32], reference: &[f32]) -> f64 {
        x.iter()
            .zip(reference)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs() / f64::from(b).abs())
            .fold(0.0, f64::max)
    }

    /// Large K with same-sign products: without promotion the truncating ~14-bit accumulator drifts by about
    /// (k/32)/2 · 2^-14 relative (≈ 3 % at k = 32768), far beyond bf16 output rounding; promoting every 128 of K
    /// bounds the drift to a few 2^-14 and passes.
    #[test]
    fn promotion_is_needed_for_large_k() {
        let (m, n, k) = (2, 3, 32768);
        let mut r = Lcg(99);
        let x: Vec<f32> = (0..m * k).map(|_| r.next() + 0.05).collect();
        let w: Vec<f32> = (0..n * k).map(|_| r.next() + 0.05).collect();
        let (a, sa) = quantize_per_token_group(&x, m, k, BLOCK).unwrap();
        let (b, sb) = quantize_per_block(&w, n, k, BLOCK).unwrap();
        let exact = fp8_gemm(&a, &sa, &b, &sb, m, n, k).unwrap();
        let tolerance = 4e-3; // two bf16 half-ulps.
        let promoted = fp8_gemm_limited_acc(&a, &sa, &b, &sb, m, n, k, BLOCK).unwrap();
        let unpromoted = fp8_gemm_limited_acc(&a, &sa, &b, &sb, m, n, k, k).unwrap();
        let (ep, eu) = (max_rel_err(&promoted, &exact), max_rel_err(&unpromoted, &exact));
        assert!(ep < tolerance / 10.0, "promoted error {ep}");
        assert!(eu > tolerance, "unpromoted error {eu} should exceed {tolerance}");
        assert!(fp8_gemm_limited_acc(&a, &sa, &b, &sb, m, n, k, 100).is_err());
    }

    #[test]
    fn limited_acc_is_exact_on_small_integers() {
        // Integers sum exactly in 14 bits: the model must agree with the reference there.
        let (m, n, k) = (2, 2, 256);
        let a: Vec<E4M3> = (0..m * k).map(|i| E4M3::from_f32((i % 3) as f32)).collect();
        let b: Vec<E4M3> = (0..n * k).map(|i| E4M3::from_f32((i % 2) as f32)).collect();
        let (sa, sb) = (vec![1.0; m * 2], vec![1.0; 2]);
        let e = fp8_gemm(&a, &sa, &b, &sb, m, n, k).unwrap();
        assert_eq!(fp8_gemm_limited_acc(&a, &sa, &b, &sb, m, n, k, k).unwrap(), e);
    }
}
