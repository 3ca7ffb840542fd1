//! MLA decode on the GPU: paged latent KV cache (bf16 or FP8), split-KV with a combine pass, causal MTP queries.
//!
//! Semantics and shapes are those of [`crate::reference::mla`]. A decode step is:
//! 1. [`MlaPlan::new`] cuts the batch into work items (host scheduler, [`sched`]) and uploads them; build it once per
//!    step from the host-side sequence lengths (the same values as the device `seqlens`).
//! 2. [`MlaWorkspace::new`] allocates the fp32 partials the plan needs (reuse it across steps when large enough).
//! 3. [`mla_decode`] / [`mla_decode_fp8`] enqueue the split kernel and the combine kernel. No host synchronization.
//!
//! The launchers validate every shape, the config and the plan on the host; with [`MlaOptions::block_table_host`]
//! they also check every block-table entry that will be read. The kernels bounds-check table entries against the
//! cache on the device anyway, so a garbage table never causes an out-of-bounds read (its pages are skipped).

mod params;
pub mod sched;
pub mod sm90;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop};
use half::bf16;

use crate::device::{check_devices, Gpu};
use crate::error::{to_i32, CudaCall, Error, Result};
pub use crate::reference::mla::MlaConfig;
use crate::reference::mla::{validate_inputs, D_QK, D_V, FP8_TOKEN_BYTES};
use crate::tensor::DeviceTensor;
use crate::view::{TensorMut, TensorRef};
pub use sched::{plan_splits, SplitMode, SplitPlan, WorkItem};

const MODULE: &str = "mla";
/// Largest token capacity (`max_blocks · page_size`) of one sequence: 2^31 less a margin larger than any kernel's
/// token tile, so 32-bit token positions one tile past the end cannot overflow.
pub const MAX_TOKENS: usize = (1 << 31) - 1024;
/// Query rows (head × query token) per CTA of the plain kernel.
pub const PLAIN_ROWS_PER_CTA: usize = 16;
const PLAIN_TILE: usize = 16;
const PLAIN_THREADS: u32 = 256;
/// Threads of the one-CTA device planner (`mla_plan_balanced`).
const PLAN_THREADS: u32 = 1024;
/// Dynamic shared memory of the plain kernel: q rows and one K tile as fp32 (stride 577) plus 16 token flags.
pub const PLAIN_SMEM_BYTES: usize = 4 * (PLAIN_ROWS_PER_CTA * D_QK + PLAIN_TILE * (D_QK + 1) + PLAIN_TILE);

/// A split plan resident on the device: made on the host from host lengths ([`MlaPlan::new`]), or computed on the
/// device from the device lengths ([`MlaPlan::on_device`] + [`MlaPlan::update`]) so a captured decode step stays
/// valid when the lengths change.
#[derive(Debug)]
pub struct MlaPlan {
    schedule: Schedule,
    items: DeviceTensor<i32>,
    cta_offsets: DeviceTensor<i32>,
    split_offsets: DeviceTensor<i32>,
}

#[derive(Debug)]
enum Schedule {
    /// Made on the host: the exact items of these lengths.
    Host(SplitPlan),
    /// Computed on the device into buffers of fixed capacity; the decode grid is always `ctas`.
    Device { batch: usize, page_size: usize, max_blocks: usize, ctas: usize },
}

/// What a launch needs to know of a plan.
pub(crate) struct PlanInfo<'a> {
    pub batch: usize,
    pub page_size: usize,
    /// Partial slots the plan can name (a device plan's capacity).
    pub splits: usize,
    /// Host lengths (host plans only: a device plan's lengths live on the device).
    pub seqlens: Option<&'a [i32]>,
    /// The block table's width a device plan was made for.
    pub max_blocks: Option<usize>,
}

impl MlaPlan {
    /// Schedules `seqlens` (host copy of the device `seqlens`) for pages of `page_size` tokens and uploads the plan.
    ///
    /// Graph capture: no (allocates and copies from the host); call it before capturing.
    /// A graph captured with this plan replays the schedule of these lengths.
    pub fn new(gpu: &Gpu, seqlens: &[i32], page_size: usize, mode: SplitMode) -> Result<Self> {
        let split = plan_splits(seqlens, page_size, mode)?;
        let flat: Vec<i32> =
            split.items.iter().flat_map(|it| [it.seq, it.start_block, it.end_block, it.split]).collect();
        let items = DeviceTensor::from_host(gpu, &flat, &[split.items.len(), 4])?;
        let cta_offsets = DeviceTensor::from_host(gpu, &split.cta_offsets, &[split.cta_offsets.len()])?;
        let split_offsets = DeviceTensor::from_host(gpu, &split.split_offsets, &[split.split_offsets.len()])?;
        Ok(MlaPlan { schedule: Schedule::Host(split), items, cta_offsets, split_offsets })
    }

