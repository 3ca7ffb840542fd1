//! MLA decode reference (absorbed form, as DeepSeek-V3 decodes): paged latent KV cache, causal MTP queries, and the
//! FP8 KV-cache format.
//!
//! Shapes (all row-major):
//! - `q`: `[batch, s_q, heads, 576]`: 512 latent columns (W_UK already absorbed) followed by 64 RoPE columns.
//! - `kv_cache`: `[num_blocks, page_size, 576]`: per token the 512-wide latent `c_kv` then the 64-wide RoPE key. K is
//!   all 576 columns, V is the first 512.
//! - `block_table`: `[batch, max_blocks]`: page `j` of sequence `b` lives at `kv_cache[block_table[b, j]]`.
//! - `seqlens`: `[batch]`, the number of cached tokens (the new tokens included) of each sequence.
//! - output `o`: `[batch, s_q, heads, 512]`; `lse`: `[batch, heads, s_q]`, natural log of Σ exp(scale·q·k) over the
//!   attended keys.
//!
//! Causality (s_q > 1, MTP / speculative verification): query `i` of a sequence with `seqlen` tokens attends keys
//! `0 ..= seqlen − s_q + i` (the last `s_q` cached tokens are the queries themselves). Without `causal` every query
//! attends all `seqlen` keys. A query that attends no key (seqlen 0, or seqlen < s_q under causality) gives o = 0 and
//! lse = +inf. Sequences with fewer than `s_q` new tokens are padded at the *front*: the padded queries come first and
//! see fewer keys; their outputs are to be ignored.
//!
//! Only block-table entries `0 .. ceil(seqlen / page_size)` of each sequence are read; the rest may hold anything.
//! Tokens past `seqlen` in the last page are never read either.

use crate::error::{Error, Result};
use crate::fp8::E4M3;
use crate::reference::quant::{scale_for_amax, ScaleFormat};
use half::bf16;

/// Width of a K row: 512 latent + 64 RoPE.
pub const D_QK: usize = 576;
/// Width of a V row (the latent).
pub const D_V: usize = 512;
/// Width of the RoPE part of K.
pub const D_ROPE: usize = 64;
/// Width of one FP8 scale tile of the latent.
pub const FP8_TILE: usize = 128;
/// Number of FP8 scale tiles per token.
pub const FP8_TILES: usize = D_V / FP8_TILE;
/// Bytes of one token of the FP8 KV cache: see [`fp8_token_layout`].
pub const FP8_TOKEN_BYTES: usize = D_V + 4 * FP8_TILES + 2 * D_ROPE;
/// Byte offset of the fp32 scales inside an FP8 cache token.
pub const FP8_SCALES_OFFSET: usize = D_V;
/// Byte offset of the bf16 RoPE part inside an FP8 cache token.
pub const FP8_ROPE_OFFSET: usize = D_V + 4 * FP8_TILES;

/// Documents the byte layout of one token of the FP8 KV cache (`[num_blocks, page_size, 656]` bytes):
///
/// | bytes     | content                                                                  |
/// |-----------|--------------------------------------------------------------------------|
/// | 0..512    | latent as E4M3 codes; column `c` dequantizes to `code · scale[c / 128]`  |
/// | 512..528  | 4 little-endian fp32 scales, one per 128-wide latent tile                 |
/// | 528..656  | RoPE key, 64 little-endian bf16                                          |
///
/// 656 = 41 × 16, so every token starts 16-byte aligned when the cache does. Returns
/// `(token_bytes, scales_offset, rope_offset)`.
pub const fn fp8_token_layout() -> (usize, usize, usize) {
    (FP8_TOKEN_BYTES, FP8_SCALES_OFFSET, FP8_ROPE_OFFSET)
}

/// Problem description shared by the reference and the GPU launchers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaConfig {
    /// Number of sequences.
    pub batch: usize,
    /// Query tokens per sequence (1 for plain decode, more for MTP / speculative verification).
    pub s_q: usize,
    /// Query heads (the single latent KV head is shared by all of them).
    pub heads: usize,
    /// Tokens per KV-cache page.
    pub page_size: usize,
    /// Multiplier of q·k before the softmax. Required: DeepSeek's includes the YaRN mscale, so there is no default.
    pub softmax_scale: f32,
    /// Apply the MTP causal mask (see the module docs).
    pub causal: bool,
}

