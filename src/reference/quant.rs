//! FP8 quantization references: per-token-group (activations) and per-block (weights).
//!
//! Formula (DeepSeek's): `scale = max(amax(group), 1e-4) / 448`, `q = E4M3::from_f32(x / scale)`, so that
//! `q · scale ≈ x`. With UE8M0 scales the scale is first rounded up to a power of two. Every step is a single f32
//! operation, so the GPU kernels reproduce it bit for bit.

use crate::error::{Error, Result};
use crate::fp8::{ue8m0, E4M3};

/// Smallest amax used when computing a scale, so an all-zero group gets a finite, non-zero scale.
pub const AMAX_FLOOR: f32 = 1e-4;

/// How scales are represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleFormat {
    /// Any fp32 value.
    #[default]
    F32,
    /// Rounded up to a power of two (UE8M0-representable), still stored as fp32.
    Ue8m0,
}

/// The scale for a group whose largest magnitude is `amax`.
pub fn scale_for_amax(amax: f32, format: ScaleFormat) -> f32 {
    let scale = amax.max(AMAX_FLOOR) / E4M3::MAX;
    match format {
        ScaleFormat::F32 => scale,
        ScaleFormat::Ue8m0 => ue8m0::round_up_pow2(scale),
    }
}

fn check_len(arg: &'static str, len: usize, m: usize, k: usize) -> Result<()> {
    let expected = m.checked_mul(k).ok_or_else(|| Error::shape(arg, "m·k that fits in usize", format!("{m}×{k}")))?;
    if len != expected {
        return Err(Error::shape(arg, format!("{m}×{k} = {expected} elements"), len));
    }
    Ok(())
}

/// Per-token-group quantization: `x` row-major [m, k]; returns codes [m, k] and scales row-major
/// [m, ceil(k/group)].
pub fn quantize_per_token_group(x: &[f32], m: usize, k: usize, group: usize) -> Result<(Vec<E4M3>, Vec<f32>)> {
    quantize_per_token_group_with(x, m, k, group, ScaleFormat::F32)
}

/// [`quantize_per_token_group`] with a choice of scale format.
pub fn quantize_per_token_group_with(
    x: &[f32],
    m: usize,
    k: usize,
    group: usize,
    format: ScaleFormat,
) -> Result<(Vec<E4M3>, Vec<f32>)> {
    if group == 0 {
        return Err(Error::InvalidConfig("group size must be positive".into()));
    }
    check_len("x", x.len(), m, k)?;
    let groups = k.div_ceil(group);
    let mut q = vec![E4M3::ZERO; m * k];
    let mut scales = vec![0f32; m * groups];
    for row in 0..m {
        for g in 0..groups {
            let cols = g * group..((g + 1) * group).min(k);
            let xs = &x[row * k + cols.start..row * k + cols.end];
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = scale_for_amax(amax, format);
            scales[row * groups + g] = scale;
            for (i, &v) in xs.iter().enumerate() {
                q[row * k + cols.start + i] = E4M3::from_f32(v / scale);
            }
        }
    }
    Ok((q, scales))
}

/// Per-block quantization: `w` row-major [n, k]; returns codes [n, k] and scales row-major
/// [ceil(n/block), ceil(k/block)].
pub fn quantize_per_block(w: &[f32], n: usize, k: usize, block: usize) -> Result<(Vec<E4M3>, Vec<f32>)> {
    quantize_per_block_with(w, n, k, block, ScaleFormat::F32)
}

