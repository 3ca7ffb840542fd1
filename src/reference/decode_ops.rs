//! References for the small ops around a DeepSeek-V3 decode step: RMSNorm, YaRN rotary embedding, per-head batched
//! matmul (W_UK absorption and W_UV), and appending a token's latent to the paged MLA cache.

use crate::error::{Error, Result};

/// RMSNorm over the last dimension: `y = x / sqrt(mean(x²) + eps) · weight`, f64 internally.
pub fn rms_norm(x: &[f32], weight: &[f32], rows: usize, eps: f32) -> Result<Vec<f32>> {
    let d = weight.len();
    if x.len() != rows * d {
        return Err(Error::shape("x", format!("{rows}×{d}"), x.len()));
    }
    let mut y = vec![0f32; x.len()];
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let mean_sq = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d.max(1) as f64;
        let inv = 1.0 / (mean_sq + eps as f64).sqrt();
        for c in 0..d {
            y[r * d + c] = (row[c] as f64 * inv * weight[c] as f64) as f32;
        }
    }
    Ok(y)
}

/// YaRN rotary-embedding parameters (DeepSeek-V3's defaults in [`RopeConfig::deepseek_v3`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Rotary dimension (64 in DeepSeek-V3).
    pub dim: usize,
    /// Base θ.
    pub theta: f64,
    /// YaRN context-extension factor.
    pub factor: f64,
    /// Pre-extension context length.
    pub original_max_position: f64,
    /// YaRN β_fast.
    pub beta_fast: f64,
    /// YaRN β_slow.
    pub beta_slow: f64,
    /// YaRN mscale (applied to cos/sin, relative to `mscale_all_dim`).
    pub mscale: f64,
    /// YaRN mscale_all_dim.
    pub mscale_all_dim: f64,
}

impl RopeConfig {
    /// DeepSeek-V3/R1: dim 64, θ 10000, factor 40, original 4096, β 32/1, mscale 1, mscale_all_dim 1.
    pub fn deepseek_v3() -> Self {
        RopeConfig {
            dim: 64,
            theta: 10000.0,
            factor: 40.0,
            original_max_position: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        }
    }

    /// YaRN's attention-magnitude factor `0.1·m·ln(factor) + 1` (1 when factor ≤ 1).
    pub fn yarn_mscale(factor: f64, m: f64) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * m * factor.ln() + 1.0
        }
    }

    /// The factor cos and sin are multiplied by.
    pub fn cos_sin_scale(&self) -> f64 {
        Self::yarn_mscale(self.factor, self.mscale) / Self::yarn_mscale(self.factor, self.mscale_all_dim)
    }

    /// The `dim / 2` inverse frequencies, blended between interpolated and extrapolated by YaRN's linear ramp,
    /// rounded to f32 (the GPU multiplies positions by these f32 values, and so does [`rope`]).
    pub fn inv_freq(&self) -> Vec<f32> {
        let half = self.dim / 2;
        let dim = self.dim as f64;
        let correction_dim = |rotations: f64| {
            dim * (self.original_max_position / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * self.theta.ln())
        };
        let low = correction_dim(self.beta_fast).floor().max(0.0);
        let high = correction_dim(self.beta_slow).ceil().min(dim - 1.0);
        let high = if low == high { high + 0.001 } else { high };
        (0..half)
            .map(|i| {
                let base = self.theta.powf((2 * i) as f64 / dim);
                let extrapolated = 1.0 / base;
                let interpolated = 1.0 / (self.factor * base);
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation_weight = 1.0 - ramp;
                (interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight) as f32
            })
            .collect()
    }
}

/// Rotates interleaved pairs in place: for pair i of a `dim`-wide slice, with `angle = (pos as f32) · inv_freq[i]`
/// (an f32 product, as on the GPU), `(a, b) → (a·cos − b·sin, a·sin + b·cos) · scale`. `x` is [rows, row_len] and
/// the rotated slice of row r starts at `offset` and repeats every `stride` elements `count` times (one per head).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &mut [f32],
    rows: usize,
    row_len: usize,
    count: usize,
    stride: usize,
    offset: usize,
    positions: &[i32],
    cfg: &RopeConfig,
) -> Result<()> {
    if x.len() != rows * row_len {
        return Err(Error::shape("x", format!("{rows}×{row_len}"), x.len()));
    }
    if positions.len() != rows {
        return Err(Error::shape("positions", rows, positions.len()));
    }
    if count > 0 && offset + (count - 1) * stride + cfg.dim > row_len {
        return Err(Error::shape(
            "x",
            format!("rows of at least {}", offset + (count - 1) * stride + cfg.dim),
            row_len,
        ));
    }
    let inv_freq = cfg.inv_freq();
    let scale = cfg.cos_sin_scale();
    for (r, &pos) in positions.iter().enumerate() {
        for head in 0..count {
            let base = r * row_len + offset + head * stride;
            for (i, &f) in inv_freq.iter().enumerate() {
                let angle = (pos as f32 * f) as f64;
                let (s, c) = (angle.sin() * scale, angle.cos() * scale);
                let (a, b) = (x[base + 2 * i] as f64, x[base + 2 * i + 1] as f64);
                x[base + 2 * i] = (a * c - b * s) as f32;
                x[base + 2 * i + 1] = (a * s + b * c) as f32;
            }
        }
    }
    Ok(())
}