/// Sizes derived from the buffers after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    /// Pages in the cache.
    pub num_blocks: usize,
    /// Columns of the block table.
    pub max_blocks: usize,
}

impl MlaConfig {
    /// Checks the scalar fields.
    pub fn validate(&self) -> Result<()> {
        if self.s_q == 0 || self.heads == 0 || self.page_size == 0 {
            return Err(Error::InvalidConfig(format!(
                "s_q, heads and page_size must be positive (got s_q={}, heads={}, page_size={})",
                self.s_q, self.heads, self.page_size
            )));
        }
        if !self.softmax_scale.is_finite() || self.softmax_scale == 0.0 {
            return Err(Error::InvalidConfig(format!(
                "softmax_scale must be finite and non-zero (got {})",
                self.softmax_scale
            )));
        }
        Ok(())
    }

    /// Number of keys query `i` attends in a sequence of `seqlen` tokens.
    pub fn visible_keys(&self, seqlen: usize, i: usize) -> usize {
        if self.causal {
            (seqlen + i + 1).saturating_sub(self.s_q).min(seqlen)
        } else {
            seqlen
        }
    }

    /// Elements of `q`.
    pub fn q_len(&self) -> usize {
        self.batch * self.s_q * self.heads * D_QK
    }

    /// Elements of `o`.
    pub fn o_len(&self) -> usize {
        self.batch * self.s_q * self.heads * D_V
    }

    /// Elements of `lse`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.s_q
    }
}

/// Validates everything the reference and the launchers can check on the host: scalar config, buffer lengths
/// (`cache_elems` is the cache length in tokens × `token_width` units), seqlens in `0 ..= max_blocks·page_size`, and
/// every block-table entry that will be read in `0..num_blocks`. Entries past a sequence's pages are not checked.
pub fn validate_inputs(
    q_len: usize,
    cache_tokens: usize,
    block_table: &[i32],
    seqlens: &[i32],
    cfg: &MlaConfig,
) -> Result<MlaDims> {
    cfg.validate()?;
    // Checked: a configuration whose q would not fit in memory matches no buffer (cfg.q_len() would overflow).
    let want_q =
        cfg.batch.checked_mul(cfg.s_q).and_then(|v| v.checked_mul(cfg.heads)).and_then(|v| v.checked_mul(D_QK));
    if Some(q_len) != want_q {
        return Err(Error::shape("q", format!("[{}, {}, {}, {D_QK}]", cfg.batch, cfg.s_q, cfg.heads), q_len));
    }
    if !cache_tokens.is_multiple_of(cfg.page_size) {
        return Err(Error::shape("kv_cache", format!("a whole number of {}-token pages", cfg.page_size), cache_tokens));
    }
    let num_blocks = cache_tokens / cfg.page_size;
    if seqlens.len() != cfg.batch {
        return Err(Error::shape("seqlens", cfg.batch, seqlens.len()));
    }
    let max_blocks = block_table.len().checked_div(cfg.batch).unwrap_or(0);
    if block_table.len() != cfg.batch * max_blocks {
        return Err(Error::shape("block_table", format!("[{}, max_blocks]", cfg.batch), block_table.len()));
    }
    for (b, &len) in seqlens.iter().enumerate() {
        // Saturating: a table whose capacity overflows usize holds every i32 length.
        let cap = max_blocks.saturating_mul(cfg.page_size).min(i64::MAX as usize - 1) as i64;
        if len < 0 || len as i64 > cap {
            return Err(Error::IndexOutOfRange { arg: "seqlens", position: b, value: len as i64, bound: cap + 1 });
        }
        let pages = (len as usize).div_ceil(cfg.page_size);
        for j in 0..pages {
            let pos = b * max_blocks + j;
            let e = block_table[pos];
            if e < 0 || e as usize >= num_blocks {
                return Err(Error::IndexOutOfRange {
                    arg: "block_table",
                    position: pos,
                    value: e as i64,
                    bound: num_blocks as i64,
                });
            }
        }
    }
    Ok(MlaDims { num_blocks, max_blocks })
}