/// [`quantize_per_block`] with a choice of scale format.
pub fn quantize_per_block_with(
    w: &[f32],
    n: usize,
    k: usize,
    block: usize,
    format: ScaleFormat,
) -> Result<(Vec<E4M3>, Vec<f32>)> {
    if block == 0 {
        return Err(Error::InvalidConfig("block size must be positive".into()));
    }
    check_len("w", w.len(), n, k)?;
    let (nb, kb) = (n.div_ceil(block), k.div_ceil(block));
    let mut q = vec![E4M3::ZERO; n * k];
    let mut scales = vec![0f32; nb * kb];
    for bi in 0..nb {
        for bj in 0..kb {
            let rows = bi * block..((bi + 1) * block).min(n);
            let cols = bj * block..((bj + 1) * block).min(k);
            let mut amax = 0f32;
            for r in rows.clone() {
                for c in cols.clone() {
                    amax = amax.max(w[r * k + c].abs());
                }
            }
            let scale = scale_for_amax(amax, format);
            scales[bi * kb + bj] = scale;
            for r in rows.clone() {
                for c in cols.clone() {
                    q[r * k + c] = E4M3::from_f32(w[r * k + c] / scale);
                }
            }
        }
    }
    Ok((q, scales))
}

/// Dequantizes per-token-group codes back to f32 (`q · scale`).
pub fn dequantize_per_token_group(q: &[E4M3], scales: &[f32], m: usize, k: usize, group: usize) -> Result<Vec<f32>> {
    check_len("q", q.len(), m, k)?;
    let groups = k.div_ceil(group.max(1));
    if scales.len() != m * groups {
        return Err(Error::shape("scales", m * groups, scales.len()));
    }
    Ok((0..m * k).map(|i| q[i].to_f32() * scales[(i / k) * groups + (i % k) / group]).collect())
}

/// Dequantizes per-block codes back to f32.
pub fn dequantize_per_block(q: &[E4M3], scales: &[f32], n: usize, k: usize, block: usize) -> Result<Vec<f32>> {
    check_len("q", q.len(), n, k)?;
    let kb = k.div_ceil(block.max(1));
    let nb = n.div_ceil(block.max(1));
    if scales.len() != nb * kb {
        return Err(Error::shape("scales", nb * kb, scales.len()));
    }
    Ok((0..n * k).map(|i| q[i].to_f32() * scales[((i / k) / block) * kb + (i % k) / block]).collect())
}

/// `m` rounded up to a multiple of 4: the row count of the MN-major activation-scale layout the FP8 GEMM reads
/// (TMA needs 16-byte-aligned strides, i.e. 4 floats).
pub fn padded_scale_rows(m: usize) -> usize {
    m.div_ceil(4) * 4
}

/// Converts row-major [m, groups] scales to the GEMM's MN-major layout [groups, padded_scale_rows(m)], padding rows
/// with zeros (what the GPU quantizer writes there).
pub fn scales_to_mn_major(scales: &[f32], m: usize, groups: usize) -> Result<Vec<f32>> {
    if scales.len() != m * groups {
        return Err(Error::shape("scales", m * groups, scales.len()));
    }
    let m_pad = padded_scale_rows(m);
    let mut out = vec![0f32; groups * m_pad];
    for r in 0..m {
        for g in 0..groups {
            out[g * m_pad + r] = scales[r * groups + g];
        }
    }
    Ok(out)
}