    /// A balanced plan (as [`MlaPlan::for_backend`]) that the device fills from the device `seqlens` on every
    /// [`MlaPlan::update`]: fixed buffers (`batch + ctas − 1` items) and a fixed decode grid (`ctas` CTAs, chosen
    /// from the SM count and `backend` as in [`MlaPlan::for_backend`]), so the update, [`mla_decode`] and
    /// [`mla_decode_fp8`] can be captured in a CUDA graph once and replayed while the lengths change. Until the first
    /// update the plan holds no work (every row's output is 0 with lse +inf).
    ///
    /// Lengths are read on the device, so the launchers cannot check them on the host: the kernels clamp them to
    /// `0 ..= max_blocks · page_size` and skip table entries outside the cache (no out-of-bounds access; the rows of
    /// a sequence whose length is out of range are unspecified). `max_blocks` is the block table's width.
    /// The items of a length set are exactly [`plan_splits`]'s in [`SplitMode::Balanced`] with `ctas` CTAs.
    ///
    /// Graph capture: no (allocates); make it before capturing. [`MlaPlan::update`] may be captured.
    pub fn on_device(gpu: &Gpu, cfg: &MlaConfig, max_blocks: usize, backend: Backend) -> Result<Self> {
        cfg.validate()?;
        if max_blocks.saturating_mul(cfg.page_size) > MAX_TOKENS {
            return Err(Error::shape(
                "max_blocks",
                "max_blocks·page_size ≤ 2^31 − 1024 tokens",
                max_blocks.saturating_mul(cfg.page_size),
            ));
        }
        let ctas = Self::target_ctas(gpu, cfg, backend);
        let capacity = cfg.batch + ctas;
        to_i32("batch + CTAs", capacity)?;
        let z = |n: usize, shape: &[usize]| DeviceTensor::from_host(gpu, &vec![0i32; n], shape);
        Ok(MlaPlan {
            schedule: Schedule::Device { batch: cfg.batch, page_size: cfg.page_size, max_blocks, ctas },
            items: z(capacity * 4, &[capacity, 4])?,
            cta_offsets: z(ctas + 1, &[ctas + 1])?,
            split_offsets: z(cfg.batch + 1, &[cfg.batch + 1])?,
        })
    }

    /// Recomputes a device plan from the device lengths `seqlens` `[batch]` (one small kernel, no host
    /// synchronization). Errors for a host plan.
    ///
    /// Graph capture: yes (one launch; no allocation, copy or synchronization).
    pub fn update<'a>(&mut self, gpu: &Gpu, seqlens: impl Into<TensorRef<'a, i32>>) -> Result<()> {
        let seqlens = seqlens.into();
        let Schedule::Device { batch, page_size, max_blocks, ctas } = self.schedule else {
            return Err(Error::InvalidConfig("update needs a plan made by MlaPlan::on_device".into()));
        };
        seqlens.expect_shape("seqlens", &[batch])?;
        check_devices!(gpu, seqlens, self.items, self.cta_offsets, self.split_offsets)?;
        if batch == 0 {
            return Ok(());
        }
        let (bi, pi, mi, ci) = (
            to_i32("batch", batch)?,
            to_i32("page_size", page_size)?,
            to_i32("max_blocks", max_blocks)?,
            to_i32("CTAs", ctas)?,
        );
        let f = gpu.function(MODULE, "mla_plan_balanced", 0)?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (PLAN_THREADS, 1, 1), shared_mem_bytes: 0 };
        let stream = gpu.stream();
        let sv = seqlens.kernel_arg(stream);
        let (items, g_items) = self.items.buffer_mut().device_ptr_mut(stream);
        let (cta_offsets, g_ctas) = self.cta_offsets.buffer_mut().device_ptr_mut(stream);
        let (split_offsets, g_splits) = self.split_offsets.buffer_mut().device_ptr_mut(stream);
        let params = params::PlanParams {
            seqlens: sv.addr(),
            items,
            cta_offsets,
            split_offsets,
            batch: bi,
            page: pi,
            max_blocks: mi,
            ctas: ci,
        };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&params);
        // SAFETY: seqlens is [batch]; the kernel clamps each length to 0..=max_blocks·page, so it writes at most
        // batch + ctas − 1 items (< the batch + ctas allocated), ctas + 1 CTA offsets and batch + 1 split offsets.
        unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
        drop((g_items, g_ctas, g_splits));
        Ok(())
    }

    /// CTAs of a balanced plan for `backend`: about one CTA per SM over the decode grid's row groups.
    fn target_ctas(gpu: &Gpu, cfg: &MlaConfig, backend: Backend) -> usize {
        let rows = cfg.s_q.saturating_mul(cfg.heads).max(1);
        let groups = match backend.resolve(gpu, cfg.page_size) {
            Backend::Auto | Backend::Portable => rows.div_ceil(PLAIN_ROWS_PER_CTA),
            Backend::Hopper => rows.div_ceil(sm90::rows_per_cta(rows, false)),
            Backend::HopperWide => rows.div_ceil(sm90::ROWS_PER_CTA),
        };
        (gpu.info().sm_count as usize / groups).max(1)
    }

    /// Partial slots the plan may name: what an [`MlaWorkspace`] for it must hold (a device plan's capacity).
    pub fn max_splits(&self) -> usize {
        self.info().splits
    }

    /// CTAs of the decode grid.
    pub(crate) fn num_ctas(&self) -> usize {
        match &self.schedule {
            Schedule::Host(split) => split.num_ctas(),
            Schedule::Device { ctas, .. } => *ctas,
        }
    }

    pub(crate) fn info(&self) -> PlanInfo<'_> {
        match &self.schedule {
            Schedule::Host(split) => PlanInfo {
                batch: split.batch(),
                page_size: split.page_size,
                splits: split.total_splits(),
                seqlens: Some(&split.seqlens),
                max_blocks: None,
            },
            Schedule::Device { batch, page_size, max_blocks, ctas } => PlanInfo {
                batch: *batch,
                page_size: *page_size,
                splits: batch + ctas,
                seqlens: None,
                max_blocks: Some(*max_blocks),
            },
        }
    }

    /// The device buffers as host vectors (syncs): items (flattened `int4`s), CTA offsets, split offsets. For
    /// tests and debugging.
    #[doc(hidden)]
    pub fn download(&self, gpu: &Gpu) -> Result<(Vec<i32>, Vec<i32>, Vec<i32>)> {
        Ok((self.items.to_host(gpu)?, self.cta_offsets.to_host(gpu)?, self.split_offsets.to_host(gpu)?))
    }

    /// Balanced plan with one piece per SM of `gpu`.
    ///
    /// Graph capture: no (allocates and copies from the host); call it before capturing.
    pub fn balanced(gpu: &Gpu, seqlens: &[i32], page_size: usize) -> Result<Self> {
        Self::new(gpu, seqlens, page_size, SplitMode::Balanced { target_ctas: gpu.info().sm_count.max(1) as usize })
    }

    /// Balanced plan sized for `backend`: the decode grid is (CTAs, row groups), so aim for about one CTA per SM
    /// in total (`sm_count / row_groups` pieces, at least one).
    ///
    /// Graph capture: no (allocates and copies from the host); call it before capturing.
    pub fn for_backend(gpu: &Gpu, seqlens: &[i32], cfg: &MlaConfig, backend: Backend) -> Result<Self> {
        let target = Self::target_ctas(gpu, cfg, backend);
        Self::new(gpu, seqlens, cfg.page_size, SplitMode::Balanced { target_ctas: target })
    }

    /// The host-side schedule (`None` for a plan computed on the device).
    pub fn split(&self) -> Option<&SplitPlan> {
        match &self.schedule {
            Schedule::Host(split) => Some(split),
            Schedule::Device { .. } => None,
        }
    }
}

