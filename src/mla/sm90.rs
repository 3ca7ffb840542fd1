//! The sm_90a MLA decode path (kernels/mla_sm90.cu, the wide kernels; kernels/mla_narrow_sm90.cu, the narrow ones):
//! TMA tile loads into an mbarrier ring, bf16 wgmma for QKᵀ and P·V. This module holds the host launcher and the Rust
//! twins of the kernels' address, descriptor and register-fragment formulas (kernels/common/mla_*.cuh), unit-tested
//! on the CPU. The launchers of this path's primitive-test kernels are in `crate::probes`; [`tile_image`] is the
//! host image their tile loads are checked against.
//!
//! Supported on this path: bf16 and FP8 caches, page sizes 8, 16, 32, 64 or any multiple of 64 ([`box_rows`]).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use super::{Checked, MlaPlan, MlaWorkspace};
use crate::device::Gpu;
use crate::error::{CudaCall, Error, Result};
use crate::reference::mla::{D_QK, D_ROPE, FP8_ROPE_OFFSET, FP8_TOKEN_BYTES};
use crate::sm90::{swizzle_128b_at, TensorMap, Tma2d, TmaDtype};
use crate::view::TensorRef;

/// Kernel modules (file stems): the wide kernels, the narrow kernels.
const WIDE_MODULE: &str = "mla_sm90";
const NARROW_MODULE: &str = "mla_narrow_sm90";
/// Query rows per CTA (h·s_q is padded to a multiple of this).
pub const ROWS_PER_CTA: usize = 64;
/// Tokens per K tile.
pub const TILE_N: usize = 64;
/// Bytes of one [64 × 64] bf16 column block (128B-swizzled).
pub const BLOCK_BYTES: usize = 64 * 128;
/// Bytes of a Q tile or K stage: 9 column blocks.
pub const TILE_BYTES: usize = 9 * BLOCK_BYTES;
/// Bytes of the cross-warpgroup exchange: row maxima / sums `[2][64]` f32.
pub const RED_BYTES: usize = 2 * 64 * 4;
/// Bytes of the P-fragment exchange: [4 k-steps][4 registers][128 threads] u32.
pub const XBUF_BYTES: usize = 4 * 4 * 128 * 4;
/// Dynamic shared memory: 1 KiB alignment slack + Q + 2 stages + barriers + exchange buffers.
pub const SMEM_BYTES: usize = 1024 + 3 * TILE_BYTES + 64 + RED_BYTES + XBUF_BYTES;
/// Depth of the narrow kernel's TMA ring: 3 for FP8 with 16 rows (small tiles need more in flight; it fits in
/// shared memory), else 2.
pub const fn narrow_stages(kn: usize, fp8: bool) -> usize {
    if fp8 && kn == 16 {
        3
    } else {
        2
    }
}

/// Dynamic shared memory of the narrow kernel with `kn` (16 or 32) query rows per CTA: slack + K storage (bf16:
/// [`narrow_stages`] stages; FP8: latent + that many RoPE blocks and raw stages) + Q (9 × kn·128 B) + Pᵀ (kn·128 B)
/// + barriers + the column-max exchange (4 warps × kn f32).
pub const fn narrow_smem_bytes(kn: usize, fp8: bool) -> usize {
    let st = narrow_stages(kn, fp8);
    let k = if fp8 { 8 * BLOCK_BYTES + st * (BLOCK_BYTES + FP8_RAW_BYTES) } else { st * TILE_BYTES };
    1024 + k + 9 * kn * 128 + kn * 128 + 64 + 4 * kn * 4
}

/// The narrow kernel's row count per CTA for `rows` = s_q·h query rows (either cache), or `None` for the wide
/// kernel.
pub const fn narrow_rows(rows: usize, _fp8: bool) -> Option<usize> {
    if rows > 32 {
        None
    } else if rows <= 16 {
        Some(16)
    } else {
        Some(32)
    }
}

/// Query rows per CTA of the sm_90a kernel chosen for `rows` query rows per sequence.
pub const fn rows_per_cta(rows: usize, fp8: bool) -> usize {
    match narrow_rows(rows, fp8) {
        Some(kn) => kn,
        None => ROWS_PER_CTA,
    }
}

/// Descriptor start (from the Q base) of narrow-kernel QKᵀ k-step `kk`: Q is 9 blocks of `kn` rows × 128 B.
pub const fn narrow_q_step_offset(kn: usize, kk: usize) -> usize {
    (kk / 4) * kn * 128 + (kk % 4) * 32
}