/// The inverse of [`scales_to_mn_major`].
pub fn scales_from_mn_major(mn_major: &[f32], m: usize, groups: usize) -> Result<Vec<f32>> {
    let m_pad = padded_scale_rows(m);
    if mn_major.len() != groups * m_pad {
        return Err(Error::shape("scales", groups * m_pad, mn_major.len()));
    }
    let mut out = vec![0f32; m * groups];
    for r in 0..m {
        for g in 0..groups {
            out[r * groups + g] = mn_major[g * m_pad + r];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_group() {
        // amax 448 -> scale 1, codes are the values themselves where representable.
        let x = [448.0f32, -1.0, 0.5, 3.0, /* group 2 */ 0.0, 0.0, 0.0, 0.0];
        let (q, s) = quantize_per_token_group(&x, 1, 8, 4).unwrap();
        assert_eq!(s, vec![1.0, AMAX_FLOOR / 448.0]);
        assert_eq!(E4M3::dequantize_slice(&q[..4]), vec![448.0, -1.0, 0.5, 3.0]);
        assert!(q[4..].iter().all(|c| c.0 == 0));
    }

    #[test]
    fn scale_maps_amax_to_448() {
        let x: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.37).sin() * 5.0).collect();
        let (q, s) = quantize_per_token_group(&x, 2, 128, 128).unwrap();
        for row in 0..2 {
            let amax = x[row * 128..(row + 1) * 128].iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(s[row], amax / 448.0);
            let qmax = q[row * 128..(row + 1) * 128].iter().fold(0f32, |a, v| a.max(v.to_f32().abs()));
            assert_eq!(qmax, 448.0);
        }
    }

    #[test]
    fn ragged_k_and_naive_agreement() {
        let (m, k, group) = (3, 300, 128);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
        let (q, s) = quantize_per_token_group(&x, m, k, group).unwrap();
        assert_eq!(s.len(), m * 3);
        let deq = dequantize_per_token_group(&q, &s, m, k, group).unwrap();
        for (i, (&a, &b)) in x.iter().zip(&deq).enumerate() {
            let scale = s[(i / k) * 3 + (i % k) / group];
            // E4M3 has 3 mantissa bits: relative error ≤ 2^-4, absolute ≤ half a subnormal step.
            assert!(
                (a - b).abs() <= a.abs() / 16.0 + scale * E4M3::MIN_POSITIVE_SUBNORMAL / 2.0 + 1e-12,
                "{i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn block_quant_matches_group_quant_on_one_row_blocks() {
        let (n, k) = (5, 260);
        let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.013).cos() * (1 + i % 7) as f32).collect();
        let (qb, sb) = quantize_per_block(&w, n, k, 1).unwrap();
        let (qg, sg) = quantize_per_token_group(&w, n * k, 1, 1).unwrap();
        assert_eq!(qb, qg);
        assert_eq!(sb, sg);
        let (q, s) = quantize_per_block(&w, n, k, 128).unwrap();
        assert_eq!(s.len(), 3);
        let amax0 =
            (0..n).flat_map(|r| (0..128).map(move |c| (r, c))).fold(0f32, |a, (r, c)| a.max(w[r * k + c].abs()));
        assert_eq!(s[0], amax0 / 448.0);
        let deq = dequantize_per_block(&q, &s, n, k, 128).unwrap();
        for (a, b) in w.iter().zip(&deq) {
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-3);
        }
    }

    #[test]
    fn ue8m0_scales_are_powers_of_two_and_not_smaller() {
        let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.11).sin() * 3.3).collect();
        let (_, s32) = quantize_per_token_group_with(&x, 4, 128, 128, ScaleFormat::F32).unwrap();
        let (q, s8) = quantize_per_token_group_with(&x, 4, 128, 128, ScaleFormat::Ue8m0).unwrap();
        for (a, b) in s32.iter().zip(&s8) {
            assert!(ue8m0::encode(*b).is_some());
            assert!(b >= a && *b < 2.0 * a);
        }
        assert!(q.iter().all(|c| c.to_f32().abs() <= 448.0));
    }

    #[test]
    fn mn_major_round_trip_and_padding() {
        let s: Vec<f32> = (0..5 * 3).map(|i| i as f32 + 1.0).collect();
        let mn = scales_to_mn_major(&s, 5, 3).unwrap();
        assert_eq!(mn.len(), 3 * 8);
        assert_eq!(mn[0], 1.0);
        assert_eq!(mn[1], 4.0);
        assert_eq!(mn[8], 2.0);
        assert_eq!(&mn[5..8], &[0.0, 0.0, 0.0]);
        assert_eq!(scales_from_mn_major(&mn, 5, 3).unwrap(), s);
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(quantize_per_token_group(&[1.0; 10], 2, 4, 128).is_err());
        assert!(quantize_per_token_group(&[1.0; 8], 2, 4, 0).is_err());
        assert!(quantize_per_block(&[1.0; 8], 3, 3, 128).is_err());
        assert!(quantize_per_token_group(&[], usize::MAX, 2, 128).is_err());
    }
}