/// fp32 partial outputs `[total_splits, s_q·h, 512]` and partial lse `[total_splits, s_q·h]`.
#[derive(Debug)]
pub struct MlaWorkspace {
    o_part: DeviceTensor<f32>,
    lse_part: DeviceTensor<f32>,
    splits: usize,
    rows: usize,
}

impl MlaWorkspace {
    /// Allocates the partials for `plan` and `cfg` (`s_q · heads` rows per split).
    ///
    /// Graph capture: no (allocates device memory); call it before capturing.
    pub fn new(gpu: &Gpu, plan: &MlaPlan, cfg: &MlaConfig) -> Result<Self> {
        let rows =
            cfg.s_q.checked_mul(cfg.heads).ok_or_else(|| Error::shape("cfg", "s_q·heads that fits", "overflow"))?;
        Self::with_capacity(gpu, plan.info().splits, rows)
    }

    /// Allocates room for `splits` splits of `rows` rows each.
    pub fn with_capacity(gpu: &Gpu, splits: usize, rows: usize) -> Result<Self> {
        let splits = splits.max(1);
        // SAFETY: every partial the combine reads is written by the decode kernel of the same launch first.
        let o_part = unsafe { DeviceTensor::uninit(gpu, &[splits, rows, D_V])? };
        let lse_part = unsafe { DeviceTensor::uninit(gpu, &[splits, rows])? };
        Ok(MlaWorkspace { o_part, lse_part, splits, rows })
    }
}

/// Which decode kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// [`Backend::Hopper`] on an sm_90 device for the page sizes it takes, [`Backend::Portable`] otherwise
    /// ([`Backend::resolve`]). The default: on an H200 the sm_90a path passed the same tests as the portable kernel
    /// and ran a DeepSeek-V3 decode batch's attention 37× faster (`docs/gpu-runs.md`).
    #[default]
    Auto,
    /// The plain SIMT kernel (any sm_80+ GPU).
    Portable,
    /// The sm_90a wgmma kernels ([`sm90`]): the narrow (transposed) kernel when s_q·h ≤ 32 (either cache), the
    /// 64-row kernel otherwise; errors on other GPUs or unsupported page sizes.
    Hopper,
    /// The sm_90a 64-row kernel even for few query rows (for comparisons in tests and benchmarks).
    HopperWide,
}

impl Backend {
    /// The kernel this choice runs on `gpu` for pages of `page_size` tokens: [`Backend::Auto`] becomes
    /// [`Backend::Hopper`] or [`Backend::Portable`]; the other choices are returned unchanged.
    pub fn resolve(self, gpu: &Gpu, page_size: usize) -> Backend {
        match self {
            Backend::Auto if gpu.info().is_hopper() && sm90::box_rows(page_size).is_some() => Backend::Hopper,
            Backend::Auto => Backend::Portable,
            chosen => chosen,
        }
    }
}