/// Absorbed MLA decode on f32 inputs with an f64 softmax. Returns `(o, lse)` with the shapes of the module docs.
pub fn mla_decode(
    q: &[f32],
    kv_cache: &[f32],
    block_table: &[i32],
    seqlens: &[i32],
    cfg: &MlaConfig,
) -> Result<(Vec<f32>, Vec<f32>)> {
    cfg.validate()?;
    if !kv_cache.len().is_multiple_of(D_QK) {
        return Err(Error::shape("kv_cache", format!("[num_blocks, {}, {D_QK}]", cfg.page_size), kv_cache.len()));
    }
    let dims = validate_inputs(q.len(), kv_cache.len() / D_QK, block_table, seqlens, cfg)?;
    let (h, s_q, page) = (cfg.heads, cfg.s_q, cfg.page_size);
    let mut o = vec![0f32; cfg.o_len()];
    let mut lse = vec![f32::INFINITY; cfg.lse_len()];
    let scale = cfg.softmax_scale as f64;
    let mut scores = Vec::new();
    for b in 0..cfg.batch {
        let seqlen = seqlens[b] as usize;
        let key = |t: usize| -> &[f32] {
            let blk = block_table[b * dims.max_blocks + t / page] as usize;
            let off = (blk * page + t % page) * D_QK;
            &kv_cache[off..off + D_QK]
        };
        for i in 0..s_q {
            let n = cfg.visible_keys(seqlen, i);
            if n == 0 {
                continue;
            }
            for head in 0..h {
                let row = (b * s_q + i) * h + head;
                let qr = &q[row * D_QK..(row + 1) * D_QK];
                scores.clear();
                scores.extend(
                    (0..n).map(|t| scale * qr.iter().zip(key(t)).map(|(&a, &k)| a as f64 * k as f64).sum::<f64>()),
                );
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut acc = vec![0f64; D_V];
                let mut l = 0f64;
                for (t, &s) in scores.iter().enumerate() {
                    let p = (s - m).exp();
                    l += p;
                    for (a, &v) in acc.iter_mut().zip(&key(t)[..D_V]) {
                        *a += p * v as f64;
                    }
                }
                for (dst, a) in o[row * D_V..(row + 1) * D_V].iter_mut().zip(&acc) {
                    *dst = (a / l) as f32;
                }
                lse[(b * h + head) * s_q + i] = (m + l.ln()) as f32;
            }
        }
    }
    Ok((o, lse))
}

/// Quantizes an f32 cache of `tokens` × 576 values into the FP8 format of [`fp8_token_layout`]: per token, each
/// 128-wide latent tile gets `scale = max(amax, 1e-4) / 448` and codes `E4M3(x / scale)` (as
/// [`crate::reference::quant`]); the RoPE part is rounded to bf16.
pub fn quantize_kv_cache_fp8(kv_cache: &[f32]) -> Result<Vec<u8>> {
    if !kv_cache.len().is_multiple_of(D_QK) {
        return Err(Error::shape("kv_cache", format!("a multiple of {D_QK} elements"), kv_cache.len()));
    }
    let tokens = kv_cache.len() / D_QK;
    let mut out = vec![0u8; tokens * FP8_TOKEN_BYTES];
    for (src, dst) in kv_cache.chunks_exact(D_QK).zip(out.chunks_exact_mut(FP8_TOKEN_BYTES)) {
        for tile in 0..FP8_TILES {
            let xs = &src[tile * FP8_TILE..(tile + 1) * FP8_TILE];
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = scale_for_amax(amax, ScaleFormat::F32);
            for (i, &x) in xs.iter().enumerate() {
                dst[tile * FP8_TILE + i] = E4M3::from_f32(x / scale).to_bits();
            }
            let at = FP8_SCALES_OFFSET + 4 * tile;
            dst[at..at + 4].copy_from_slice(&scale.to_le_bytes());
        }
        for (i, &x) in src[D_V..].iter().enumerate() {
            let at = FP8_ROPE_OFFSET + 2 * i;
            dst[at..at + 2].copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes());
        }
    }
    Ok(out)
}