/// Where the narrow kernel stores Pᵀ element (query row `r`, token `k`): a K-major B operand of `kn` rows × 128 B.
pub const fn narrow_p_offset(r: usize, k: usize) -> usize {
    swizzle_128b_at(r, 2 * k)
}

/// Bytes of a raw FP8 stage: codes `[2][64][256 B]` + scales `[64][16 B]`.
pub const FP8_RAW_BYTES: usize = 2 * 64 * 256 + 64 * 16;
/// Dynamic shared memory of the FP8 kernel: slack + Q + latent (8 blocks) + 2 RoPE blocks + 2 raw stages + barriers.
/// (The P exchange of the FP8 kernel goes through the raw stage of the tile being computed.)
pub const SMEM_BYTES_FP8: usize =
    1024 + TILE_BYTES + 8 * BLOCK_BYTES + 2 * BLOCK_BYTES + 2 * FP8_RAW_BYTES + 64 + RED_BYTES;
pub(crate) const THREADS: u32 = 256;

/// Offset (from the tile base) of the descriptor start of QKᵀ k-step `kk` (0..36), for both Q and K (K-major).
pub const fn qk_step_offset(kk: usize) -> usize {
    (kk / 4) * BLOCK_BYTES + (kk % 4) * 32
}

/// Offset of the K descriptor start of QKᵀ k-step `kk` for warpgroup `wg`, which computes S for token rows
/// 32·wg .. 32·wg + 31 (m64n32: 4 groups of 8 token rows at SBO = 1 KiB).
pub const fn k_half_step_offset(wg: usize, kk: usize) -> usize {
    qk_step_offset(kk) + wg * 4096
}

/// Offset of the V descriptor start for warpgroup `wg` (output columns 256·wg..) and P·V k-step `c` (tokens
/// 16c..16c+15), MN-major with LBO = 8 KiB (next 64 columns) and SBO = 1 KiB (next 8 tokens).
pub const fn pv_step_offset(wg: usize, c: usize) -> usize {
    4 * wg * BLOCK_BYTES + c * 2048
}

/// Where TMA puts element (token row `r`, column `col` < 576) of a tile: column block `col / 64`, swizzled.
pub const fn tile_offset(r: usize, col: usize) -> usize {
    (col / 64) * BLOCK_BYTES + swizzle_128b_at(r, (col % 64) * 2)
}

/// (row, column) of accumulator register `i` of thread (warp `w` of the warpgroup, `lane`) for wgmma.m64nNk16:
/// rows 16w + lane/4 (+8 for registers 2, 3 of each group of 4), columns 8·(i/4) + 2·(lane%4) + i%2.
pub const fn accum_coord(w: usize, lane: usize, i: usize) -> (usize, usize) {
    (16 * w + lane / 4 + 8 * ((i % 4) / 2), 8 * (i / 4) + 2 * (lane % 4) + i % 2)
}

/// (row, k) of element `e` (0/1) of A-fragment register `k` (0..4) for wgmma.m64nNk16 with A in registers.
pub const fn a_frag_coord(w: usize, lane: usize, k: usize, e: usize) -> (usize, usize) {
    (16 * w + lane / 4 + 8 * (k % 2), 8 * (k / 2) + 2 * (lane % 4) + e)
}

/// Where the FP8 dequantizer writes the bf16 values 8·`half` .. 8·`half` + 7 of 16-code group `g` (columns 16g..)
/// of token row `r` in the latent stage (the kernel's `dequant_tile`).
pub const fn fp8_latent_offset(r: usize, g: usize, half: usize) -> usize {
    (g / 4) * BLOCK_BYTES + swizzle_128b_at(r, (g % 4) * 32 + 16 * half)
}

/// The accumulator register of S that feeds element `e` of A-fragment register `k` of P·V step `c` (the kernel's
/// `p[c][k] = pack(pv[8c + 2k], pv[8c + 2k + 1])`).
pub const fn p_source(c: usize, k: usize, e: usize) -> usize {
    8 * c + 2 * k + e
}

/// TMA box height for a page size: whole pages of 8..64 tokens (dividing 64) or 64-token slices of pages that are
/// multiples of 64. `None` for page sizes this path does not take (use the portable kernel).
pub const fn box_rows(page: usize) -> Option<usize> {
    if page >= 64 {
        if page.is_multiple_of(64) {
            Some(64)
        } else {
            None
        }
    } else if page >= 8 && 64 % page == 0 {
        Some(page)
    } else {
        None
    }
}

