//! An inference engine's use of the crate: the engine owns the CUDA stream and every buffer (allocated with its own
//! cudarc calls, as it would from its allocator), the crate's kernels run on them without copies — borrowed views
//! ([`TensorRef`] over the engine's cudarc slices and raw device pointers, one layer of a pooled KV cache) or
//! buffers handed over whole ([`DeviceTensor::from_cuda_slice`]) — and one
//! decode-style step — activation quantization → FP8 GEMM → MLA decode → MoE layer — is captured in a CUDA graph and
//! replayed on new inputs.
//!
//! Checks, and exits non-zero on any failure: every stage of the eager step against the CPU reference
//! (`r1_kernels::reference`), and the graph replay on changed inputs against an eager run on the same inputs, bitwise.
//!
//! ```sh
//! cargo run --release --example engine                                  # a GPU (sm_90a for the fast paths)
//! LD_LIBRARY_PATH=target/release cargo run --release --example engine   # the emulated driver (emu/)
//! ```
//!
//! What is captured: launches only. Each stage's workspace is made before capture. The MLA split plan is computed on
//! the device from the device sequence lengths ([`MlaPlan::on_device`], updated inside the step), so the replayed
//! step serves new lengths: step 2 grows both sequences past step 1's pages.

use std::error::Error as StdError;
use std::sync::Arc;

use r1_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use r1_kernels::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use r1_kernels::fp8_gemm::{self, GemmKernel, GemmOptions};
use r1_kernels::mla::{self, Backend, MlaOptions, MlaPlan, MlaWorkspace};
use r1_kernels::moe::{moe_forward, ExpertWeightViews, Layout, MoeWorkspace, RouterConfig, Routing};
use r1_kernels::quant::{activation_scale_shape, quantize_activations};
use r1_kernels::reference::{self, mla::MlaConfig, moe::ExpertsFp8, quant::ScaleFormat};
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor, Gpu, TensorRef, E4M3};

type Res<T> = Result<T, Box<dyn StdError>>;

/// The engine's allocator: a buffer on the engine's stream, filled from the host.
fn engine_buffer<T: DeviceRepr + ValidAsZeroBits>(stream: &Arc<CudaStream>, host: &[T]) -> Res<CudaSlice<T>> {
    let mut buf: CudaSlice<T> = stream.alloc_zeros(host.len().max(1))?;
    if !host.is_empty() {
        stream.memcpy_htod(host, &mut buf.slice_mut(0..host.len()))?;
    }
    Ok(buf)
}

/// An engine buffer handed to the crate whole, without a copy.
fn engine_tensor<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    host: &[T],
    shape: &[usize],
) -> Res<DeviceTensor<T>> {
    Ok(DeviceTensor::from_cuda_slice(engine_buffer(stream, host)?, shape)?)
}

fn engine_zeros<T: DeviceRepr + ValidAsZeroBits>(stream: &Arc<CudaStream>, shape: &[usize]) -> Res<DeviceTensor<T>> {
    let n: usize = shape.iter().product();
    Ok(DeviceTensor::from_cuda_slice(stream.alloc_zeros(n.max(1))?, shape)?)
}