/// Optional launcher settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct MlaOptions<'a> {
    /// Host copy of the block table: when given, every entry that will be read is checked to be a valid page.
    pub block_table_host: Option<&'a [i32]>,
    /// Kernel choice.
    pub backend: Backend,
}

enum Cache<'a> {
    Bf16(TensorRef<'a, bf16>),
    Fp8(TensorRef<'a, u8>),
}

impl Cache<'_> {
    fn device_ordinal(&self) -> usize {
        match self {
            Cache::Bf16(t) => t.device_ordinal(),
            Cache::Fp8(t) => t.device_ordinal(),
        }
    }
}

/// Validated launch parameters shared by the kernels.
pub(crate) struct Checked {
    pub batch: i32,
    pub s_q: i32,
    pub heads: i32,
    pub page: i32,
    pub num_blocks: i32,
    pub max_blocks: i32,
    pub rows: usize,
    pub scale_log2: f32,
    pub causal: i32,
}

/// Puts the plan's and the workspace's device addresses into `params`; the returned guards (cudarc's event
/// bookkeeping) must live until the launch is enqueued.
pub(crate) fn plan_args<'s>(
    params: &mut params::DecodeParams,
    plan: &'s MlaPlan,
    ws: &'s mut MlaWorkspace,
    stream: &'s CudaStream,
) -> [SyncOnDrop<'s>; 5] {
    let (items, g_items) = plan.items.buffer().device_ptr(stream);
    let (ctas, g_ctas) = plan.cta_offsets.buffer().device_ptr(stream);
    let (splits, g_splits) = plan.split_offsets.buffer().device_ptr(stream);
    let (o_part, g_o) = ws.o_part.buffer_mut().device_ptr_mut(stream);
    let (lse_part, g_lse) = ws.lse_part.buffer_mut().device_ptr_mut(stream);
    (params.items, params.cta_offsets, params.split_offsets) = (items, ctas, splits);
    (params.o_part, params.lse_part) = (o_part, lse_part);
    [g_items, g_ctas, g_splits, g_o, g_lse]
}

impl Checked {
    /// The kernels' argument struct with these scalars; the caller fills in the device addresses (and, for the
    /// sm_90a kernels, the box sizes).
    pub(crate) fn params(&self) -> params::DecodeParams {
        params::DecodeParams {
            batch: self.batch,
            s_q: self.s_q,
            h: self.heads,
            page: self.page,
            num_blocks: self.num_blocks,
            max_blocks: self.max_blocks,
            scale_log2: self.scale_log2,
            causal: self.causal,
            ..Default::default()
        }
    }
}

/// The shapes a launch is checked against, apart from the device buffers so the checks run (and are tested)
/// without a GPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaunchShapes<'a> {
    pub q: &'a [usize],
    pub cache: &'a [usize],
    pub token_width: usize,
    pub block_table: &'a [usize],
    pub seqlens: &'a [usize],
    pub out: &'a [usize],
    pub lse: &'a [usize],
    /// (splits, rows) the workspace holds.
    pub workspace: (usize, usize),
}

fn expect(arg: &'static str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::shape(arg, format!("{want:?}"), format!("{got:?}")));
    }
    Ok(())
}