/// The stage image the tile-load probe must produce: the 64-token tile starting at `t0` of a sequence whose table
/// row is `table_row` and whose piece ends at `tok_end`, swizzled as TMA stores it, with rows past `tok_end` or on
/// a bad page zeroed. `cache` is the bf16 cache as raw bits, `[num_blocks, page, 576]`.
pub fn tile_image(cache: &[u16], table_row: &[i32], page: usize, t0: usize, tok_end: usize) -> Vec<u8> {
    let num_blocks = cache.len() / (page * D_QK);
    let box_rows = box_rows(page).unwrap_or(page.min(64));
    let mut img = vec![0u8; TILE_BYTES];
    for r in 0..TILE_N {
        let pos = t0 + r;
        let chunk_pos = t0 + (r / box_rows) * box_rows;
        let chunk_ok = chunk_pos < tok_end
            && table_row.get(chunk_pos / page).is_some_and(|&id| id >= 0 && (id as usize) < num_blocks);
        if pos >= tok_end || !chunk_ok {
            continue;
        }
        let id = table_row[pos / page] as usize;
        let src = (id * page + pos % page) * D_QK;
        for col in 0..D_QK {
            let at = tile_offset(r, col);
            img[at..at + 2].copy_from_slice(&cache[src + col].to_le_bytes());
        }
    }
    img
}

/// A bf16 `rows × 576` tensor (row stride 1152 B) with box 64 × `box_rows`, 128B swizzle.
pub(crate) fn encode_rows_576(ptr: u64, rows: usize, box_rows: usize) -> Result<TensorMap> {
    let map = Tma2d {
        dtype: TmaDtype::Bf16,
        rows: rows as u64,
        cols: D_QK as u64,
        row_stride_bytes: 2 * D_QK as u64,
        box_rows: box_rows as u32,
        box_cols: 64,
        swizzle_128b: true,
    };
    map.encode(ptr)
}

/// The three maps of an FP8 cache (`rows` tokens of 656 bytes): codes (u8, box 256 × box_rows), scales (u8, box
/// 16 × box_rows), both unswizzled, and the RoPE part (bf16 at byte 528, box 64 × box_rows, 128B swizzle).
pub(crate) fn encode_fp8_cache(ptr: u64, rows: usize, box_rows: usize) -> Result<[TensorMap; 3]> {
    let t = FP8_TOKEN_BYTES as u64;
    let bytes = Tma2d {
        dtype: TmaDtype::U8,
        rows: rows as u64,
        cols: t,
        row_stride_bytes: t,
        box_rows: box_rows as u32,
        box_cols: 256,
        swizzle_128b: false,
    };
    let rope = Tma2d { dtype: TmaDtype::Bf16, cols: D_ROPE as u64, box_cols: 64, swizzle_128b: true, ..bytes };
    Ok([bytes.encode(ptr)?, Tma2d { box_cols: 16, ..bytes }.encode(ptr)?, rope.encode(ptr + FP8_ROPE_OFFSET as u64)?])
}

pub(crate) fn unsupported_page(page: usize) -> Error {
    Error::InvalidConfig(format!(
        "the sm_90a MLA path takes pages of 8, 16, 32, 64 or a multiple of 64 tokens, not {page}; use Backend::Portable"
    ))
}