fn uniform(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * scale).collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn f32s(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn check(what: &str, got: &[f32], want: &[f32], bound: f64) -> Res<()> {
    let diff = reference::fp8_gemm::calc_diff(got, want);
    println!("  {what:<40} calc_diff {diff:.2e} (bound {bound:.0e})");
    if diff.is_nan() || diff >= bound || got.iter().any(|v| !v.is_finite()) {
        return Err(format!("{what}: differs from the reference (calc_diff {diff:.3e})").into());
    }
    Ok(())
}

/// Random FP8 experts as codes and block scales (NaN codes avoided).
fn experts(rng: &mut SplitMix64, e: usize, h: usize, i: usize) -> ExpertsFp8 {
    let mut codes = |n: usize| -> Vec<E4M3> {
        (0..n).map(|_| (rng.next_u64() & 0xff) as u8).map(|b| E4M3(if b & 0x7f == 0x7f { b - 1 } else { b })).collect()
    };
    let (w13, w2) = (codes(e * 2 * i * h), codes(e * h * i));
    let s13 = vec![1.0 / (100.0 * (h as f32).sqrt()); e * (2 * i / 128) * (h / 128)];
    let s2 = vec![1.0 / (100.0 * (i as f32).sqrt()); e * (h / 128) * (i / 128)];
    ExpertsFp8 { num_experts: e, hidden: h, intermediate: i, w13, w13_scales: s13, w2, w2_scales: s2 }
}

fn main() -> Res<()> {
    if !r1_kernels::device::cuda_driver_present() {
        println!("engine example: no CUDA driver on this machine; nothing to run");
        return Ok(());
    }
    // The engine's context and stream; the crate borrows the stream (as it would an engine's raw CUstream on another
    // cudarc version) and loads every kernel before anything is captured.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    // SAFETY: `stream` is a live stream of device 0's primary context and outlives `gpu`.
    let gpu = unsafe { Gpu::from_raw_stream(0, stream.cu_stream()) }?;
    let modules = gpu.preload()?;
    println!("engine example on {} ({modules} kernel modules preloaded)", gpu.device_name());
    let mut rng = SplitMix64::new(2026);

    // ---- weights and state, allocated by the engine -------------------------------------------------------------
    let (m, n, k) = (4usize, 128usize, 1024usize); // few tiles and 8 K blocks: the plan splits K
    let w = uniform(&mut rng, n * k, 0.05);
    let (b_codes, b_scales) = reference::quant::quantize_per_block(&w, n, k, 128)?;
    // The GEMM weights as an engine on another allocator would pass them: raw device pointers.
    let (b_buf, sb_buf) = (engine_buffer(&stream, &b_codes)?, engine_buffer(&stream, &b_scales)?);
    let (b_ptr, sb_ptr) = (b_buf.device_ptr(&stream).0, sb_buf.device_ptr(&stream).0);
    let ordinal = gpu.info().ordinal;
    // SAFETY: both buffers are live allocations of this device holding initialized codes and scales; they are
    // dropped at the end of main, after the last synchronization, and nothing else writes them.
    let b = unsafe { TensorRef::<E4M3>::from_raw(b_ptr, b_buf.len(), ordinal, &[n, k], None)? };
    let sb = unsafe { TensorRef::<f32>::from_raw(sb_ptr, sb_buf.len(), ordinal, &[n / 128, k / 128], None)? };

    let (batch, heads, page) = (2usize, 16usize, 64usize);
    let seqlens = vec![70i32, 5];
    let seqlens2 = vec![150i32, 100]; // step 2 (replayed): both sequences reach pages step 1 never read
    let max_blocks = 3usize;
    let table = vec![0i32, 2, 3, 1, 4, -1];
    let num_blocks = 5usize;
    let mut cache = vec![0f32; num_blocks * page * 576];
    for x in cache.iter_mut() {
        *x = bf16::from_f32((rng.next_f32() * 2.0 - 1.0) * 0.5).to_f32();
    }
    // The engine's KV cache pool holds every layer; this step reads layer 1 (layer 0 is NaN: a read of the wrong
    // layer would show).
    let layers = 2usize;
    let mut pool = vec![bf16::NAN; layers * cache.len()];
    pool[cache.len()..].copy_from_slice(&to_bf16(&cache));
    let cache_pool = engine_buffer(&stream, &pool)?;
    let cache_d = TensorRef::from_cuda_slice(&cache_pool, &[layers, num_blocks, page, 576], None)?
        .narrow(0, 1..2)?
        .reshape(&[num_blocks, page, 576])?;
    let table_d = engine_tensor(&stream, &table, &[batch, max_blocks])?;
    let mut seqlens_d = engine_tensor(&stream, &seqlens, &[batch])?;
    let mla_cfg = MlaConfig { batch, s_q: 1, heads, page_size: page, softmax_scale: 1.0 / 24.0, causal: true };

    let router =
        RouterConfig { num_experts: 8, top_k: 2, num_groups: 1, topk_groups: 1, ..RouterConfig::deepseek_v3() };
    let (hidden, inter, tokens) = (256usize, 128usize, 4usize);
    let ex = experts(&mut rng, 8, hidden, inter);
    // Expert weights stay in the engine's buffers; the crate borrows them.
    let expert_bufs = (
        engine_buffer(&stream, &ex.w13)?,
        engine_buffer(&stream, &ex.w13_scales)?,
        engine_buffer(&stream, &ex.w2)?,
        engine_buffer(&stream, &ex.w2_scales)?,
    );
    let experts_d = ExpertWeightViews {
        w13: TensorRef::from_cuda_slice(&expert_bufs.0, &[8, 2 * inter, hidden], None)?,
        w13_scales: TensorRef::from_cuda_slice(&expert_bufs.1, &[8, 2 * inter / 128, hidden / 128], None)?,
        w2: TensorRef::from_cuda_slice(&expert_bufs.2, &[8, hidden, inter], None)?,
        w2_scales: TensorRef::from_cuda_slice(&expert_bufs.3, &[8, hidden / 128, inter / 128], None)?,
    };
    let bias = uniform(&mut rng, 8, 0.05);
    let bias_d = engine_tensor(&stream, &bias, &[8])?;

    // ---- activations and outputs, also the engine's ---------------------------------------------------------------
    let mut x_d = engine_zeros::<bf16>(&stream, &[m, k])?;
    let mut xq = engine_zeros::<E4M3>(&stream, &[m, k])?;
    let mut xs = engine_zeros::<f32>(&stream, &activation_scale_shape(m, k))?;
    let mut y = engine_zeros::<bf16>(&stream, &[m, n])?;
    let opts = GemmOptions { kernel: GemmKernel::Auto, ..Default::default() };
    let ws_len = fp8_gemm::workspace_elements(&gpu, m, n, k, false, &opts)?;
    let mut gemm_ws = engine_zeros::<f32>(&stream, &[ws_len.max(1)])?;
    println!("FP8 GEMM {m}×{n}×{k}: {ws_len} fp32 workspace elements from the engine");
    let mut q_d = engine_zeros::<bf16>(&stream, &[batch, 1, heads, 576])?;
    let mut o_d = engine_zeros::<bf16>(&stream, &[batch, 1, heads, 512])?;
    let mut lse_d = engine_zeros::<f32>(&stream, &[batch, heads, 1])?;
    let backend = if gpu.info().is_hopper() { Backend::Hopper } else { Backend::Portable };
    let mut plan = MlaPlan::on_device(&gpu, &mla_cfg, max_blocks, backend)?;
    let mut mla_ws = MlaWorkspace::new(&gpu, &plan, &mla_cfg)?;
    // The device plan's lengths are not known on the host, so the table is checked on the device (bad pages skipped).
    let mla_opts = MlaOptions { block_table_host: None, backend };
    let mut h_d = engine_zeros::<bf16>(&stream, &[tokens, hidden])?;
    let mut logits_d = engine_zeros::<f32>(&stream, &[tokens, 8])?;
    let mut moe_out = engine_zeros::<bf16>(&stream, &[tokens, hidden])?;
    let mut moe_ws = MoeWorkspace::new(&gpu, &router, tokens, hidden, inter, None, Layout::Contiguous { block_m: 64 })?;

    // One step: only launches, on the engine's stream (a macro rather than a closure, so the outputs can be read
    // between steps).
    macro_rules! step {
        () => {{
            quantize_activations(&gpu, &x_d, &mut xq, &mut xs, ScaleFormat::F32)?;
            fp8_gemm::fp8_gemm_with_workspace(&gpu, &xq, &xs, &b, &sb, &mut y, &mut gemm_ws, &opts)?;
            plan.update(&gpu, &seqlens_d)?;
            mla::mla_decode(
                &gpu,
                &q_d,
                cache_d,
                &table_d,
                &seqlens_d,
                &plan,
                &mla_cfg,
                &mut o_d,
                &mut lse_d,
                &mut mla_ws,
                &mla_opts,
            )?;
            let routing = Routing::logits(&logits_d, Some(&bias_d));
            let no_shared_expert = None::<ExpertWeightViews>;
            moe_forward(&gpu, &router, experts_d, no_shared_expert, &h_d, routing, &mut moe_ws, &mut moe_out)
        }};
    }

    // Inputs of step 1 (engine writes them into its buffers), eager run, reference checks.
    let inputs = |rng: &mut SplitMix64| {
        let x = uniform(rng, m * k, 2.0);
        let q = uniform(rng, batch * heads * 576, 1.0);
        let h = uniform(rng, tokens * hidden, 1.0);
        let logits = uniform(rng, tokens * 8, 3.0);
        (to_bf16(&x), to_bf16(&q), to_bf16(&h), logits)
    };
    let (x1, q1, h1, l1) = inputs(&mut rng);
    let write = |d: &mut DeviceTensor<bf16>, v: &[bf16]| d.copy_from_host(&gpu, v);
    write(&mut x_d, &x1)?;
    write(&mut q_d, &q1)?;
    write(&mut h_d, &h1)?;
    logits_d.copy_from_host(&gpu, &l1)?;
    step!()?;
    gpu.synchronize()?;
    println!("eager step against the CPU reference:");
    {
        let (a_h, sa_h) = (xq.to_host(&gpu)?, xs.to_host(&gpu)?);
        let sa_rows = reference::quant::scales_from_mn_major(&sa_h, m, k / 128)?;
        let want = reference::fp8_gemm::fp8_gemm(&a_h, &sa_rows, &b_codes, &b_scales, m, n, k)?;
        check("quant → FP8 GEMM", &f32s(&y.to_host(&gpu)?), &want, 1e-5)?;
        let (o_ref, lse_ref) = reference::mla::mla_decode(&f32s(&q1), &cache, &table, &seqlens, &mla_cfg)?;
        check("MLA decode (o)", &f32s(&o_d.to_host(&gpu)?), &o_ref, 1e-5)?;
        check("MLA decode (lse)", &lse_d.to_host(&gpu)?, &lse_ref, 1e-9)?;
        let (ids, wts) = reference::moe::route(&l1, Some(&bias), tokens, &router)?;
        let want = reference::moe::moe_forward_fp8(&f32s(&h1), tokens, &ids, &wts, router.top_k, &ex, None)?;
        check("MoE layer", &f32s(&moe_out.to_host(&gpu)?), &want, 1e-3)?;
    }

    // Capture the step once, then replay it on step 2's inputs and compare with an eager run of step 2.
    // cudarc records an event per buffer use on contexts in multi-stream mode; a captured stream must not wait on
    // events recorded outside the capture. Tracking is per context object: the engine's and the one the crate made
    // for the borrowed stream.
    // SAFETY: every buffer is used on this one stream only, so cudarc's cross-stream events are not needed.
    unsafe {
        ctx.disable_event_tracking();
        gpu.context().disable_event_tracking();
    }
    gpu.stream().begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = step!();
    let graph = gpu.stream().end_capture(CUgraphInstantiate_flags(0))?;
    unsafe {
        ctx.enable_event_tracking();
        gpu.context().enable_event_tracking();
    }
    captured?;
    let graph = graph.ok_or("the capture recorded no work")?;
    let (x2, q2, h2, l2) = inputs(&mut rng);
    write(&mut x_d, &x2)?;
    write(&mut q_d, &q2)?;
    write(&mut h_d, &h2)?;
    logits_d.copy_from_host(&gpu, &l2)?;
    seqlens_d.copy_from_host(&gpu, &seqlens2)?;
    graph.launch()?;
    gpu.synchronize()?;
    // The replayed MLA against the reference at step 2's lengths (the graph was captured at step 1's).
    let (o_ref, lse_ref) = reference::mla::mla_decode(&f32s(&q2), &cache, &table, &seqlens2, &mla_cfg)?;
    check("replayed MLA decode, new lengths (o)", &f32s(&o_d.to_host(&gpu)?), &o_ref, 1e-5)?;
    check("replayed MLA decode, new lengths (lse)", &lse_d.to_host(&gpu)?, &lse_ref, 1e-9)?;
    let bits16 =
        |t: &DeviceTensor<bf16>| -> Res<Vec<u16>> { Ok(t.to_host(&gpu)?.iter().map(|v| v.to_bits()).collect()) };
    let replayed = (bits16(&y)?, bits16(&o_d)?, lse_d.to_host(&gpu)?, bits16(&moe_out)?);
    step!()?;
    gpu.synchronize()?;
    let eager = (bits16(&y)?, bits16(&o_d)?, lse_d.to_host(&gpu)?, bits16(&moe_out)?);
    let same_lse = replayed.2.iter().zip(&eager.2).all(|(a, b)| a.to_bits() == b.to_bits());
    if replayed.0 != eager.0 || replayed.1 != eager.1 || !same_lse || replayed.3 != eager.3 {
        return Err("graph replay on new inputs and lengths differs from the eager step".into());
    }
    println!("graph replay on new inputs and lengths equals the eager step bitwise (GEMM, MLA o and lse, MoE)");
    drop(graph);
    drop(gpu);
    stream.synchronize()?;
    Ok(())
}