pub(crate) fn check_launch(
    sh: &LaunchShapes,
    plan: &PlanInfo,
    cfg: &MlaConfig,
    block_table_host: Option<&[i32]>,
) -> Result<Checked> {
    cfg.validate()?;
    let (b, s_q, h) = (cfg.batch, cfg.s_q, cfg.heads);
    expect("q", sh.q, &[b, s_q, h, D_QK])?;
    let &[num_blocks, page, width] = sh.cache else {
        return Err(Error::shape("kv_cache", "a rank-3 tensor", format!("{:?}", sh.cache)));
    };
    if page != cfg.page_size || width != sh.token_width {
        return Err(Error::shape(
            "kv_cache",
            format!("[num_blocks, {}, {}]", cfg.page_size, sh.token_width),
            format!("{:?}", sh.cache),
        ));
    }
    let &[tb, max_blocks] = sh.block_table else {
        return Err(Error::shape("block_table", "a rank-2 tensor", format!("{:?}", sh.block_table)));
    };
    if tb != b {
        return Err(Error::shape("block_table", format!("[{b}, max_blocks]"), format!("{:?}", sh.block_table)));
    }
    expect("seqlens", sh.seqlens, &[b])?;
    expect("out", sh.out, &[b, s_q, h, D_V])?;
    expect("lse", sh.lse, &[b, h, s_q])?;
    if plan.batch != b || plan.page_size != page {
        return Err(Error::InvalidConfig(format!(
            "plan was made for batch {} / page {}, not {b} / {page}",
            plan.batch, plan.page_size
        )));
    }
    if let Some(width) = plan.max_blocks.filter(|&w| w != max_blocks) {
        return Err(Error::InvalidConfig(format!(
            "the device plan was made for a block table {width} wide, not {max_blocks}"
        )));
    }
    let rows = s_q.checked_mul(h).ok_or_else(|| Error::shape("q", "s_q·heads below 2^31", "overflow"))?;
    let (ws_splits, ws_rows) = sh.workspace;
    if ws_rows != rows || ws_splits < plan.splits {
        return Err(Error::shape(
            "workspace",
            format!("{} splits of {rows} rows", plan.splits),
            format!("{ws_splits} splits of {ws_rows} rows"),
        ));
    }
    // The kernels form token positions as i32 (including a tile past the last token: t0 + tile, t0 + tile − 1) and
    // combine indices up to batch·rows.
    if max_blocks.saturating_mul(page) > MAX_TOKENS {
        return Err(Error::shape(
            "block_table",
            "max_blocks·page_size ≤ 2^31 − 1024 tokens",
            max_blocks.saturating_mul(page),
        ));
    }
    to_i32("batch·s_q·heads", b.saturating_mul(rows))?;
    let q_len = b * s_q * h * D_QK;
    // Lengths (and, with a host table, entries) are validated against the plan's copy of seqlens; a device plan's
    // lengths are only on the device (the kernels clamp them and skip out-of-range pages).
    let Some(seqlens) = plan.seqlens else {
        if block_table_host.is_some() {
            return Err(Error::InvalidConfig(
                "block_table_host needs a host plan: a device plan's lengths are not known on the host".into(),
            ));
        }
        return checked(cfg, num_blocks, max_blocks, rows);
    };
    match block_table_host {
        Some(t) => {
            if t.len() != b * max_blocks {
                return Err(Error::shape("block_table_host", b * max_blocks, t.len()));
            }
            validate_inputs(q_len, num_blocks * page, t, seqlens, cfg)?;
        }
        None => {
            // Only lengths can be checked (no allocation: this runs every decode step).
            let cap = (max_blocks * page) as i64;
            for (i, &len) in seqlens.iter().enumerate() {
                if len < 0 || len as i64 > cap {
                    return Err(Error::IndexOutOfRange {
                        arg: "seqlens",
                        position: i,
                        value: len as i64,
                        bound: cap + 1,
                    });
                }
                if len > 0 && num_blocks == 0 {
                    return Err(Error::IndexOutOfRange {
                        arg: "block_table",
                        position: i * max_blocks,
                        value: 0,
                        bound: 0,
                    });
                }
            }
        }
    }
    checked(cfg, num_blocks, max_blocks, rows)
}

fn checked(cfg: &MlaConfig, num_blocks: usize, max_blocks: usize, rows: usize) -> Result<Checked> {
    Ok(Checked {
        batch: to_i32("batch", cfg.batch)?,
        s_q: to_i32("s_q", cfg.s_q)?,
        heads: to_i32("heads", cfg.heads)?,
        page: to_i32("page_size", cfg.page_size)?,
        num_blocks: to_i32("num_blocks", num_blocks)?,
        max_blocks: to_i32("max_blocks", max_blocks)?,
        rows,
        scale_log2: cfg.softmax_scale * std::f32::consts::LOG2_E,
        causal: i32::from(cfg.causal),
    })
}

#[allow(clippy::too_many_arguments)]
fn validate(
    q: &TensorRef<'_, bf16>,
    cache: (&[usize], bool),
    token_width: usize,
    block_table: &TensorRef<'_, i32>,
    seqlens: &TensorRef<'_, i32>,
    plan: &MlaPlan,
    cfg: &MlaConfig,
    out: &TensorMut<'_, bf16>,
    lse: &TensorMut<'_, f32>,
    ws: &MlaWorkspace,
    opts: &MlaOptions,
) -> Result<Checked> {
    let (cache_shape, cache_dense) = cache;
    // The kernels address every tensor as dense rows (the cache by token, q and out by head row).
    q.require_dense("q")?;
    if !cache_dense {
        return Err(Error::shape("kv_cache", "a dense view", "a strided view"));
    }
    block_table.require_dense("block_table")?;
    out.require_dense("out")?;
    lse.require_dense("lse")?;
    let sh = LaunchShapes {
        q: q.shape(),
        cache: cache_shape,
        token_width,
        block_table: block_table.shape(),
        seqlens: seqlens.shape(),
        out: out.shape(),
        lse: lse.shape(),
        workspace: (ws.splits, ws.rows),
    };
    check_launch(&sh, &plan.info(), cfg, opts.block_table_host)
}

/// Every host check [`mla_decode`] makes before it launches, without launching: a caller that writes other
/// outputs first (the decode layer appends to the cache) runs this before them, so a bad step writes nothing.
#[cfg(feature = "layer")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_decode(
    gpu: &Gpu,
    q: &TensorRef<'_, bf16>,
    kv_cache: &TensorRef<'_, bf16>,
    block_table: &TensorRef<'_, i32>,
    seqlens: &TensorRef<'_, i32>,
    plan: &MlaPlan,
    cfg: &MlaConfig,
    out: &TensorMut<'_, bf16>,
    lse: &TensorMut<'_, f32>,
    workspace: &MlaWorkspace,
    opts: &MlaOptions,
) -> Result<()> {
    let cache = (kv_cache.shape(), kv_cache.is_dense());
    validate(q, cache, D_QK, block_table, seqlens, plan, cfg, out, lse, workspace, opts)?;
    check_devices!(gpu, q, kv_cache, block_table, seqlens, out, lse)?;
    check_devices!(gpu, plan.items, plan.cta_offsets, plan.split_offsets, workspace.o_part, workspace.lse_part)
}