/// The cache the fast kernel reads.
#[derive(Clone)]
pub(crate) enum FastCache<'a> {
    Bf16(TensorRef<'a, bf16>),
    Fp8(TensorRef<'a, u8>),
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_decode(
    gpu: &Gpu,
    q: &TensorRef<'_, bf16>,
    kv: FastCache,
    block_table: &TensorRef<'_, i32>,
    seqlens: &TensorRef<'_, i32>,
    plan: &MlaPlan,
    c: &Checked,
    ws: &mut MlaWorkspace,
    force_wide: bool,
) -> Result<()> {
    gpu.require_hopper("MLA decode sm_90a")?;
    let page = c.page as usize;
    let box_rows = box_rows(page).ok_or_else(|| unsupported_page(page))?;
    let q_rows = c.batch as usize * c.rows;
    let kv_rows = c.num_blocks as usize * page;
    if q_rows + ROWS_PER_CTA > i32::MAX as usize || kv_rows > i32::MAX as usize {
        return Err(Error::shape("kv_cache", "fewer than 2^31 rows (TMA coordinates are i32)", kv_rows.max(q_rows)));
    }
    let fp8 = matches!(kv, FastCache::Fp8(_));
    let narrow = if force_wide { None } else { narrow_rows(c.rows, fp8) };
    let per_cta = narrow.unwrap_or(ROWS_PER_CTA);
    let grid_y = u32::try_from(c.rows.div_ceil(per_cta))
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(|| Error::shape("q", "s_q·heads ≤ 65535·64", c.rows))?;
    let ctas = plan.num_ctas();
    let grid_x = u32::try_from(ctas).map_err(|_| Error::shape("plan", "fewer than 2^32 CTAs", ctas))?;
    let (name, smem, threads) = match (&kv, narrow) {
        (FastCache::Fp8(_), None) => ("mla_decode_sm90_fp8", SMEM_BYTES_FP8, THREADS),
        (FastCache::Fp8(_), Some(16)) => ("mla_decode_sm90_narrow16_fp8", narrow_smem_bytes(16, true), 128),
        (FastCache::Fp8(_), Some(_)) => ("mla_decode_sm90_narrow32_fp8", narrow_smem_bytes(32, true), 128),
        (FastCache::Bf16(_), Some(16)) => ("mla_decode_sm90_narrow16_bf16", narrow_smem_bytes(16, false), 128),
        (FastCache::Bf16(_), Some(_)) => ("mla_decode_sm90_narrow32_bf16", narrow_smem_bytes(32, false), 128),
        (FastCache::Bf16(_), None) => ("mla_decode_sm90_bf16", SMEM_BYTES, THREADS),
    };
    let module = if narrow.is_some() { NARROW_MODULE } else { WIDE_MODULE };
    let f = gpu.function(module, name, smem as u32)?;
    let stream = gpu.stream();
    let qv = q.kernel_arg(stream);
    let q_ptr = qv.addr();
    // A box taller than the tensor is avoided: tiny batches load only their rows.
    let q_box = q_rows.min(per_cta);
    let tmap_q = encode_rows_576(q_ptr, q_rows, q_box)?;
    let (box_i, q_box_i) = (box_rows as i32, q_box as i32);
    let cfg = LaunchConfig { grid_dim: (grid_x, grid_y, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
    let (tv, sv) = (block_table.kernel_arg(stream), seqlens.kernel_arg(stream));
    let mut params = super::params::DecodeParams {
        block_table: tv.addr(),
        seqlens: sv.addr(),
        box_rows: box_i,
        q_box_rows: q_box_i,
        ..c.params()
    };
    let _plan_guards = super::plan_args(&mut params, plan, ws, stream);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&tmap_q);
    let kv_ptr = match &kv {
        FastCache::Bf16(t) => t.kernel_arg(stream),
        FastCache::Fp8(t) => t.kernel_arg(stream),
    };
    let maps: Vec<TensorMap> = match &kv {
        FastCache::Bf16(_) => vec![encode_rows_576(kv_ptr.addr(), kv_rows, box_rows)?],
        FastCache::Fp8(_) => encode_fp8_cache(kv_ptr.addr(), kv_rows, box_rows)?.to_vec(),
    };
    for m in &maps {
        launch.arg(m);
    }
    launch.arg(&params);
    // SAFETY: the tensor maps cover exactly q ([b·s_q·h, 576]) and the cache ([num_blocks·page] tokens of 1152 or
    // 656 bytes, validated); TMA clips boxes at the tensor edge (zero fill). Table entries are bounds-checked
    // against num_blocks in the kernel, which reads only columns below min(seqlen, max_blocks·page) / page; partial
    // slots and rows are bounded as for the portable kernel (checked in `validate`).
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sm90::{make_smem_desc, smem_desc_fields, swizzle_128b, SwizzleMode};

    /// K-major operand (Q as A, K as B) of QKᵀ step kk: the canonical SW128 K-major layout has 8-row groups at SBO =
    /// 1 KiB, rows at 128 B, 16 contiguous k elements (32 B) from the start. The hardware swizzles the resulting
    /// address; it must land where TMA put element (row, 16·kk + k).
    #[test]
    fn qk_descriptors_address_the_tma_layout() {
        for kk in 0..36 {
            let start = qk_step_offset(kk);
            for row in 0..64 {
                for k in 0..16 {
                    let logical = start + (row / 8) * 1024 + (row % 8) * 128 + 2 * k;
                    // The swizzle acts on the address relative to the 1 KiB atom.
                    let atom = logical & !1023;
                    let hw = atom + swizzle_128b((logical - atom) as u32) as usize;
                    assert_eq!(hw, tile_offset(row, 16 * kk + k), "kk {kk} row {row} k {k}");
                }
            }
        }
    }

    #[test]
    fn half_tile_k_descriptors_address_the_tma_layout() {
        for wg in 0..2 {
            for kk in 0..36 {
                let start = k_half_step_offset(wg, kk);
                for n in 0..32 {
                    for k in 0..16 {
                        let logical = start + (n / 8) * 1024 + (n % 8) * 128 + 2 * k;
                        let atom = logical & !1023;
                        let hw = atom + swizzle_128b((logical - atom) as u32) as usize;
                        assert_eq!(hw, tile_offset(32 * wg + n, 16 * kk + k));
                    }
                }
            }
        }
        // The swapped P fragments: warpgroup wg owns k-steps 2wg, 2wg + 1 (tokens 32wg..); its local step c' is the
        // global step 2wg + c', and the accumulator of its S half (columns relative to 32wg) feeds it.
        for w in 0..4 {
            for lane in 0..32 {
                for wg in 0..2 {
                    for cl in 0..2 {
                        for k in 0..4 {
                            for e in 0..2 {
                                let (ar, ak) = a_frag_coord(w, lane, k, e);
                                let (sr, sc) = accum_coord(w, lane, p_source(cl, k, e));
                                assert_eq!((sr, 32 * wg + sc), (ar, 16 * (2 * wg + cl) + ak));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn narrow_kernel_layouts() {
        assert_eq!(narrow_smem_bytes(16, false), 169_280);
        assert_eq!(narrow_smem_bytes(32, false), 190_016);
        assert_eq!(narrow_smem_bytes(16, true), 213_312);
        assert_eq!(narrow_smem_bytes(32, true), 192_064);
        assert_eq!(
            (narrow_rows(16, false), narrow_rows(17, false), narrow_rows(33, false)),
            (Some(16), Some(32), None)
        );
        assert_eq!(narrow_rows(8, true), Some(16));
        for kn in [16, 32] {
            // Q as the K-major B operand of Sᵀ = K·Qᵀ: rows (N) at 128 B, 8-row groups at SBO = 1 KiB; TMA puts
            // element (row, col) of the [kn, 576] box sequence at block col / 64 (kn·128 B each), swizzled.
            for kk in 0..36 {
                for r in 0..kn {
                    for k in 0..16 {
                        let logical = narrow_q_step_offset(kn, kk) + (r / 8) * 1024 + (r % 8) * 128 + 2 * k;
                        let atom = logical & !1023;
                        let col = 16 * kk + k;
                        assert_eq!(
                            atom + swizzle_128b((logical - atom) as u32) as usize,
                            (col / 64) * kn * 128 + swizzle_128b_at(r, (col % 64) * 2)
                        );
                    }
                }
            }
            // Pᵀ as the K-major B operand of Oᵀ = Vᵀ·Pᵀ, k-step c = tokens 16c..16c+15 at start + 32c.
            for c in 0..4 {
                for r in 0..kn {
                    for k in 0..16 {
                        let logical = 32 * c + (r / 8) * 1024 + (r % 8) * 128 + 2 * k;
                        let atom = logical & !1023;
                        assert_eq!(
                            atom + swizzle_128b((logical - atom) as u32) as usize,
                            narrow_p_offset(r, 16 * c + k)
                        );
                    }
                }
            }
        }
        // Vᵀ as the M-major A operand: column tile mt, k-step c starts at mt·8 KiB + 2 KiB·c; element (m, k) sits at
        // start + 2m + (k / 8)·SBO + (k % 8)·128 before the swizzle.
        for mt in 0..8 {
            for c in 0..4 {
                for m in 0..64 {
                    for k in 0..16 {
                        let logical = mt * BLOCK_BYTES + 2048 * c + 2 * m + (k / 8) * 1024 + (k % 8) * 128;
                        let atom = logical & !1023;
                        assert_eq!(
                            atom + swizzle_128b((logical - atom) as u32) as usize,
                            tile_offset(16 * c + k, 64 * mt + m)
                        );
                    }
                }
            }
        }
        const { assert!(narrow_smem_bytes(32, true) <= 232_448 && narrow_smem_bytes(32, false) <= 232_448) };
    }

    /// MN-major V operand of P·V (B, transposed): element (token k, column n) of step c for warpgroup wg sits at
    /// start + (n / 64)·LBO + (n % 64)·2 + (k / 8)·SBO + (k % 8)·128 before the swizzle.
    #[test]
    fn pv_descriptors_address_the_tma_layout() {
        let (lbo, sbo) = (BLOCK_BYTES, 1024);
        for wg in 0..2 {
            for c in 0..4 {
                let start = pv_step_offset(wg, c);
                for k in 0..16 {
                    for n in 0..256 {
                        let logical = start + (n / 64) * lbo + (n % 64) * 2 + (k / 8) * sbo + (k % 8) * 128;
                        let atom = logical & !1023;
                        let hw = atom + swizzle_128b((logical - atom) as u32) as usize;
                        assert_eq!(hw, tile_offset(16 * c + k, 256 * wg + n));
                    }
                }
            }
        }
        // Descriptor fields fit: LBO 8 KiB and SBO 1 KiB in 14-bit 16-byte units.
        let (_, l, s, _) = smem_desc_fields(make_smem_desc(0, lbo as u32, sbo as u32, SwizzleMode::B128));
        assert_eq!((l, s), (8192, 1024));
    }

    /// The S accumulator re-packed as P·V A fragments: every (thread, step, register, element) must carry the S
    /// element at the same row and at column 16·c + k-index.
    #[test]
    fn s_accumulator_feeds_a_fragments() {
        for w in 0..4 {
            for lane in 0..32 {
                for c in 0..4 {
                    for k in 0..4 {
                        for e in 0..2 {
                            let (ar, ak) = a_frag_coord(w, lane, k, e);
                            let (sr, sc) = accum_coord(w, lane, p_source(c, k, e));
                            assert_eq!((sr, sc), (ar, 16 * c + ak));
                        }
                    }
                }
            }
        }
        // The accumulator layout of m64n64 covers the 64×64 tile exactly once over the 128 threads.
        let mut hit = vec![0u8; 64 * 64];
        for w in 0..4 {
            for lane in 0..32 {
                for i in 0..32 {
                    let (r, col) = accum_coord(w, lane, i);
                    hit[r * 64 + col] += 1;
                }
            }
        }
        assert!(hit.iter().all(|&h| h == 1));
    }

    #[test]
    fn fp8_dequant_writes_where_tma_would() {
        for r in 0..64 {
            for g in 0..32 {
                for half in 0..2 {
                    assert_eq!(fp8_latent_offset(r, g, half), tile_offset(r, 16 * g + 8 * half));
                }
            }
        }
        // The 656-byte token: the RoPE map starts 16-byte aligned and its rows are 16-byte multiples apart.
        assert_eq!(FP8_ROPE_OFFSET % 16, 0);
        assert_eq!(FP8_TOKEN_BYTES % 16, 0);
    }

    #[test]
    fn page_sizes_and_tile_image() {
        assert_eq!(box_rows(64), Some(64));
        assert_eq!(box_rows(128), Some(64));
        assert_eq!(box_rows(16), Some(16));
        assert_eq!(box_rows(8), Some(8));
        for bad in [1, 4, 7, 24, 96, 100] {
            assert_eq!(box_rows(bad), None, "{bad}");
        }
        // Two 32-token pages, the second one bad, the piece ending at token 40.
        let page = 32;
        let cache: Vec<u16> = (0..3 * page * D_QK).map(|i| (i % 65_000) as u16 + 1).collect();
        let img = tile_image(&cache, &[2, 99], page, 0, 40);
        let at = |r: usize, col: usize| {
            let o = tile_offset(r, col);
            u16::from_le_bytes([img[o], img[o + 1]])
        };
        assert_eq!(at(0, 0), cache[2 * page * D_QK]);
        assert_eq!(at(31, 575), cache[(2 * page + 31) * D_QK + 575]);
        assert_eq!(at(32, 0), 0); // bad page
        assert_eq!(at(63, 5), 0);
        let img = tile_image(&cache, &[1, 0], page, 0, 40);
        let at = |r: usize, col: usize| {
            let o = tile_offset(r, col);
            u16::from_le_bytes([img[o], img[o + 1]])
        };
        assert_eq!(at(39, 7), cache[(7) * D_QK + 7]);
        assert_eq!(at(40, 7), 0); // past the piece
        assert_eq!(SMEM_BYTES, 230_976);
        assert_eq!(SMEM_BYTES_FP8, 224_832);
        const { assert!(XBUF_BYTES <= FP8_RAW_BYTES) };
        const { assert!(SMEM_BYTES_FP8 <= 232_448 && SMEM_BYTES <= 232_448, "H100/H200 opt-in shared memory") };
    }
}