/// Per-head batched matmul, `out[t, h, j] = Σ_i x[t, h, i] · w[h·ws_h + i·ws_i + j·ws_j]`, with `x` [t, heads, k]
/// and `out` [t, heads, n]. With W_UK_h = kv_b_proj rows h·256..h·256+128 ([128, 512]) and `ws_i = 512, ws_j = 1`
/// this absorbs W_UK into q; with W_UV_h (rows h·256+128..h·256+256) and `ws_i = 1, ws_j = 512` it applies W_UV.
#[allow(clippy::too_many_arguments)]
pub fn head_bmm(
    x: &[f32],
    w: &[f32],
    t: usize,
    heads: usize,
    k: usize,
    n: usize,
    ws_h: usize,
    ws_i: usize,
    ws_j: usize,
) -> Result<Vec<f32>> {
    if x.len() != t * heads * k {
        return Err(Error::shape("x", format!("{t}×{heads}×{k}"), x.len()));
    }
    if heads > 0 && k > 0 && n > 0 {
        let last = (heads - 1) * ws_h + (k - 1) * ws_i + (n - 1) * ws_j;
        if last >= w.len() {
            return Err(Error::shape("w", format!("more than {last} elements for these strides"), w.len()));
        }
    }
    let mut out = vec![0f32; t * heads * n];
    for ti in 0..t {
        for h in 0..heads {
            for j in 0..n {
                let mut acc = 0f64;
                for i in 0..k {
                    acc += x[(ti * heads + h) * k + i] as f64 * w[h * ws_h + i * ws_i + j * ws_j] as f64;
                }
                out[(ti * heads + h) * n + j] = acc as f32;
            }
        }
    }
    Ok(out)
}

/// Writes row `r` of `rows` [t, width] into the paged cache [num_blocks, page, width] at the slot of
/// `(seq_ids[r], positions[r])` through `block_table` [batch, max_blocks]. Every index is validated first; on error
/// nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn cache_append(
    cache: &mut [f32],
    rows: &[f32],
    width: usize,
    page: usize,
    block_table: &[i32],
    max_blocks: usize,
    seq_ids: &[i32],
    positions: &[i32],
) -> Result<()> {
    let t = seq_ids.len();
    if page == 0 || width == 0 || !cache.len().is_multiple_of(page * width) {
        return Err(Error::shape("cache", format!("[num_blocks, {page}, {width}]"), cache.len()));
    }
    let num_blocks = cache.len() / (page * width);
    if rows.len() != t * width {
        return Err(Error::shape("rows", format!("{t}×{width}"), rows.len()));
    }
    if positions.len() != t {
        return Err(Error::shape("positions", t, positions.len()));
    }
    if max_blocks == 0 || !block_table.len().is_multiple_of(max_blocks) {
        return Err(Error::shape("block_table", format!("[batch, {max_blocks}]"), block_table.len()));
    }
    let slots = cache_slots(block_table, max_blocks, num_blocks, page, seq_ids, positions)?;
    for (r, slot) in slots.into_iter().enumerate() {
        cache[slot * width..(slot + 1) * width].copy_from_slice(&rows[r * width..(r + 1) * width]);
    }
    Ok(())
}