/// MLA decode with a bf16 cache `[num_blocks, page_size, 576]`. Writes `out` `[b, s_q, h, 512]` bf16 and `lse`
/// `[b, h, s_q]` f32 (natural log; +inf for rows that attend no key). Enqueued on the GPU's stream.
///
/// Graph capture: yes (launches only; no allocation, copy or synchronization).
/// The plan is fixed at capture: replays keep its schedule, so lengths must not outgrow it.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode<'a>(
    gpu: &Gpu,
    q: impl Into<TensorRef<'a, bf16>>,
    kv_cache: impl Into<TensorRef<'a, bf16>>,
    block_table: impl Into<TensorRef<'a, i32>>,
    seqlens: impl Into<TensorRef<'a, i32>>,
    plan: &MlaPlan,
    cfg: &MlaConfig,
    out: impl Into<TensorMut<'a, bf16>>,
    lse: impl Into<TensorMut<'a, f32>>,
    workspace: &mut MlaWorkspace,
    opts: &MlaOptions,
) -> Result<()> {
    let (q, kv_cache, block_table, seqlens) = (q.into(), kv_cache.into(), block_table.into(), seqlens.into());
    let (mut out, mut lse) = (out.into(), lse.into());
    let cache = (kv_cache.shape(), kv_cache.is_dense());
    let c = validate(&q, cache, D_QK, &block_table, &seqlens, plan, cfg, &out, &lse, workspace, opts)?;
    let kv = Cache::Bf16(kv_cache);
    launch(gpu, &q, kv, &block_table, &seqlens, plan, &c, &mut out, &mut lse, workspace, opts.backend)
}

/// MLA decode with the FP8 cache `[num_blocks, page_size, 656]` bytes (layout:
/// [`crate::reference::mla::fp8_token_layout`]), dequantized in the kernel. Otherwise as [`mla_decode`].
///
/// Graph capture: as [`mla_decode`].
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_fp8<'a>(
    gpu: &Gpu,
    q: impl Into<TensorRef<'a, bf16>>,
    kv_cache: impl Into<TensorRef<'a, u8>>,
    block_table: impl Into<TensorRef<'a, i32>>,
    seqlens: impl Into<TensorRef<'a, i32>>,
    plan: &MlaPlan,
    cfg: &MlaConfig,
    out: impl Into<TensorMut<'a, bf16>>,
    lse: impl Into<TensorMut<'a, f32>>,
    workspace: &mut MlaWorkspace,
    opts: &MlaOptions,
) -> Result<()> {
    let (q, kv_cache, block_table, seqlens) = (q.into(), kv_cache.into(), block_table.into(), seqlens.into());
    let (mut out, mut lse) = (out.into(), lse.into());
    let cache = (kv_cache.shape(), kv_cache.is_dense());
    let c = validate(&q, cache, FP8_TOKEN_BYTES, &block_table, &seqlens, plan, cfg, &out, &lse, workspace, opts)?;
    let kv = Cache::Fp8(kv_cache);
    launch(gpu, &q, kv, &block_table, &seqlens, plan, &c, &mut out, &mut lse, workspace, opts.backend)
}

#[allow(clippy::too_many_arguments)]
fn launch(
    gpu: &Gpu,
    q: &TensorRef<'_, bf16>,
    cache: Cache,
    block_table: &TensorRef<'_, i32>,
    seqlens: &TensorRef<'_, i32>,
    plan: &MlaPlan,
    c: &Checked,
    out: &mut TensorMut<'_, bf16>,
    lse: &mut TensorMut<'_, f32>,
    ws: &mut MlaWorkspace,
    backend: Backend,
) -> Result<()> {
    check_devices!(gpu, q, cache, block_table, seqlens, out, lse)?;
    check_devices!(gpu, plan.items, plan.cta_offsets, plan.split_offsets, ws.o_part, ws.lse_part)?;
    if c.batch == 0 {
        return Ok(());
    }
    let ctas = plan.num_ctas();
    if ctas > 0 {
        match backend.resolve(gpu, c.page as usize) {
            Backend::Hopper | Backend::HopperWide => {
                let kv = match cache {
                    Cache::Bf16(kv) => sm90::FastCache::Bf16(kv),
                    Cache::Fp8(kv) => sm90::FastCache::Fp8(kv),
                };
                let wide = backend == Backend::HopperWide;
                sm90::launch_decode(gpu, q, kv, block_table, seqlens, plan, c, ws, wide)?;
            }
            Backend::Auto | Backend::Portable => {
                let row_groups = c.rows.div_ceil(PLAIN_ROWS_PER_CTA);
                let grid_y = u32::try_from(row_groups)
                    .ok()
                    .filter(|&y| y <= 65_535)
                    .ok_or_else(|| Error::shape("q", "s_q·heads ≤ 65535·16", c.rows))?;
                let grid_x = u32::try_from(ctas).map_err(|_| Error::shape("plan", "fewer than 2^32 CTAs", ctas))?;
                let name = match cache {
                    Cache::Bf16(_) => "mla_decode_plain_bf16",
                    Cache::Fp8(_) => "mla_decode_plain_fp8",
                };
                let f = gpu.function(MODULE, name, PLAIN_SMEM_BYTES as u32)?;
                let cfg = LaunchConfig {
                    grid_dim: (grid_x, grid_y, 1),
                    block_dim: (PLAIN_THREADS, 1, 1),
                    shared_mem_bytes: PLAIN_SMEM_BYTES as u32,
                };
                let stream = gpu.stream();
                let (qv, tv, sv) = (q.kernel_arg(stream), block_table.kernel_arg(stream), seqlens.kernel_arg(stream));
                let kv = match &cache {
                    Cache::Bf16(kv) => kv.kernel_arg(stream),
                    Cache::Fp8(kv) => kv.kernel_arg(stream),
                };
                let mut params = params::DecodeParams {
                    q: qv.addr(),
                    cache: kv.addr(),
                    block_table: tv.addr(),
                    seqlens: sv.addr(),
                    ..c.params()
                };
                let _plan_guards = plan_args(&mut params, plan, ws, stream);
                let mut launch = stream.launch_builder(&f);
                launch.arg(&params);
                // SAFETY: shapes were validated: q is [b, s_q, h, 576], the cache [num_blocks, page, width], the table
                // [b, max_blocks], seqlens [b]. The kernel clamps seqlens to max_blocks·page, reads table columns
                // below that only, skips entries outside 0..num_blocks, and writes partial slots
                // split_offsets[b] + split < total_splits ≤ workspace splits (checked), rows < s_q·h.
                unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
            }
        }
    }
    combine(gpu, plan, c, out, lse, ws)
}

