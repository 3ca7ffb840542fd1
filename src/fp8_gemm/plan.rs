//! Host-side planning for the FP8 GEMM: shape validation, the Hopper kernel's block sizes, pipeline depth and
//! persistent grid, and the Rust twin of its grouped tile scheduler. Pure functions, tested on the CPU.

use crate::error::{Error, Result};

/// K width of one pipeline stage and of one promotion step (the scale-group width).
pub const BLOCK_K: u32 = 128;

/// Block-N values the sm_90a kernel is instantiated for (each has an `fp8_gemm_sm90_m{BM}n{BN}` entry point).
/// Non-powers of two let the wave count fit 132 SMs better.
pub const SM90_BLOCK_N: [u32; 4] = [64, 112, 128, 160];

/// Block-N values of the opt-in 2-CTA cluster kernels (`fp8_gemm_sm90_mc2_m128n{BN}`, block M 128). Each CTA loads
/// half of the B tile (`BN / 2` rows, a whole number of 8-row swizzle atoms) and multicasts it to both.
pub const SM90_MC2_BLOCK_N: [u32; 2] = [128, 160];

/// Block-M values: 64 (one math warpgroup, decode-sized M) and 128 (two math warpgroups).
pub const SM90_BLOCK_M: [u32; 2] = [64, 128];

/// Usable dynamic shared memory per block on sm_90 (227 KiB).
pub const SM90_SMEM_LIMIT: u32 = 232_448;

/// Most pipeline stages the kernel uses (deeper buys nothing once loads are hidden).
pub const SM90_MAX_STAGES: u32 = 8;

/// Tile rows per scheduler group (tiles of a group share B columns while they are hot in L2).
pub const SM90_GROUP_M: u32 = 8;

/// Bytes reserved at the start of dynamic shared memory so the kernel can round its base up to 1024 (the 128-byte
/// swizzle atom is 8 rows × 128 B and must start 1024-aligned).
pub const SM90_SMEM_ALIGN_SLACK: u32 = 1024;

/// Largest m, n or k accepted: 2^31 minus a margin that keeps every 32-bit tile / scale-padding / K-group-end
/// expression of the kernels (at most a tile or a 128-wide K group past the dimension) below 2^31.
pub const MAX_DIM: usize = (1 << 31) - 1024;

/// A validated problem: `D[m, n] = A[m, k] · B[n, k]ᵀ` with block scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of A and D.
    pub m: usize,
    /// Rows of B, columns of D.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
}

impl GemmShape {
    /// `ceil(k/128)`: scale columns.
    pub fn k_blocks(&self) -> usize {
        self.k.div_ceil(BLOCK_K as usize)
    }
    /// `ceil(n/128)`: rows of B's scale tensor.
    pub fn n_blocks(&self) -> usize {
        self.n.div_ceil(BLOCK_K as usize)
    }
    /// `round_up(m, 4)`: the padded row count of the MN-major activation-scale tensor.
    pub fn m_pad(&self) -> usize {
        self.m.div_ceil(4) * 4
    }
    /// 2·m·n·k.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Validates the tensor shapes of one GEMM call and returns the problem size.
///
/// Requirements (both kernels share them so that choosing a kernel never changes which inputs are accepted):
/// - `a` is `[m, k]`, `b` is `[n, k]`, `sa` is `[ceil(k/128), round_up(m, 4)]` (MN-major, as
///   [`crate::quant::quantize_activations`] writes it), `sb` is `[ceil(n/128), ceil(k/128)]`, `out` is `[m, n]`;
/// - `k % 16 == 0`: TMA needs 16-byte row strides for A and B (k not a multiple of 128 is fine: the last K block is
///   zero-filled by TMA and its scale column is used as usual);
/// - `n % 8 == 0`: wgmma's N granularity and paired bf16 stores in the epilogue;
/// - `m, n, k ≤ MAX_DIM = 2^31 − 1024`: kernel arguments are 32-bit and index products use 64-bit math, but the
///   kernels also form `round_up(m, 4)`, tile origins + tile extents (row0 + 63, col0 + BN − 1) and K-group ends
///   (`(g + 1)·128`) in 32-bit, which would overflow within a tile of 2^31.
///
/// `m = 0` (and `n = 0`) are valid and mean "launch nothing"; `k = 0` is valid too (D = 0, or C unchanged).
pub fn validate_shapes(a: &[usize], sa: &[usize], b: &[usize], sb: &[usize], out: &[usize]) -> Result<GemmShape> {
    let rank2 = |arg: &'static str, s: &[usize]| -> Result<[usize; 2]> {
        s.try_into().map_err(|_| Error::shape(arg, "a rank-2 tensor", format!("{s:?}")))
    };
    let [m, k] = rank2("a", a)?;
    let [n, kb_] = rank2("b", b)?;
    if kb_ != k {
        return Err(Error::shape("b", format!("[n, {k}] (k of a)"), format!("{b:?}")));
    }
    for (arg, v) in [("m", m), ("n", n), ("k", k)] {
        if v > MAX_DIM {
            return Err(Error::shape(arg, "a dimension ≤ 2^31 − 1024", v));
        }
    }
    if k % 16 != 0 {
        return Err(Error::Alignment { arg: "k", required: 16, got: k });
    }
    if n % 8 != 0 {
        return Err(Error::Alignment { arg: "n", required: 8, got: n });
    }
    let shape = GemmShape { m, n, k };
    let want_sa = [shape.k_blocks(), shape.m_pad()];
    if sa != want_sa {
        return Err(Error::shape(
            "sa",
            format!("{want_sa:?} ([ceil(k/128), round_up(m, 4)], MN-major)"),
            format!("{sa:?}"),
        ));
    }
    let want_sb = [shape.n_blocks(), shape.k_blocks()];
    if sb != want_sb {
        return Err(Error::shape("sb", format!("{want_sb:?} ([ceil(n/128), ceil(k/128)])"), format!("{sb:?}")));
    }
    if out != [m, n] {
        return Err(Error::shape("out", format!("[{m}, {n}]"), format!("{out:?}")));
    }
    Ok(shape)
}