/// Dequantizes an FP8 cache (`tokens` × 656 bytes) back to `tokens` × 576 f32: `bf16(code · scale)` for the latent
/// (one f32 product rounded to nearest-even bf16, exactly what the kernels feed their bf16 MMAs), the bf16 RoPE
/// widened. This defines the FP8 cache's values: the GPU kernels are tested against the reference on this cache.
pub fn dequantize_kv_cache_fp8(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(FP8_TOKEN_BYTES) {
        return Err(Error::shape("kv_cache", format!("a multiple of {FP8_TOKEN_BYTES} bytes"), bytes.len()));
    }
    let mut out = Vec::with_capacity(bytes.len() / FP8_TOKEN_BYTES * D_QK);
    for tok in bytes.chunks_exact(FP8_TOKEN_BYTES) {
        let scale = |t: usize| {
            let at = FP8_SCALES_OFFSET + 4 * t;
            f32::from_le_bytes([tok[at], tok[at + 1], tok[at + 2], tok[at + 3]])
        };
        out.extend((0..D_V).map(|c| bf16::from_f32(E4M3::from_bits(tok[c]).to_f32() * scale(c / FP8_TILE)).to_f32()));
        out.extend((0..D_ROPE).map(|i| {
            let at = FP8_ROPE_OFFSET + 2 * i;
            bf16::from_bits(u16::from_le_bytes([tok[at], tok[at + 1]])).to_f32()
        }));
    }
    Ok(out)
}