/// The cache token index (`block · page + pos % page`) of each `(seq_ids[r], positions[r])` through `block_table`
/// [batch, max_blocks], validating every index (seq id, position within the table, page id < `num_blocks`).
pub fn cache_slots(
    block_table: &[i32],
    max_blocks: usize,
    num_blocks: usize,
    page: usize,
    seq_ids: &[i32],
    positions: &[i32],
) -> Result<Vec<usize>> {
    if page == 0 || max_blocks == 0 || !block_table.len().is_multiple_of(max_blocks) {
        return Err(Error::shape("block_table", format!("[batch, {max_blocks}] with page {page}"), block_table.len()));
    }
    if positions.len() != seq_ids.len() {
        return Err(Error::shape("positions", seq_ids.len(), positions.len()));
    }
    let batch = block_table.len() / max_blocks;
    let mut slots = Vec::with_capacity(seq_ids.len());
    for (r, (&seq, &pos)) in seq_ids.iter().zip(positions).enumerate() {
        if seq < 0 || seq as usize >= batch {
            return Err(Error::IndexOutOfRange { arg: "seq_ids", position: r, value: seq as i64, bound: batch as i64 });
        }
        if pos < 0 || pos as usize / page >= max_blocks {
            return Err(Error::IndexOutOfRange {
                arg: "positions",
                position: r,
                value: pos as i64,
                bound: (max_blocks * page) as i64,
            });
        }
        let entry = seq as usize * max_blocks + pos as usize / page;
        let block = block_table[entry];
        if block < 0 || block as usize >= num_blocks {
            return Err(Error::IndexOutOfRange {
                arg: "block_table",
                position: entry,
                value: block as i64,
                bound: num_blocks as i64,
            });
        }
        slots.push(block as usize * page + pos as usize % page);
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_hand_case() {
        // mean(x²) = (9 + 16) / 2 = 12.5; 1/sqrt(12.5) = 0.28284...
        let y = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 1, 0.0).unwrap();
        assert!((y[0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
        assert!((y[1] - 8.0 / 12.5f32.sqrt()).abs() < 1e-6);
        assert!(rms_norm(&[1.0; 3], &[1.0; 2], 1, 1e-6).is_err());
    }

    #[test]
    fn yarn_frequencies_blend_between_extrapolation_and_interpolation() {
        let cfg = RopeConfig::deepseek_v3();
        let f = cfg.inv_freq();
        assert_eq!(f.len(), 32);
        // The highest frequency (i = 0) is extrapolated (unchanged), the lowest is interpolated (÷ factor).
        assert_eq!(f[0], 1.0);
        let last_base = 10000f64.powf(62.0 / 64.0);
        assert!(((f[31] as f64) - 1.0 / (40.0 * last_base)).abs() < 1e-12);
        for w in f.windows(2) {
            assert!(w[1] < w[0]);
        }
        assert_eq!(cfg.cos_sin_scale(), 1.0);
        // DeepSeek-V3's softmax scale uses mscale(40, 1)² = (0.1·ln 40 + 1)².
        assert!((RopeConfig::yarn_mscale(40.0, 1.0) - 1.3688879454113936).abs() < 1e-12);
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let cfg = RopeConfig { dim: 4, theta: 10000.0, factor: 1.0, ..RopeConfig::deepseek_v3() };
        let mut x = vec![1.0, 0.0, 0.0, 1.0];
        rope(&mut x, 1, 4, 1, 4, 0, &[1], &cfg).unwrap();
        // Pair 0 rotates by 1 rad; pair 1 by 1/100 rad (θ^(-2/4) = 0.01).
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        assert!((x[2] + 0.01f32.sin()).abs() < 1e-6 && (x[3] - 0.01f32.cos()).abs() < 1e-6);
        let mut y: Vec<f32> = (0..2 * 3 * 8).map(|i| (i as f32 * 0.7).sin()).collect();
        let before: f32 = y.iter().map(|v| v * v).sum();
        rope(&mut y, 2, 24, 2, 10, 2, &[5, 1000], &RopeConfig { dim: 8, ..RopeConfig::deepseek_v3() }).unwrap();
        let after: f32 = y.iter().map(|v| v * v).sum();
        assert!((before - after).abs() < 1e-4);
        // Position 0 is the identity.
        let mut z = vec![0.3, -0.2, 0.5, 0.1];
        rope(&mut z, 1, 4, 1, 4, 0, &[0], &cfg).unwrap();
        assert_eq!(z, vec![0.3, -0.2, 0.5, 0.1]);
    }

    #[test]
    fn head_bmm_hand_case_and_strides() {
        // 1 token, 2 heads, k=2, n=1: head 0 w=[1,2], head 1 w=[3,4].
        let out = head_bmm(&[1.0, 1.0, 2.0, 0.5], &[1.0, 2.0, 3.0, 4.0], 1, 2, 2, 1, 2, 1, 1).unwrap();
        assert_eq!(out, vec![3.0, 8.0]);
        // Transposed strides give the transposed product.
        let w = [1.0, 2.0, 3.0, 4.0]; // as [i][j]: [[1,2],[3,4]]
        let a = head_bmm(&[1.0, 10.0], &w, 1, 1, 2, 2, 0, 2, 1).unwrap();
        assert_eq!(a, vec![31.0, 42.0]);
        let b = head_bmm(&[1.0, 10.0], &w, 1, 1, 2, 2, 0, 1, 2).unwrap();
        assert_eq!(b, vec![21.0, 43.0]);
        assert!(head_bmm(&[1.0, 10.0], &w, 1, 1, 2, 3, 0, 1, 2).is_err());
    }

    #[test]
    fn cache_append_writes_the_right_slot_and_validates() {
        let (width, page) = (3, 2);
        let mut cache = vec![0f32; 4 * page * width];
        let table = [2, 0, 3, 1]; // 2 sequences × 2 blocks
        cache_append(&mut cache, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], width, page, &table, 2, &[0, 1], &[3, 0]).unwrap();
        // seq 0, pos 3 → block table[0][1] = 0, slot 1; seq 1, pos 0 → block 3, slot 0.
        assert_eq!(&cache[3..6], &[1.0, 2.0, 3.0]);
        assert_eq!(&cache[18..21], &[4.0, 5.0, 6.0]);
        let snapshot = cache.clone();
        assert!(cache_append(&mut cache, &[0.0; 6], width, page, &table, 2, &[0, 2], &[0, 0]).is_err());
        assert!(cache_append(&mut cache, &[0.0; 6], width, page, &table, 2, &[0, 1], &[0, 4]).is_err());
        assert!(cache_append(&mut cache, &[0.0; 6], width, page, &[9, 0, 3, 1], 2, &[0, 1], &[0, 0]).is_err());
        assert_eq!(cache, snapshot, "a rejected append writes nothing");
    }
}