pub(crate) fn combine(
    gpu: &Gpu,
    plan: &MlaPlan,
    c: &Checked,
    out: &mut TensorMut<'_, bf16>,
    lse: &mut TensorMut<'_, f32>,
    ws: &MlaWorkspace,
) -> Result<()> {
    let warps = c.batch as u64 * c.rows as u64;
    let blocks = u32::try_from(warps.div_ceil(8)).map_err(|_| Error::shape("q", "fewer rows", warps))?;
    let f = gpu.function(MODULE, "mla_combine", 0)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let stream = gpu.stream();
    let (o_part, g_o) = ws.o_part.buffer().device_ptr(stream);
    let (lse_part, g_lse) = ws.lse_part.buffer().device_ptr(stream);
    let (split_offsets, g_splits) = plan.split_offsets.buffer().device_ptr(stream);
    let (outv, lsev) = (out.kernel_arg(stream), lse.kernel_arg(stream));
    let params = params::CombineParams {
        o_part,
        lse_part,
        split_offsets,
        out: outv.addr(),
        lse: lsev.addr(),
        batch: c.batch,
        s_q: c.s_q,
        h: c.heads,
    };
    let mut launch = stream.launch_builder(&f);
    launch.arg(&params);
    // SAFETY: one warp per (sequence, row) below batch·s_q·h; it reads partial slots of its sequence
    // (split_offsets[b] .. split_offsets[b+1] ≤ workspace splits) and writes its row of out and one lse entry.
    unsafe { launch.launch(cfg) }.cuda_call("cuLaunchKernel")?;
    drop((g_o, g_lse, g_splits));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Shapes {
        q: Vec<usize>,
        cache: Vec<usize>,
        width: usize,
        table: Vec<usize>,
        seqlens: Vec<usize>,
        out: Vec<usize>,
        lse: Vec<usize>,
        ws: (usize, usize),
    }

    impl Shapes {
        fn good(cfg: &MlaConfig, num_blocks: usize, max_blocks: usize, splits: usize) -> Self {
            let (b, s_q, h) = (cfg.batch, cfg.s_q, cfg.heads);
            Shapes {
                q: vec![b, s_q, h, D_QK],
                cache: vec![num_blocks, cfg.page_size, D_QK],
                width: D_QK,
                table: vec![b, max_blocks],
                seqlens: vec![b],
                out: vec![b, s_q, h, D_V],
                lse: vec![b, h, s_q],
                ws: (splits, s_q * h),
            }
        }
        fn check(&self, split: &SplitPlan, cfg: &MlaConfig, table: Option<&[i32]>) -> Result<Checked> {
            let sh = LaunchShapes {
                q: &self.q,
                cache: &self.cache,
                token_width: self.width,
                block_table: &self.table,
                seqlens: &self.seqlens,
                out: &self.out,
                lse: &self.lse,
                workspace: self.ws,
            };
            let info = PlanInfo {
                batch: split.batch(),
                page_size: split.page_size,
                splits: split.total_splits(),
                seqlens: Some(&split.seqlens),
                max_blocks: None,
            };
            check_launch(&sh, &info, cfg, table)
        }
    }

    #[test]
    fn launch_validation_without_a_gpu() {
        let cfg = MlaConfig { batch: 2, s_q: 2, heads: 16, page_size: 64, softmax_scale: 0.1, causal: true };
        let lens = [100, 0];
        let split = plan_splits(&lens, 64, SplitMode::Balanced { target_ctas: 4 }).unwrap();
        let n = split.total_splits();
        let table = [3, 1, i32::MAX, -7]; // seq 0 reads pages 3 and 1; seq 1 reads nothing
        let good = Shapes::good(&cfg, 4, 2, n);
        let c = good.check(&split, &cfg, Some(&table)).unwrap();
        assert_eq!((c.batch, c.rows, c.num_blocks, c.max_blocks, c.causal), (2, 32, 4, 2, 1));
        assert!((c.scale_log2 - 0.1 * std::f32::consts::LOG2_E).abs() < 1e-7);
        assert!(good.check(&split, &cfg, None).is_ok());

        // Each shape wrong in turn.
        let bad = |f: &dyn Fn(&mut Shapes)| {
            let mut s = Shapes::good(&cfg, 4, 2, n);
            f(&mut s);
            s.check(&split, &cfg, Some(&table))
        };
        assert!(matches!(bad(&|s| s.q[2] = 8), Err(Error::Shape { arg: "q", .. })));
        assert!(matches!(bad(&|s| s.cache[1] = 32), Err(Error::Shape { arg: "kv_cache", .. })));
        assert!(matches!(bad(&|s| s.cache = vec![4, 64]), Err(Error::Shape { arg: "kv_cache", .. })));
        assert!(matches!(bad(&|s| s.width = 656), Err(Error::Shape { arg: "kv_cache", .. })));
        assert!(matches!(bad(&|s| s.table = vec![3, 2]), Err(Error::Shape { arg: "block_table", .. })));
        assert!(matches!(bad(&|s| s.seqlens = vec![3]), Err(Error::Shape { arg: "seqlens", .. })));
        assert!(matches!(bad(&|s| s.out[3] = 576), Err(Error::Shape { arg: "out", .. })));
        assert!(matches!(bad(&|s| s.lse = vec![2, 2, 16]), Err(Error::Shape { arg: "lse", .. })));
        assert!(matches!(bad(&|s| s.ws = (n - 1, 32)), Err(Error::Shape { arg: "workspace", .. })));
        assert!(matches!(bad(&|s| s.ws = (n, 16)), Err(Error::Shape { arg: "workspace", .. })));

        // Config: scale required and finite.
        for scale in [f32::NAN, f32::INFINITY, 0.0] {
            let bad_cfg = MlaConfig { softmax_scale: scale, ..cfg };
            assert!(matches!(good.check(&split, &bad_cfg, None), Err(Error::InvalidConfig(_))));
        }
        // Plan for another batch / page size.
        let other = plan_splits(&[100], 64, SplitMode::Balanced { target_ctas: 4 }).unwrap();
        assert!(matches!(good.check(&other, &cfg, None), Err(Error::InvalidConfig(_))));
        // Host table: an entry that will be read is out of range; a short table.
        let t2 = [3, 4, 0, 0];
        assert!(matches!(
            good.check(&split, &cfg, Some(&t2)),
            Err(Error::IndexOutOfRange { arg: "block_table", position: 1, .. })
        ));
        assert!(matches!(good.check(&split, &cfg, Some(&t2[..3])), Err(Error::Shape { .. })));
        // Sequence longer than the table's capacity (2 pages of 64).
        let long = plan_splits(&[129, 0], 64, SplitMode::Balanced { target_ctas: 4 }).unwrap();
        let s_long = Shapes::good(&cfg, 4, 2, long.total_splits());
        assert!(matches!(s_long.check(&long, &cfg, None), Err(Error::IndexOutOfRange { arg: "seqlens", .. })));
        // No pages at all but tokens to read.
        let s_empty = Shapes::good(&cfg, 0, 2, n);
        assert!(matches!(s_empty.check(&split, &cfg, None), Err(Error::IndexOutOfRange { .. })));
        // ... which is fine when nothing is read.
        let none = plan_splits(&[0, 0], 64, SplitMode::Balanced { target_ctas: 4 }).unwrap();
        assert!(Shapes::good(&cfg, 0, 2, 0).check(&none, &cfg, None).is_ok());
        // i32 overflow of max_blocks·page.
        let huge = Shapes { table: vec![2, 1 << 26], ..Shapes::good(&cfg, 4, 2, n) };
        assert!(huge.check(&split, &cfg, None).is_err());
        // ... also just below 2^31 (t0 + tile would overflow), while the limit itself is accepted.
        let near = Shapes { table: vec![2, (1 << 25) - 1], ..Shapes::good(&cfg, 4, 2, n) };
        // (capacity 2^31 − 64 tokens: the last 16-token tile starts at 2^31 − 80, the next t0 at 2^31 − 64 is fine,
        // but the 64-token tiles of the sm90 kernel reach 2^31.)
        assert!(matches!(near.check(&split, &cfg, None), Err(Error::Shape { arg: "block_table", .. })));
        let at = Shapes { table: vec![2, MAX_TOKENS / 64], ..Shapes::good(&cfg, 4, 2, n) };
        assert!(at.check(&split, &cfg, None).is_ok());
        assert!(MAX_TOKENS + 1023 <= i32::MAX as usize);
    }
}