/// Launch configuration of the sm_90a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sm90Config {
    /// Tile rows (64: one math warpgroup; 128: two).
    pub block_m: u32,
    /// Tile columns (one of [`SM90_BLOCK_N`]).
    pub block_n: u32,
    /// Shared-memory ring depth.
    pub stages: u32,
    /// Tile rows per scheduler group.
    pub group_m: u32,
    /// Persistent CTAs: `min(work items, SMs)`.
    pub grid: u32,
    /// Number of K splits (1: no split). With more than one, each work item (tile, split) writes an fp32 partial
    /// tile to a workspace `[k_splits, m, n]` and a second kernel sums the splits in order (deterministic, no atomics).
    pub k_splits: u32,
    /// K blocks per split (the last split may have fewer, never zero).
    pub kb_per_split: u32,
    /// Dynamic shared memory in bytes.
    pub smem_bytes: u32,
    /// Threads per CTA: 128 per math warpgroup + 128 for the TMA producer warpgroup.
    pub threads: u32,
    /// CTAs per cluster along M: 1 (plain launch) or 2 (the multicast kernels, launched as 2-CTA clusters; `grid`
    /// is then even, `group_m` counts tile-row pairs and `k_splits` is 1).
    pub cluster_m: u32,
}

impl Sm90Config {
    /// Number of math warpgroups.
    pub fn math_warpgroups(&self) -> u32 {
        self.block_m / 64
    }
    /// The kernel entry point for this block shape.
    pub fn kernel_name(&self) -> Result<&'static str> {
        if self.cluster_m == 2 {
            return Ok(match (self.block_m, self.block_n) {
                (128, 128) => "fp8_gemm_sm90_mc2_m128n128",
                (128, 160) => "fp8_gemm_sm90_mc2_m128n160",
                (bm, bn) => {
                    return Err(Error::InvalidConfig(format!("no 2-CTA multicast FP8 GEMM kernel for block {bm}×{bn}")))
                }
            });
        }
        if self.cluster_m != 1 {
            return Err(Error::InvalidConfig(format!("cluster size {} is not supported", self.cluster_m)));
        }
        Ok(match (self.block_m, self.block_n) {
            (64, 64) => "fp8_gemm_sm90_m64n64",
            (64, 112) => "fp8_gemm_sm90_m64n112",
            (64, 128) => "fp8_gemm_sm90_m64n128",
            (64, 160) => "fp8_gemm_sm90_m64n160",
            (128, 64) => "fp8_gemm_sm90_m128n64",
            (128, 112) => "fp8_gemm_sm90_m128n112",
            (128, 128) => "fp8_gemm_sm90_m128n128",
            (128, 160) => "fp8_gemm_sm90_m128n160",
            (bm, bn) => return Err(Error::InvalidConfig(format!("no sm_90a FP8 GEMM kernel for block {bm}×{bn}"))),
        })
    }
}

/// Bytes one pipeline stage occupies: the A tile (block_m × 128 B), the B tile (block_n × 128 B) and block_m fp32
/// activation scales.
pub fn stage_bytes(block_m: u32, block_n: u32) -> u32 {
    block_m * BLOCK_K + block_n * BLOCK_K + block_m * 4
}

/// Dynamic shared memory for `stages` stages: alignment slack, the rings, and two mbarriers (full, empty) per stage.
pub fn smem_bytes(block_m: u32, block_n: u32, stages: u32) -> u32 {
    SM90_SMEM_ALIGN_SLACK + stages * stage_bytes(block_m, block_n) + stages * 16
}

/// Deepest ring (≤ [`SM90_MAX_STAGES`]) that fits in `smem_limit`, or `None` if not even two stages fit.
pub fn pick_stages(block_m: u32, block_n: u32, smem_limit: u32) -> Option<u32> {
    (2..=SM90_MAX_STAGES).rev().find(|&s| smem_bytes(block_m, block_n, s) <= smem_limit)
}

/// Whether every tile of width `block_n` (starting at a multiple of `block_n`) touches at most two 128-row scale
/// blocks of B, which is what the kernel's promotion assumes (it loads two `sb` values per K block). With
/// g = gcd(block_n, 128) the worst tile start is 128 − g into a scale block, so the condition is
/// `block_n ≤ 128 + g`.
pub fn b_scale_span_ok(block_n: u32) -> bool {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    block_n > 0 && block_n <= BLOCK_K + gcd(block_n, BLOCK_K)
}