/// Merges partial results the way the combine kernel does: `lse = log Σ exp(lse_i)`, `o = Σ exp(lse_i − lse)·o_i`.
/// Empty parts have lse_i = −inf; if all are empty the result is o = 0, lse = +inf.
pub fn combine_partials(parts: &[(Vec<f32>, f32)]) -> (Vec<f32>, f32) {
    let width = parts.first().map_or(0, |p| p.0.len());
    let m = parts.iter().map(|p| p.1 as f64).fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return (vec![0.0; width], f32::INFINITY);
    }
    let sum: f64 = parts.iter().map(|p| (p.1 as f64 - m).exp()).sum();
    let lse = m + sum.ln();
    let mut o = vec![0f64; width];
    for (part, l) in parts {
        let w = (*l as f64 - lse).exp();
        for (a, &x) in o.iter_mut().zip(part) {
            *a += w * x as f64;
        }
    }
    (o.into_iter().map(|x| x as f32).collect(), lse as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    fn cfg(batch: usize, s_q: usize, heads: usize, page_size: usize, causal: bool) -> MlaConfig {
        MlaConfig { batch, s_q, heads, page_size, softmax_scale: 0.1, causal }
    }

    #[test]
    fn hand_computed_two_keys() {
        // One head, one query, two keys in a 2-token page. q·k0 = 1, q·k1 = 2 (scale 1).
        let mut q = vec![0f32; D_QK];
        q[0] = 1.0;
        q[D_V] = 1.0; // RoPE column participates in the score
        let mut kv = vec![0f32; 2 * D_QK];
        kv[0] = 1.0; // k0 latent[0] = 1 -> score 1
        kv[D_QK] = 1.0;
        kv[D_QK + D_V] = 1.0; // k1 rope[0] = 1 -> score 2
        kv[1] = 3.0; // v0[1] = 3
        kv[D_QK + 1] = 5.0; // v1[1] = 5
        let c = MlaConfig { batch: 1, s_q: 1, heads: 1, page_size: 2, softmax_scale: 1.0, causal: false };
        let (o, lse) = mla_decode(&q, &kv, &[0], &[2], &c).unwrap();
        let (e1, e2) = (1f64.exp(), 2f64.exp());
        assert!((lse[0] as f64 - (e1 + e2).ln()).abs() < 1e-6);
        assert!((o[0] as f64 - (e1 + e2) / (e1 + e2)).abs() < 1e-6);
        assert!((o[1] as f64 - (3.0 * e1 + 5.0 * e2) / (e1 + e2)).abs() < 1e-5);
        // Single key: o = v, lse = score.
        let (o, lse) = mla_decode(&q, &kv, &[0], &[1], &c).unwrap();
        assert_eq!(o[1], 3.0);
        assert!((lse[0] - 1.0).abs() < 1e-7);
    }

    #[test]
    fn zero_length_and_causal_empty_rows() {
        let c = cfg(2, 3, 2, 4, true);
        let mut r = lcg(1);
        let q: Vec<f32> = (0..c.q_len()).map(|_| r()).collect();
        let kv: Vec<f32> = (0..2 * 4 * D_QK).map(|_| r()).collect();
        // seq 0 empty; seq 1 has 2 tokens < s_q = 3: query 0 sees none, query 1 sees key 0, query 2 sees 0..=1.
        let (o, lse) = mla_decode(&q, &kv, &[7, 7, 1, 99], &[0, 2], &c).unwrap();
        for head in 0..2 {
            for i in 0..3 {
                assert_eq!(lse[head * 3 + i], f32::INFINITY);
            }
        }
        assert!(o[..3 * 2 * D_V].iter().all(|&x| x == 0.0));
        assert_eq!(lse[2 * 3], f32::INFINITY); // b=1, head 0, query 0
        assert!(lse[2 * 3 + 1].is_finite());
        // query 1 sees exactly key 0: o = v0
        let row = (3 + 1) * 2;
        let v0 = &kv[4 * D_QK..4 * D_QK + D_V];
        for (a, b) in o[row * D_V..(row + 1) * D_V].iter().zip(v0) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn causal_matches_truncated_noncausal() {
        let c = cfg(1, 4, 3, 16, true);
        let mut r = lcg(2);
        let q: Vec<f32> = (0..c.q_len()).map(|_| r()).collect();
        let kv: Vec<f32> = (0..3 * 16 * D_QK).map(|_| r()).collect();
        let table = [2, 0, 1];
        let (o, lse) = mla_decode(&q, &kv, &table, &[37], &c).unwrap();
        for i in 0..4 {
            let sub = MlaConfig { s_q: 1, causal: false, ..c };
            let qi = &q[i * 3 * D_QK..(i + 1) * 3 * D_QK];
            let (oi, li) = mla_decode(qi, &kv, &table, &[(37 - 4 + i + 1) as i32], &sub).unwrap();
            assert_eq!(&o[i * 3 * D_V..(i + 1) * 3 * D_V], &oi[..]);
            for head in 0..3 {
                assert_eq!(lse[head * 4 + i], li[head]);
            }
        }
    }

    #[test]
    fn paging_is_transparent_and_garbage_is_never_read() {
        // The same keys, contiguous in one big page vs scattered over permuted 4-token pages with NaN elsewhere.
        let (len, page) = (13usize, 4usize);
        let mut r = lcg(3);
        let c1 = cfg(1, 2, 4, 16, true);
        let q: Vec<f32> = (0..c1.q_len()).map(|_| r()).collect();
        let keys: Vec<f32> = (0..len * D_QK).map(|_| r()).collect();
        let mut dense = keys.clone();
        dense.resize(16 * D_QK, f32::NAN);
        let (o1, l1) = mla_decode(&q, &dense, &[0], &[len as i32], &c1).unwrap();
        let table = [5, 2, 7, 0, i32::MAX, -5];
        let mut paged = vec![f32::NAN; 8 * page * D_QK];
        for t in 0..len {
            let dst = (table[t / page] as usize * page + t % page) * D_QK;
            paged[dst..dst + D_QK].copy_from_slice(&keys[t * D_QK..(t + 1) * D_QK]);
        }
        let c2 = MlaConfig { page_size: page, ..c1 };
        let (o2, l2) = mla_decode(&q, &paged, &table, &[len as i32], &c2).unwrap();
        assert_eq!(o1, o2);
        assert_eq!(l1, l2);
        assert!(o2.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let c = cfg(1, 1, 1, 4, false);
        let q = vec![0.5f32; D_QK];
        let kv = vec![0.5f32; 2 * 4 * D_QK];
        assert!(mla_decode(&q, &kv, &[0, 1], &[8], &c).is_ok());
        // Entry that would be read is out of range.
        assert!(matches!(mla_decode(&q, &kv, &[0, 2], &[8], &c), Err(Error::IndexOutOfRange { .. })));
        assert!(matches!(mla_decode(&q, &kv, &[-1, 0], &[8], &c), Err(Error::IndexOutOfRange { .. })));
        // ... but not when that page is past the sequence.
        assert!(mla_decode(&q, &kv, &[0, 2], &[4], &c).is_ok());
        // seqlen beyond the table / negative.
        assert!(mla_decode(&q, &kv, &[0, 1], &[9], &c).is_err());
        assert!(mla_decode(&q, &kv, &[0, 1], &[-1], &c).is_err());
        // Shapes.
        assert!(mla_decode(&q[1..], &kv, &[0, 1], &[8], &c).is_err());
        assert!(mla_decode(&q, &kv[D_QK..], &[0, 1], &[8], &c).is_err());
        assert!(mla_decode(&q, &kv, &[0, 1, 1], &[8], &c).is_ok()); // 3 columns is fine for batch 1
        assert!(mla_decode(&q, &kv, &[0, 1], &[8, 8], &c).is_err());
        // Scale required and finite.
        for s in [0.0, f32::NAN, f32::INFINITY] {
            let bad = MlaConfig { softmax_scale: s, ..c };
            assert!(matches!(mla_decode(&q, &kv, &[0, 1], &[8], &bad), Err(Error::InvalidConfig(_))));
        }
        assert!(mla_decode(&q, &kv, &[0, 1], &[8], &MlaConfig { heads: 0, ..c }).is_err());
    }

    /// Naive MLA: decompress the latent with W_UK [h, 128, 512] and W_UV [h, 512, 128] into per-head K (128 nope +
    /// 64 shared RoPE) and V (128), run ordinary attention, and compare with the absorbed form followed by W_UV.
    #[test]
    fn absorbed_equals_naive() {
        let (h, s_q, page, d_nope, d_v) = (3usize, 2usize, 8usize, 128usize, 128usize);
        let seqlens = [11i32, 5];
        let c = MlaConfig { batch: 2, s_q, heads: h, page_size: page, softmax_scale: 0.07, causal: true };
        let mut r = lcg(4);
        let w_uk: Vec<f32> = (0..h * d_nope * D_V).map(|_| r() * 0.2).collect();
        let w_uv: Vec<f32> = (0..h * D_V * d_v).map(|_| r() * 0.2).collect();
        let table = [3, 0, 1, 2];
        let kv: Vec<f32> = (0..4 * page * D_QK).map(|_| r()).collect();
        // Un-absorbed queries: q_nope [b, s_q, h, 128], q_rope [b, s_q, h, 64].
        let q_nope: Vec<f32> = (0..2 * s_q * h * d_nope).map(|_| r()).collect();
        let q_rope: Vec<f32> = (0..2 * s_q * h * D_ROPE).map(|_| r()).collect();
        // Absorb: q_lat[c] = Σ_n q_nope[n] W_UK[h, n, c].
        let mut q = vec![0f32; c.q_len()];
        for row in 0..2 * s_q * h {
            let head = row % h;
            for col in 0..D_V {
                let mut acc = 0f64;
                for n in 0..d_nope {
                    acc += q_nope[row * d_nope + n] as f64 * w_uk[(head * d_nope + n) * D_V + col] as f64;
                }
                q[row * D_QK + col] = acc as f32;
            }
            q[row * D_QK + D_V..(row + 1) * D_QK].copy_from_slice(&q_rope[row * D_ROPE..(row + 1) * D_ROPE]);
        }
        let (o_lat, lse) = mla_decode(&q, &kv, &table, &seqlens, &c).unwrap();
        for b in 0..2 {
            let len = seqlens[b] as usize;
            let tok = |t: usize| {
                let blk = table[b * 2 + t / page] as usize;
                &kv[(blk * page + t % page) * D_QK..(blk * page + t % page + 1) * D_QK]
            };
            for i in 0..s_q {
                let n_vis = c.visible_keys(len, i);
                for head in 0..h {
                    let row = (b * s_q + i) * h + head;
                    // Naive per-head K and V.
                    let mut scores = Vec::new();
                    let mut vs = Vec::new();
                    for t in 0..n_vis {
                        let lat = &tok(t)[..D_V];
                        let mut s = 0f64;
                        for n in 0..d_nope {
                            let k_n: f64 = (0..D_V)
                                .map(|col| lat[col] as f64 * w_uk[(head * d_nope + n) * D_V + col] as f64)
                                .sum();
                            s += q_nope[row * d_nope + n] as f64 * k_n;
                        }
                        for e in 0..D_ROPE {
                            s += q_rope[row * D_ROPE + e] as f64 * tok(t)[D_V + e] as f64;
                        }
                        scores.push(s * c.softmax_scale as f64);
                        let v: Vec<f64> = (0..d_v)
                            .map(|j| {
                                (0..D_V).map(|col| lat[col] as f64 * w_uv[(head * D_V + col) * d_v + j] as f64).sum()
                            })
                            .collect();
                        vs.push(v);
                    }
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let l: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    let lse_naive = m + l.ln();
                    assert!((lse[(b * h + head) * s_q + i] as f64 - lse_naive).abs() < 1e-4 * lse_naive.abs().max(1.0));
                    for j in 0..d_v {
                        let naive: f64 = scores.iter().zip(&vs).map(|(s, v)| (s - m).exp() * v[j]).sum::<f64>() / l;
                        // Absorbed: apply W_UV to the latent output.
                        let absorbed: f64 = (0..D_V)
                            .map(|col| o_lat[row * D_V + col] as f64 * w_uv[(head * D_V + col) * d_v + j] as f64)
                            .sum();
                        assert!((naive - absorbed).abs() < 1e-4, "b{b} i{i} h{head} j{j}: {naive} vs {absorbed}");
                    }
                }
            }
        }
    }

    #[test]
    fn fp8_cache_roundtrip_and_layout() {
        assert_eq!(fp8_token_layout(), (656, 512, 528));
        assert_eq!(FP8_TOKEN_BYTES % 16, 0);
        let mut r = lcg(5);
        let kv: Vec<f32> = (0..3 * D_QK).map(|_| r() * 10.0).collect();
        let bytes = quantize_kv_cache_fp8(&kv).unwrap();
        assert_eq!(bytes.len(), 3 * 656);
        let back = dequantize_kv_cache_fp8(&bytes).unwrap();
        for t in 0..3 {
            for tile in 0..FP8_TILES {
                let xs = &kv[t * D_QK + tile * 128..t * D_QK + (tile + 1) * 128];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (i, &x) in xs.iter().enumerate() {
                    let y = back[t * D_QK + tile * 128 + i];
                    // E4M3 has 3 mantissa bits: relative error ≤ 2^-4 (+ bf16 rounding), plus subnormal steps.
                    assert!((x - y).abs() <= x.abs() / 15.0 + amax / 448.0 / 64.0, "{x} vs {y}");
                }
            }
            for e in 0..D_ROPE {
                assert_eq!(back[t * D_QK + D_V + e], bf16::from_f32(kv[t * D_QK + D_V + e]).to_f32());
            }
        }
        // Explicit bytes: a token whose first tile is all 448 has scale 1 and code 0x7e.
        let mut one = vec![0f32; D_QK];
        one[..128].fill(448.0);
        let b = quantize_kv_cache_fp8(&one).unwrap();
        assert_eq!(b[0], 0x7e);
        assert_eq!(&b[512..516], &1f32.to_le_bytes());
        assert!(quantize_kv_cache_fp8(&one[1..]).is_err());
        assert!(dequantize_kv_cache_fp8(&b[1..]).is_err());
    }

    #[test]
    fn combine_matches_single_pass() {
        // Splitting the keys of one row into parts and combining equals attending all keys at once.
        let c = cfg(1, 1, 1, 4, false);
        let mut r = lcg(6);
        let q: Vec<f32> = (0..D_QK).map(|_| r()).collect();
        let kv: Vec<f32> = (0..4 * 4 * D_QK).map(|_| r() * 4.0).collect();
        let (o, lse) = mla_decode(&q, &kv, &[0, 1, 2, 3], &[16], &c).unwrap();
        let mut parts = Vec::new();
        for p in 0..4 {
            let part = mla_decode(&q, &kv, &[p], &[4], &c).unwrap();
            parts.push((part.0, part.1[0]));
        }
        parts.push((vec![0.0; D_V], f32::NEG_INFINITY)); // an empty part contributes nothing
        let (oc, lc) = combine_partials(&parts);
        assert!((lc - lse[0]).abs() < 1e-5);
        for (a, b) in oc.iter().zip(&o) {
            assert!((a - b).abs() < 1e-5);
        }
        assert_eq!(combine_partials(&[(vec![0.0; 2], f32::NEG_INFINITY)]), (vec![0.0; 2], f32::INFINITY));
    }
}