/// Index of the B scale block (0 or 1 relative to the tile's first one) that column `col` of a tile starting at
/// `n0` uses. The device's promotion step mirrors this (`r1k::fp8_gemm::b_scale_slot`).
pub fn b_scale_slot(n0: u32, col: u32) -> u32 {
    (n0 + col) / BLOCK_K - n0 / BLOCK_K
}

/// Smallest number of K blocks a split gets: shorter splits would spend more on the partial-tile round trip than
/// they save.
pub const MIN_KB_PER_SPLIT: u32 = 4;

/// Most K splits.
pub const MAX_K_SPLITS: u32 = 16;

/// Split-K for grids that would leave most SMs idle (small m with few N tiles: the decode case, bound by streaming
/// B): with `tiles` output tiles on `sm_count` SMs, split K so that tiles × splits approaches the SM count, keeping
/// at least [`MIN_KB_PER_SPLIT`] K blocks per split. Returns `(k_splits, kb_per_split)` with every split non-empty.
pub fn choose_k_splits(tiles: u64, k_blocks: u32, sm_count: u32) -> (u32, u32) {
    let k_blocks = k_blocks.max(1);
    if tiles == 0 || tiles * 2 > u64::from(sm_count) {
        return (1, k_blocks);
    }
    let want = (u64::from(sm_count) / tiles).min(u64::from(MAX_K_SPLITS)) as u32;
    let splits = want.min(k_blocks / MIN_KB_PER_SPLIT).max(1);
    let per = k_blocks.div_ceil(splits);
    (k_blocks.div_ceil(per), per)
}

/// The K-block range `[begin, end)` of split `split`. Twin of the kernel's loop bounds.
pub fn split_range(split: u32, kb_per_split: u32, k_blocks: u32) -> (u32, u32) {
    let begin = split * kb_per_split;
    (begin, (begin + kb_per_split).min(k_blocks))
}

/// Number of output tiles.
pub fn num_tiles(shape: &GemmShape, block_m: u32, block_n: u32) -> u64 {
    shape.m.div_ceil(block_m as usize) as u64 * shape.n.div_ceil(block_n as usize) as u64
}

/// Chooses the sm_90a configuration for a shape: block M by the size of m, then the block N that minimizes
/// `waves · (block_n + 16)` (a tile's time grows with its width, plus a fixed cost per tile for loads, scales and
/// the epilogue; waves = ceil(tiles / SMs)). Ties go to the wider block (fewer tiles, less L2 traffic).
/// Small M (≤ 64) uses one math warpgroup: the kernel is then bound by streaming B and the smaller block N values
/// spread B over more SMs, which the same cost model selects.
pub fn choose_sm90_config(shape: &GemmShape, sm_count: u32, smem_limit: u32) -> Result<Sm90Config> {
    let sm_count = sm_count.max(1);
    let block_m = if shape.m <= 64 { 64 } else { 128 };
    let mut best: Option<(u64, u32)> = None;
    for &bn in SM90_BLOCK_N.iter() {
        if !b_scale_span_ok(bn) || pick_stages(block_m, bn, smem_limit).is_none() {
            continue;
        }
        let tiles = num_tiles(shape, block_m, bn).max(1);
        let waves = tiles.div_ceil(u64::from(sm_count));
        let cost = waves * u64::from(bn + 16);
        if best.is_none_or(|(c, b)| cost < c || (cost == c && bn > b)) {
            best = Some((cost, bn));
        }
    }
    let Some((_, block_n)) = best else {
        return Err(Error::UnsupportedDevice {
            kernel: "fp8_gemm (Sm90 kernel)".into(),
            needs: "at least two FP8 GEMM pipeline stages of shared memory",
            found: format!("{smem_limit} bytes per block"),
        });
    };
    let stages = pick_stages(block_m, block_n, smem_limit).unwrap_or(2);
    let tiles = num_tiles(shape, block_m, block_n);
    // The kernel counts work items and pipeline iterations in 32-bit registers (the ring's phase bit comes from the
    // iteration count, so it must not wrap).
    if tiles.saturating_mul(shape.k_blocks() as u64) >= 1 << 32 {
        return Err(Error::shape("a", "fewer than 2^32 tile × K-block iterations", format!("{shape:?}")));
    }
    let (k_splits, kb_per_split) = choose_k_splits(tiles, shape.k_blocks() as u32, sm_count);
    let items = tiles * u64::from(k_splits);
    let grid = items.min(u64::from(sm_count)).max(1) as u32;
    Ok(Sm90Config {
        block_m,
        block_n,
        stages,
        group_m: SM90_GROUP_M,
        grid,
        k_splits,
        kb_per_split,
        smem_bytes: smem_bytes(block_m, block_n, stages),
        threads: 128 * (block_m / 64 + 1),
        cluster_m: 1,
    })
}

/// A fixed sm_90a launch configuration in place of the planner's choice, so a test states (and prints) the path it
/// covers whatever the device's SM count: block shape, persistent grid, K splits and ring depth. Set through the
/// hidden [`super::GemmOptions::force_sm90`]; validated by [`force_sm90_config`] like any other argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForcedSm90 {
    /// Tile rows: 64 or 128 (128 for the multicast kernels).
    pub block_m: u32,
    /// Tile columns: one of [`SM90_BLOCK_N`] ([`SM90_MC2_BLOCK_N`] for the multicast kernels).
    pub block_n: u32,
    /// Persistent CTAs, `1..=` work items (even for the multicast kernels, at most twice their tile pairs).
    pub grid: u32,
    /// K splits (1: none); the split length is `ceil(k_blocks / k_splits)`, so the count may come out lower (no split
    /// is ever empty). Must be 1 for the multicast kernels.
    pub k_splits: u32,
    /// Ring depth; 0 takes the deepest that fits, as the planner does.
    pub stages: u32,
}

/// Applies a [`ForcedSm90`] to the configuration the planner chose for the same kernel family (plain or 2-CTA
/// multicast), checking everything the kernels rely on.
pub fn force_sm90_config(
    shape: &GemmShape,
    planned: &Sm90Config,
    f: &ForcedSm90,
    smem_limit: u32,
) -> Result<Sm90Config> {
    let bad = |what: String| Err(Error::InvalidConfig(format!("forced sm_90a GEMM configuration {f:?}: {what}")));
    let multicast = planned.cluster_m == 2;
    let blocks_n: &[u32] = if multicast { &SM90_MC2_BLOCK_N } else { &SM90_BLOCK_N };
    if !SM90_BLOCK_M.contains(&f.block_m) || (multicast && f.block_m != 128) {
        return bad(format!("block M {} has no kernel", f.block_m));
    }
    if !blocks_n.contains(&f.block_n) || !b_scale_span_ok(f.block_n) {
        return bad(format!("block N {} has no kernel", f.block_n));
    }
    let stages = if f.stages == 0 {
        match pick_stages(f.block_m, f.block_n, smem_limit) {
            Some(s) => s,
            None => return bad("not even two stages fit in shared memory".into()),
        }
    } else {
        f.stages
    };
    if !(2..=SM90_MAX_STAGES).contains(&stages) || smem_bytes(f.block_m, f.block_n, stages) > smem_limit {
        return bad(format!("{stages} stages do not fit"));
    }
    let k_blocks = shape.k_blocks().max(1) as u32;
    if f.k_splits == 0 || f.k_splits > k_blocks.min(MAX_K_SPLITS) || (multicast && f.k_splits != 1) {
        return bad(format!("{} K splits over {k_blocks} K blocks", f.k_splits));
    }
    let kb_per_split = k_blocks.div_ceil(f.k_splits);
    let k_splits = k_blocks.div_ceil(kb_per_split);
    let tiles = num_tiles(shape, f.block_m, f.block_n);
    let items = if multicast { 2 * mc2_num_pairs(shape, f.block_n) } else { tiles * u64::from(k_splits) };
    if f.grid == 0 || u64::from(f.grid) > items || (multicast && !f.grid.is_multiple_of(2)) {
        return bad(format!("grid {} for {items} work items", f.grid));
    }
    if tiles.saturating_mul(u64::from(k_blocks)) >= 1 << 32 {
        return bad("2^32 or more tile × K-block iterations".into());
    }
    Ok(Sm90Config {
        block_m: f.block_m,
        block_n: f.block_n,
        stages,
        grid: f.grid,
        k_splits,
        kb_per_split,
        smem_bytes: smem_bytes(f.block_m, f.block_n, stages),
        threads: 128 * (f.block_m / 64 + 1),
        ..*planned
    })
}

/// Tile-row pairs per scheduler group of the multicast kernels (the same 8 tile rows as [`SM90_GROUP_M`]).
pub const SM90_MC2_GROUP_PAIRS: u32 = SM90_GROUP_M / 2;

/// Configuration of the opt-in 2-CTA cluster kernels: block M 128, block N from [`SM90_MC2_BLOCK_N`] by the same
/// wave model as [`choose_sm90_config`] (counted in tile pairs over `sm_count / 2` clusters), no split-K, and an even
/// persistent grid of `2 · min(tile pairs, sm_count / 2)` CTAs (the launcher lowers it to the number of 2-CTA clusters
/// the driver reports as co-resident, when that is fewer).
pub fn choose_sm90_mc2_config(shape: &GemmShape, sm_count: u32, smem_limit: u32) -> Result<Sm90Config> {
    let clusters_max = sm_count / 2;
    if clusters_max == 0 {
        return Err(Error::UnsupportedDevice {
            kernel: "fp8_gemm (Sm90Multicast kernel)".into(),
            needs: "at least two SMs for 2-CTA clusters",
            found: format!("{sm_count} SMs"),
        });
    }
    let block_m = 128;
    let mut best: Option<(u64, u32)> = None;
    for &bn in SM90_MC2_BLOCK_N.iter() {
        if !b_scale_span_ok(bn) || pick_stages(block_m, bn, smem_limit).is_none() {
            continue;
        }
        let pairs = mc2_num_pairs(shape, bn).max(1);
        let waves = pairs.div_ceil(u64::from(clusters_max));
        let cost = waves * u64::from(bn + 16);
        if best.is_none_or(|(c, b)| cost < c || (cost == c && bn > b)) {
            best = Some((cost, bn));
        }
    }
    let Some((_, block_n)) = best else {
        return Err(Error::UnsupportedDevice {
            kernel: "fp8_gemm (Sm90Multicast kernel)".into(),
            needs: "at least two FP8 GEMM pipeline stages of shared memory",
            found: format!("{smem_limit} bytes per block"),
        });
    };
    let stages = pick_stages(block_m, block_n, smem_limit).unwrap_or(2);
    let pairs = mc2_num_pairs(shape, block_n);
    // Iterations (pairs walked by one CTA × K blocks) are counted in 32 bits on the device.
    if pairs.saturating_mul(shape.k_blocks() as u64) >= 1 << 32 {
        return Err(Error::shape("a", "fewer than 2^32 tile × K-block iterations", format!("{shape:?}")));
    }
    let clusters = pairs.min(u64::from(clusters_max)).max(1) as u32;
    Ok(Sm90Config {
        block_m,
        block_n,
        stages,
        group_m: SM90_MC2_GROUP_PAIRS,
        grid: 2 * clusters,
        k_splits: 1,
        kb_per_split: shape.k_blocks().max(1) as u32,
        smem_bytes: smem_bytes(block_m, block_n, stages),
        threads: 128 * (block_m / 64 + 1),
        cluster_m: 2,
    })
}

/// Tile pairs of the multicast kernels: `ceil(tiles_m / 2) · tiles_n` (block M 128).
pub fn mc2_num_pairs(shape: &GemmShape, block_n: u32) -> u64 {
    shape.m.div_ceil(256) as u64 * shape.n.div_ceil(block_n as usize) as u64
}

/// The tile `(tm, tn)` that cluster rank `rank` (0 or 1) computes for tile pair `pair`: pairs are the tile rows
/// (2p, 2p + 1) of one n-block, walked in the grouped order of [`tile_coords`] with `group_pairs` pairs per group,
/// so both ranks always get the same `tn` (they share the multicast B tile). With an odd `tiles_m` the last pair's
/// rank 1 gets `tm == tiles_m`: it runs the pipeline (its peer needs its half of B) and stores nothing. Twin of
/// `r1k::fp8_gemm::mc2_pair_coords`.
pub fn mc2_pair_coords(pair: u32, rank: u32, tiles_m: u32, tiles_n: u32, group_pairs: u32) -> (u32, u32) {
    let (pm, tn) = tile_coords(pair, tiles_m.div_ceil(2), tiles_n, group_pairs);
    (2 * pm + rank, tn)
}

/// Grouped ("swizzled") tile order: consecutive tile ids walk `group_m` tile rows down one tile column before moving
/// to the next column, so the CTAs running at the same time share a few B column-blocks and `group_m` A row-blocks
/// in L2. Returns `(tile_m, tile_n)`. Twin of `r1k::fp8_gemm::tile_coords` in kernels/common/fp8_gemm_sm90.cuh.
pub fn tile_coords(tile: u32, tiles_m: u32, tiles_n: u32, group_m: u32) -> (u32, u32) {
    let per_group = group_m * tiles_n;
    let group = tile / per_group;
    let first_m = group * group_m;
    let rows_in_group = (tiles_m - first_m).min(group_m);
    let within = tile % per_group;
    (first_m + within % rows_in_group, within / rows_in_group)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates the multicast kernels' persistent loop (cluster c walks pairs c, c + clusters, ...; both ranks the
    /// same pairs) and checks: every tile is computed exactly once, both CTAs of a cluster share the n-block on
    /// every step, out-of-range tiles occur only as rank 1 of the last tile-row pair when tiles_m is odd, and the
    /// grid is an even number of CTAs.
    #[test]
    fn mc2_schedule_covers_every_tile_once() {
        let shapes = [
            (1usize, 128usize, 128usize),
            (64, 7168, 2048),
            (128, 4096, 512),
            (300, 1536, 7168),
            (384, 160, 256),
            (1000, 2112, 7168),
            (4096, 7168, 16384),
            (4096, 2048, 7168),
            (4096, 24576, 1536),
            (4097, 4096, 4096),
            (2560, 160, 128),
        ];
        for (m, n, k) in shapes {
            let shape = GemmShape { m, n, k };
            for sms in [2u32, 3, 7, 132] {
                let cfg = choose_sm90_mc2_config(&shape, sms, SM90_SMEM_LIMIT).unwrap();
                assert_eq!(cfg.cluster_m, 2);
                assert_eq!(cfg.grid % 2, 0, "{shape:?}");
                assert!(cfg.grid <= sms.max(2) && cfg.grid >= 2);
                assert_eq!((cfg.block_m, cfg.k_splits), (128, 1));
                assert!(SM90_MC2_BLOCK_N.contains(&cfg.block_n));
                assert_eq!((cfg.block_n / 2 * BLOCK_K) % 1024, 0, "B half must be whole swizzle atoms");
                assert!(cfg.kernel_name().unwrap().starts_with("fp8_gemm_sm90_mc2_"));
                let tiles_m = m.div_ceil(128) as u32;
                let tiles_n = n.div_ceil(cfg.block_n as usize) as u32;
                let pairs = mc2_num_pairs(&shape, cfg.block_n) as u32;
                assert_eq!(pairs, tiles_m.div_ceil(2) * tiles_n);
                let clusters = cfg.grid / 2;
                let mut seen = vec![0u32; (tiles_m * tiles_n) as usize];
                for c in 0..clusters {
                    let mut pair = c;
                    while pair < pairs {
                        let (tm0, tn0) = mc2_pair_coords(pair, 0, tiles_m, tiles_n, cfg.group_m);
                        let (tm1, tn1) = mc2_pair_coords(pair, 1, tiles_m, tiles_n, cfg.group_m);
                        assert_eq!(tn0, tn1, "cluster {c} pair {pair}: ranks disagree on the n-block");
                        assert!(tn0 < tiles_n);
                        assert_eq!(tm1, tm0 + 1);
                        assert!(tm0 < tiles_m);
                        for tm in [tm0, tm1] {
                            if tm < tiles_m {
                                seen[(tm * tiles_n + tn0) as usize] += 1;
                            } else {
                                assert!(tiles_m % 2 == 1 && tm == tiles_m, "{shape:?} pair {pair}");
                            }
                        }
                        pair += clusters;
                    }
                }
                assert!(seen.iter().all(|&v| v == 1), "{shape:?} sms {sms}: tiles not covered exactly once");
            }
        }
        assert!(choose_sm90_mc2_config(&GemmShape { m: 8, n: 8, k: 16 }, 1, SM90_SMEM_LIMIT).is_err());
    }

    #[test]
    fn mc2_config_is_opt_in_only() {
        let shape = GemmShape { m: 4096, n: 7168, k: 7168 };
        let plain = choose_sm90_config(&shape, 132, SM90_SMEM_LIMIT).unwrap();
        assert_eq!(plain.cluster_m, 1);
        assert!(!plain.kernel_name().unwrap().contains("mc2"));
        let bad = Sm90Config { block_n: 64, ..choose_sm90_mc2_config(&shape, 132, SM90_SMEM_LIMIT).unwrap() };
        assert!(bad.kernel_name().is_err());
        let bad = Sm90Config { cluster_m: 4, ..plain };
        assert!(bad.kernel_name().is_err());
    }

    #[test]
    fn validate_accepts_the_contract() {
        let s = validate_shapes(&[7, 256], &[2, 8], &[64, 256], &[1, 2], &[7, 64]).unwrap();
        assert_eq!(s, GemmShape { m: 7, n: 64, k: 256 });
        // m = 0 and a ragged k (k % 128 != 0, k % 16 == 0).
        let s = validate_shapes(&[0, 144], &[2, 0], &[136, 144], &[2, 2], &[0, 136]).unwrap();
        assert_eq!((s.m, s.k_blocks(), s.n_blocks()), (0, 2, 2));
    }

    #[test]
    fn validate_rejects_bad_inputs() {
        let ok = |a: &[usize], sa: &[usize], b: &[usize], sb: &[usize], o: &[usize]| validate_shapes(a, sa, b, sb, o);
        assert!(matches!(ok(&[4, 136], &[2, 4], &[8, 136], &[1, 2], &[4, 8]), Err(Error::Alignment { arg: "k", .. })));
        assert!(matches!(
            ok(&[4, 120], &[1, 4], &[12, 120], &[1, 1], &[4, 12]),
            Err(Error::Alignment { arg: "k", .. })
        ));
        assert!(matches!(
            ok(&[4, 128], &[1, 4], &[12, 128], &[1, 1], &[4, 12]),
            Err(Error::Alignment { arg: "n", .. })
        ));
        // k mismatch between a and b.
        assert!(matches!(ok(&[4, 128], &[1, 4], &[8, 256], &[1, 2], &[4, 8]), Err(Error::Shape { arg: "b", .. })));
        // sa row-major instead of MN-major, or unpadded.
        assert!(matches!(ok(&[5, 256], &[5, 2], &[8, 256], &[1, 2], &[5, 8]), Err(Error::Shape { arg: "sa", .. })));
        assert!(matches!(ok(&[5, 256], &[2, 5], &[8, 256], &[1, 2], &[5, 8]), Err(Error::Shape { arg: "sa", .. })));
        assert!(matches!(ok(&[4, 256], &[2, 4], &[136, 256], &[1, 2], &[4, 136]), Err(Error::Shape { arg: "sb", .. })));
        assert!(matches!(ok(&[4, 256], &[2, 4], &[8, 256], &[1, 2], &[8, 4]), Err(Error::Shape { arg: "out", .. })));
        assert!(matches!(ok(&[4, 256, 1], &[2, 4], &[8, 256], &[1, 2], &[4, 8]), Err(Error::Shape { arg: "a", .. })));
        let big = 1usize << 31;
        assert!(matches!(ok(&[big, 16], &[1, big], &[8, 16], &[1, 1], &[big, 8]), Err(Error::Shape { arg: "m", .. })));
        // Just below 2^31 is still too big: the kernels' 32-bit (g + 1)·128, round_up(m, 4) and tile ends overflow.
        let k = (1usize << 31) - 16;
        let kb = k.div_ceil(128);
        assert!(matches!(ok(&[1, k], &[kb, 4], &[8, k], &[1, kb], &[1, 8]), Err(Error::Shape { arg: "k", .. })));
        let m = (1usize << 31) - 2;
        let e = ok(&[m, 16], &[1, m.div_ceil(4) * 4], &[8, 16], &[1, 1], &[m, 8]);
        assert!(matches!(e, Err(Error::Shape { arg: "m", .. })));
        // At the limit every such expression fits in i32.
        let s = ok(&[MAX_DIM, MAX_DIM], &[MAX_DIM / 128, MAX_DIM], &[8, MAX_DIM], &[1, MAX_DIM / 128], &[MAX_DIM, 8]);
        let s = s.unwrap();
        let fits = |v: usize| v <= i32::MAX as usize;
        assert!(fits(s.k_blocks() * 128) && fits(s.m_pad()) && fits(s.m.div_ceil(128) * 128 + 255));
    }

    #[test]
    fn b_scale_span_matches_brute_force() {
        for bn in (8..=256).step_by(8) {
            let brute = (0..256u32).all(|t| {
                let n0 = t * bn;
                (n0 + bn - 1) / BLOCK_K - n0 / BLOCK_K <= 1
            });
            assert_eq!(b_scale_span_ok(bn), brute, "block_n {bn}");
        }
        for bn in SM90_BLOCK_N {
            assert!(b_scale_span_ok(bn));
        }
        assert!(b_scale_span_ok(136) && b_scale_span_ok(144) && b_scale_span_ok(192) && !b_scale_span_ok(168));
    }

    #[test]
    fn b_scale_slot_cases() {
        assert_eq!(b_scale_slot(0, 127), 0);
        assert_eq!(b_scale_slot(0, 128), 1);
        assert_eq!(b_scale_slot(112, 15), 0);
        assert_eq!(b_scale_slot(112, 16), 1);
        assert_eq!(b_scale_slot(160 * 3, 159), 1); // 480..640: blocks 3, 4
        assert_eq!(b_scale_slot(160 * 3, 0), 0);
    }

    #[test]
    fn scheduler_is_a_bijection_and_grouped() {
        for &(tm, tn, g) in &[(1u32, 1u32, 8u32), (3, 5, 8), (32, 56, 8), (17, 9, 4), (9, 3, 1), (5, 7, 16)] {
            let mut seen = vec![false; (tm * tn) as usize];
            for t in 0..tm * tn {
                let (m, n) = tile_coords(t, tm, tn, g);
                assert!(m < tm && n < tn, "{t} -> ({m}, {n}) outside {tm}×{tn}");
                let i = (m * tn + n) as usize;
                assert!(!seen[i], "tile ({m}, {n}) visited twice");
                seen[i] = true;
            }
            // Within a full group, consecutive ids step down rows first.
            if tm >= g && g > 1 && tn > 1 {
                assert_eq!(tile_coords(0, tm, tn, g), (0, 0));
                assert_eq!(tile_coords(1, tm, tn, g), (1, 0));
                assert_eq!(tile_coords(g, tm, tn, g), (0, 1));
            }
        }
        // Last partial group: 17 rows, group 4 -> rows 16.. form a group of one.
        assert_eq!(tile_coords(16 * 9, 17, 9, 4), (16, 0));
        assert_eq!(tile_coords(16 * 9 + 1, 17, 9, 4), (16, 1));
    }

    /// Emulates the persistent grid: CTA c runs tiles c, c + grid, ... through `tile_coords`, and its epilogue
    /// writes rows/columns of each tile clipped to m and n. Every element of D must be written exactly once.
    #[test]
    fn persistent_grid_writes_every_output_once() {
        for &(m, n, k) in
            &[(1usize, 8usize, 16usize), (7, 136, 144), (129, 264, 272), (1000, 2112, 128), (300, 7168, 512)]
        {
            let shape = GemmShape { m, n, k };
            for sms in [1u32, 7, 132] {
                let c = choose_sm90_config(&shape, sms, SM90_SMEM_LIMIT).unwrap();
                let (bm, bn) = (c.block_m as usize, c.block_n as usize);
                let (tm_n, tn_n) = (m.div_ceil(bm) as u32, n.div_ceil(bn) as u32);
                let tiles = tm_n * tn_n;
                let kbs = shape.k_blocks() as u32;
                // hits[element] counts (element, K block) pairs: each must be covered exactly once.
                let mut hits = vec![0u32; m * n];
                for cta in 0..c.grid {
                    let mut item = cta;
                    while item < tiles * c.k_splits {
                        let (tile, split) = (item / c.k_splits, item % c.k_splits);
                        let (kb0, kb1) = split_range(split, c.kb_per_split, kbs);
                        assert!(kb0 < kb1, "empty split {split} of {c:?}");
                        let (tm, tn) = tile_coords(tile, tm_n, tn_n, c.group_m);
                        for r in (tm as usize * bm)..((tm as usize + 1) * bm).min(m) {
                            for col in (tn as usize * bn)..((tn as usize + 1) * bn).min(n) {
                                hits[r * n + col] += kb1 - kb0;
                            }
                        }
                        item += c.grid;
                    }
                }
                assert!(hits.iter().all(|&h| h == kbs), "{m}×{n}×{k} on {sms} SMs: coverage {c:?}");
            }
        }
    }

    #[test]
    fn k_split_choice() {
        // Enough tiles: no split.
        assert_eq!(choose_k_splits(200, 56, 132), (1, 56));
        assert_eq!(choose_k_splits(67, 56, 132), (1, 56));
        assert_eq!(choose_k_splits(66, 56, 132), (2, 28));
        // 33 tiles on 132 SMs: 4 splits of 14 K blocks.
        assert_eq!(choose_k_splits(33, 56, 132), (4, 14));
        // Short K limits the split count (at least 4 K blocks each).
        assert_eq!(choose_k_splits(1, 12, 132), (3, 4));
        assert_eq!(choose_k_splits(1, 3, 132), (1, 3));
        assert_eq!(choose_k_splits(1, 1000, 132), (MAX_K_SPLITS, 63));
        for tiles in 1..70u64 {
            for kb in 1..200u32 {
                let (s, per) = choose_k_splits(tiles, kb, 132);
                assert!((1..=MAX_K_SPLITS).contains(&s));
                assert!(s == 1 || per >= MIN_KB_PER_SPLIT);
                // Every split non-empty, together exactly [0, kb).
                let mut next = 0;
                for i in 0..s {
                    let (b, e) = split_range(i, per, kb);
                    assert_eq!(b, next);
                    assert!(e > b);
                    next = e;
                }
                assert_eq!(next, kb);
            }
        }
        let c = choose_sm90_config(&GemmShape { m: 1, n: 2112, k: 7168 }, 132, SM90_SMEM_LIMIT).unwrap();
        assert!(c.k_splits > 1, "{c:?}");
        let c = choose_sm90_config(&GemmShape { m: 4096, n: 7168, k: 7168 }, 132, SM90_SMEM_LIMIT).unwrap();
        assert_eq!(c.k_splits, 1);
    }

    #[test]
    fn stages_fit_the_shared_memory() {
        for bm in SM90_BLOCK_M {
            for bn in SM90_BLOCK_N {
                let s = pick_stages(bm, bn, SM90_SMEM_LIMIT).unwrap();
                assert!((2..=SM90_MAX_STAGES).contains(&s));
                assert!(smem_bytes(bm, bn, s) <= SM90_SMEM_LIMIT);
                assert!(s == SM90_MAX_STAGES || smem_bytes(bm, bn, s + 1) > SM90_SMEM_LIMIT);
                // Tiles stay 1024-aligned inside the ring.
                assert_eq!(bm * BLOCK_K % 1024, 0);
                assert_eq!(bn * BLOCK_K % 1024, 0);
            }
        }
        assert_eq!(pick_stages(128, 160, 64 * 1024), None);
        assert_eq!(stage_bytes(128, 128), 16384 + 16384 + 512);
    }

    #[test]
    fn config_choice() {
        let cfg = |m, n, k| choose_sm90_config(&GemmShape { m, n, k }, 132, SM90_SMEM_LIMIT).unwrap();
        for &(m, n, k) in &[
            (1, 2112, 7168),
            (64, 24576, 1536),
            (128, 7168, 2048),
            (4096, 7168, 16384),
            (4096, 4096, 4096),
            (0, 8, 16),
        ] {
            let c = cfg(m, n, k);
            assert!(SM90_BLOCK_N.contains(&c.block_n) && SM90_BLOCK_M.contains(&c.block_m));
            assert!(c.kernel_name().is_ok());
            assert!(c.grid >= 1 && c.grid <= 132);
            assert_eq!(c.threads, 128 * (c.block_m / 64 + 1));
            assert!(c.smem_bytes <= SM90_SMEM_LIMIT);
            let shape = GemmShape { m, n, k };
            assert!(u64::from(c.grid) <= num_tiles(&shape, c.block_m, c.block_n).max(1) * u64::from(c.k_splits));
        }
        assert_eq!(cfg(1, 7168, 2048).block_m, 64);
        assert_eq!(cfg(65, 7168, 2048).block_m, 128);
        // 4096×7168: 32 tile rows; block 160 gives 45 columns → 1440 tiles = 11 waves, better than 128 (14 waves).
        assert_eq!(cfg(4096, 7168, 7168).block_n, 160);
        // The choice is never worse than plain 128 under the cost model.
        for &(m, n) in &[(4096usize, 2112usize), (4096, 24576), (4096, 32768), (4096, 4096), (4096, 14336), (128, 7168)]
        {
            let c = cfg(m, n, 1024);
            let shape = GemmShape { m, n, k: 1024 };
            let cost = |bn: u32| num_tiles(&shape, c.block_m, bn).div_ceil(132) * u64::from(bn + 16);
            assert!(cost(c.block_n) <= cost(128), "{m}×{n}: {} vs 128", c.block_n);
        }
        assert!(choose_sm90_config(&GemmShape { m: 4096, n: 4096, k: 4096 }, 132, 40 * 1024).is_err());
        let huge = GemmShape { m: 1 << 30, n: 1 << 20, k: 1 << 14 };
        assert!(choose_sm90_config(&huge, 132, SM90_SMEM_LIMIT).is_err());
    }
}
