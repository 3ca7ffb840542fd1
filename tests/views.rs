//! Borrowed views (`TensorRef` / `TensorMut`) through the launchers: memory the caller owns (cudarc slices, raw
//! pointers), parts of pooled buffers, strided rows. Each result is compared bit for bit with the same launch over
//! dense `DeviceTensor`s, and the memory around a view is checked untouched.

use r1_kernels::cudarc::driver::{CudaSlice, DevicePtr};
use r1_kernels::device::test_gpu;
use r1_kernels::mla::{self, MlaOptions, MlaPlan, MlaWorkspace};
use r1_kernels::reference::mla::MlaConfig;
use r1_kernels::reference::quant::ScaleFormat;
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, decode_ops, fp8_gemm, quant, DeviceTensor, Error, Gpu, TensorMut, TensorRef};

mod common;
use common::{bf16_vec, finite_e4m3_codes};

fn random_bf16(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    bf16_vec(&mut SplitMix64::new(seed), n, -scale, scale)
}

/// A bf16 NaN pattern no kernel produces, to see which elements a launch wrote.
const POISON: bf16 = bf16::from_bits(0x7fa5);

fn address<T>(gpu: &Gpu, s: &CudaSlice<T>) -> u64 {
    s.device_ptr(gpu.stream()).0
}

#[test]
fn rms_norm_reads_and_writes_strided_column_windows() {
    let Some(gpu) = test_gpu("rms_norm_reads_and_writes_strided_column_windows") else { return };
    let (rows, d) = (37usize, 64usize);
    let (x_width, x_col, y_width, y_col) = (96usize, 16usize, 80usize, 8usize);
    let x_wide = random_bf16(rows * x_width, 1, 3.0);
    let w = random_bf16(d, 2, 1.5);
    let x_dense: Vec<bf16> = (0..rows).flat_map(|r| x_wide[r * x_width + x_col..][..d].to_vec()).collect();
    let xd = DeviceTensor::from_host(&gpu, &x_dense, &[rows, d]).unwrap();
    let wd = DeviceTensor::from_host(&gpu, &w, &[d]).unwrap();
    let mut want = DeviceTensor::from_host(&gpu, &vec![POISON; rows * d], &[rows, d]).unwrap();
    decode_ops::rms_norm(&gpu, &xd, &wd, &mut want, 1e-6).unwrap();
    let want = want.to_host(&gpu).unwrap();

    let x_buf = DeviceTensor::from_host(&gpu, &x_wide, &[rows, x_width]).unwrap();
    let mut y_buf = DeviceTensor::from_host(&gpu, &vec![POISON; rows * y_width], &[rows, y_width]).unwrap();
    let x_view = x_buf.as_tensor_ref().narrow(1, x_col..x_col + d).unwrap();
    assert!(!x_view.is_dense());
    assert_eq!((x_view.shape(), x_view.row_stride()), (&[rows, d][..], x_width));
    let y_view = y_buf.as_tensor_mut().narrow(1, y_col..y_col + d).unwrap();
    decode_ops::rms_norm(&gpu, x_view, &wd, y_view, 1e-6).unwrap();
    let got = y_buf.to_host(&gpu).unwrap();
    for r in 0..rows {
        for c in 0..y_width {
            let v = got[r * y_width + c];
            if (y_col..y_col + d).contains(&c) {
                assert_eq!(v.to_bits(), want[r * d + c - y_col].to_bits(), "row {r} column {c}");
            } else {
                assert_eq!(v.to_bits(), POISON.to_bits(), "row {r} column {c} outside the view was written");
            }
        }
    }
}

/// The FP8 GEMM over an engine's own allocations: codes and scales borrowed from cudarc slices and through raw
/// pointers, the output written into rows of a pooled buffer.
#[test]
fn fp8_gemm_over_borrowed_memory_and_a_part_of_a_pool() {
    let Some(gpu) = test_gpu("fp8_gemm_over_borrowed_memory_and_a_part_of_a_pool") else { return };
    let (m, n, k) = (40usize, 256usize, 384usize);
    let x = DeviceTensor::from_host(&gpu, &random_bf16(m * k, 3, 2.0), &[m, k]).unwrap();
    let w = DeviceTensor::from_host(&gpu, &random_bf16(n * k, 4, 0.5), &[n, k]).unwrap();
    let (xq, xs) = quant::quantize_activations_new(&gpu, &x, ScaleFormat::F32).unwrap();
    let (wq, ws) = quant::quantize_weights_new(&gpu, &w, ScaleFormat::F32).unwrap();
    let opts = fp8_gemm::GemmOptions::default();
    let mut want = DeviceTensor::from_host(&gpu, &vec![POISON; m * n], &[m, n]).unwrap();
    fp8_gemm::fp8_gemm(&gpu, &xq, &xs, &wq, &ws, &mut want, &opts).unwrap();
    let want = want.to_host(&gpu).unwrap();

    // The engine's copies of the operands, in its own cudarc allocations: activations borrowed as cudarc slices,
    // weights through raw device pointers (as an engine on another allocator would pass them).
    let stream = gpu.stream();
    let a_codes = stream.clone_htod(&xq.to_host(&gpu).unwrap()).unwrap();
    let a_scales = stream.clone_htod(&xs.to_host(&gpu).unwrap()).unwrap();
    let b_codes = stream.clone_htod(&wq.to_host(&gpu).unwrap()).unwrap();
    let b_scales = stream.clone_htod(&ws.to_host(&gpu).unwrap()).unwrap();
    let mut pool = stream.clone_htod(&vec![POISON; 3 * m * n]).unwrap();
    let ordinal = gpu.info().ordinal;
    let a = TensorRef::from_cuda_slice(&a_codes, xq.shape(), None).unwrap();
    let sa = TensorRef::from_cuda_slice(&a_scales, xs.shape(), None).unwrap();
    // SAFETY: the slices are live, hold initialized values, and outlive the synchronized launch below.
    let b = unsafe { TensorRef::from_raw(address(&gpu, &b_codes), b_codes.len(), ordinal, &[n, k], None) }.unwrap();
    let sb =
        unsafe { TensorRef::from_raw(address(&gpu, &b_scales), b_scales.len(), ordinal, ws.shape(), None) }.unwrap();
    let out = TensorMut::from_cuda_slice(&mut pool, &[3, m, n], None).unwrap().narrow(0, 1..2).unwrap();
    let out = out.reshape(&[m, n]).unwrap();
    fp8_gemm::fp8_gemm(&gpu, a, sa, b, sb, out, &opts).unwrap();
    let got = stream.clone_dtoh(&pool).unwrap();
    for (i, v) in got.iter().enumerate() {
        let (part, at) = (i / (m * n), i % (m * n));
        let expected = if part == 1 { want[at] } else { POISON };
        assert_eq!(v.to_bits(), expected.to_bits(), "pool element {i} (part {part})");
    }
}

/// MLA decode over one layer's part of a cache pool `[layers, blocks, page, 576]`, with the other layer's pages
/// full of NaN: bitwise the result of the same cache as its own tensor.
#[test]
fn mla_decode_reads_one_layer_of_a_pooled_cache() {
    let Some(gpu) = test_gpu("mla_decode_reads_one_layer_of_a_pooled_cache") else { return };
    let (batch, heads, page, num_blocks, max_blocks) = (3usize, 16usize, 64usize, 6usize, 2usize);
    let width = 576;
    let seqlens = [70i32, 1, 128];
    let table: Vec<i32> = vec![4, 1, 0, -1, 5, 2];
    let cfg = MlaConfig { batch, s_q: 1, heads, page_size: page, softmax_scale: 0.07, causal: true };
    let q =
        DeviceTensor::from_host(&gpu, &random_bf16(batch * heads * width, 5, 1.0), &[batch, 1, heads, width]).unwrap();
    let layer = random_bf16(num_blocks * page * width, 6, 1.0);
    let cache = DeviceTensor::from_host(&gpu, &layer, &[num_blocks, page, width]).unwrap();
    let mut pool_host = vec![bf16::NAN; 2 * layer.len()];
    pool_host[layer.len()..].copy_from_slice(&layer);
    let pool = DeviceTensor::from_host(&gpu, &pool_host, &[2, num_blocks, page, width]).unwrap();
    let table_d = DeviceTensor::from_host(&gpu, &table, &[batch, max_blocks]).unwrap();
    let seqlens_d = DeviceTensor::from_host(&gpu, &seqlens, &[batch]).unwrap();
    let plan = MlaPlan::balanced(&gpu, &seqlens, page).unwrap();
    let opts = MlaOptions { block_table_host: Some(&table), ..Default::default() };
    let run = |cache: TensorRef<'_, bf16>| {
        let mut ws = MlaWorkspace::new(&gpu, &plan, &cfg).unwrap();
        let mut out =
            DeviceTensor::from_host(&gpu, &vec![POISON; batch * heads * 512], &[batch, 1, heads, 512]).unwrap();
        let mut lse = DeviceTensor::from_host(&gpu, &vec![f32::NAN; batch * heads], &[batch, heads, 1]).unwrap();
        mla::mla_decode(&gpu, &q, cache, &table_d, &seqlens_d, &plan, &cfg, &mut out, &mut lse, &mut ws, &opts)
            .unwrap();
        let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        (bits(out.to_host(&gpu).unwrap()), lse.to_host(&gpu).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    let own = run(cache.as_tensor_ref());
    let second_layer = pool.as_tensor_ref().narrow(0, 1..2).unwrap().reshape(&[num_blocks, page, width]).unwrap();
    assert_eq!(run(second_layer), own, "the pooled layer decodes differently");
    assert!(own.0.iter().all(|&b| b != POISON.to_bits()), "an output element was not written");
}

/// Bad views are refused before anything is enqueued: the output keeps its poison.
#[test]
fn strided_misplaced_and_foreign_views_are_refused_without_writing() {
    let Some(gpu) = test_gpu("strided_misplaced_and_foreign_views_are_refused_without_writing") else { return };
    let (rows, d) = (8usize, 128usize);
    let wide = DeviceTensor::from_host(&gpu, &random_bf16(rows * 2 * d, 7, 1.0), &[rows, 2 * d]).unwrap();
    let dense = DeviceTensor::from_host(&gpu, &random_bf16(rows * d, 8, 1.0), &[rows, d]).unwrap();
    let mut out = DeviceTensor::from_host(&gpu, &vec![POISON; rows * d], &[rows, d]).unwrap();
    let strided = wide.as_tensor_ref().narrow(1, 0..d).unwrap();
    // The element-wise add reads dense rows only.
    let e = decode_ops::add(&gpu, strided, &dense, &mut out).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "a", .. }), "{e}");
    // The quantizer too.
    let (mut q, mut s) = quant::quantize_activations_new(&gpu, &dense, ScaleFormat::F32).unwrap();
    let e = quant::quantize_activations(&gpu, strided, &mut q, &mut s, ScaleFormat::F32).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
    // Memory on another device.
    let mut slice = gpu.stream().clone_htod(&random_bf16(rows * d, 9, 1.0)).unwrap();
    let ptr = address(&gpu, &slice);
    let other = gpu.info().ordinal + 1;
    // SAFETY: never launched (refused for its ordinal).
    let foreign = unsafe { TensorRef::<bf16>::from_raw(ptr, rows * d, other, &[rows, d], None) }.unwrap();
    let e = decode_ops::add(&gpu, foreign, &dense, &mut out).unwrap_err();
    assert!(matches!(e, Error::DeviceMismatch { arg: "a", .. }), "{e}");
    // A part that does not start on a 16-byte boundary cannot be made.
    let e = TensorMut::from_cuda_slice(&mut slice, &[rows * d], None).unwrap().narrow(0, 3..11).unwrap_err();
    assert!(matches!(e, Error::Alignment { .. }), "{e}");
    // Nor a view longer than its memory.
    let e = TensorRef::from_cuda_slice(&slice, &[rows + 1, d], None).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    assert!(out.to_host(&gpu).unwrap().iter().all(|v| v.to_bits() == POISON.to_bits()), "a refused launch wrote");
}

/// The MoE layer over borrowed expert weights: layer 1 of an engine's two-layer expert pool (layer 0 holds other
/// weights), bitwise the result over the same weights as their own tensors.
#[test]
fn moe_forward_over_one_layer_of_a_pooled_expert_store() {
    use r1_kernels::moe::{self, ExpertWeightViews, ExpertWeights, Layout, MoeWorkspace, RouterConfig, Routing};
    use r1_kernels::E4M3;
    let Some(gpu) = test_gpu("moe_forward_over_one_layer_of_a_pooled_expert_store") else { return };
    let (e, h, i, t) = (8usize, 256usize, 128usize, 5usize);
    let cfg = RouterConfig { num_experts: e, top_k: 2, num_groups: 1, topk_groups: 1, ..RouterConfig::deepseek_v3() };
    let mut rng = SplitMix64::new(11);
    let mut codes = |n: usize| -> Vec<E4M3> { finite_e4m3_codes(&mut rng, n) };
    let layers: Vec<(Vec<E4M3>, Vec<E4M3>)> = (0..2).map(|_| (codes(e * 2 * i * h), codes(e * h * i))).collect();
    let s13: Vec<f32> = (0..2 * e * (2 * i / 128) * (h / 128)).map(|j| 0.001 + j as f32 * 1e-5).collect();
    let s2: Vec<f32> = (0..2 * e * (h / 128) * (i / 128)).map(|j| 0.002 + j as f32 * 1e-5).collect();
    let (n13, n2) = (s13.len() / 2, s2.len() / 2);
    let own = ExpertWeights {
        w13: DeviceTensor::from_host(&gpu, &layers[1].0, &[e, 2 * i, h]).unwrap(),
        w13_scales: DeviceTensor::from_host(&gpu, &s13[n13..], &[e, 2 * i / 128, h / 128]).unwrap(),
        w2: DeviceTensor::from_host(&gpu, &layers[1].1, &[e, h, i]).unwrap(),
        w2_scales: DeviceTensor::from_host(&gpu, &s2[n2..], &[e, h / 128, i / 128]).unwrap(),
    };
    let pool13: Vec<E4M3> = layers.iter().flat_map(|l| l.0.clone()).collect();
    let pool2: Vec<E4M3> = layers.iter().flat_map(|l| l.1.clone()).collect();
    let pools = (
        DeviceTensor::from_host(&gpu, &pool13, &[2, e, 2 * i, h]).unwrap(),
        DeviceTensor::from_host(&gpu, &s13, &[2, e, 2 * i / 128, h / 128]).unwrap(),
        DeviceTensor::from_host(&gpu, &pool2, &[2, e, h, i]).unwrap(),
        DeviceTensor::from_host(&gpu, &s2, &[2, e, h / 128, i / 128]).unwrap(),
    );
    fn layer1<T: r1_kernels::cudarc::driver::DeviceRepr>(p: &DeviceTensor<T>) -> TensorRef<'_, T> {
        let shape = p.shape()[1..].to_vec();
        p.as_tensor_ref().narrow(0, 1..2).unwrap().reshape(&shape).unwrap()
    }
    let pooled = ExpertWeightViews {
        w13: layer1(&pools.0),
        w13_scales: layer1(&pools.1),
        w2: layer1(&pools.2),
        w2_scales: layer1(&pools.3),
    };
    let x = DeviceTensor::from_host(&gpu, &random_bf16(t * h, 12, 1.0), &[t, h]).unwrap();
    let logits: Vec<f32> = (0..t * e).map(|j| ((j * 7919) % 13) as f32 * 0.3 - 1.5).collect();
    let logits = DeviceTensor::from_host(&gpu, &logits, &[t, e]).unwrap();
    let run = |experts: ExpertWeightViews<'_>| {
        let mut ws = MoeWorkspace::new(&gpu, &cfg, t, h, i, None, Layout::Contiguous { block_m: 64 }).unwrap();
        let mut out = DeviceTensor::from_host(&gpu, &vec![POISON; t * h], &[t, h]).unwrap();
        let routing = Routing::logits(&logits, r1_kernels::no_tensor());
        moe::moe_forward(&gpu, &cfg, experts, None::<ExpertWeightViews>, &x, routing, &mut ws, &mut out).unwrap();
        out.to_host(&gpu).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let want = run((&own).into());
    assert!(want.iter().all(|&b| b != POISON.to_bits()), "an output element was not written");
    assert_eq!(run(pooled), want, "the pooled experts give another result");
    // Views of the wrong layer's weights are a different layer: the comparison can fail.
    let layer0 = ExpertWeightViews {
        w13: pools.0.as_tensor_ref().narrow(0, 0..1).unwrap().reshape(&[e, 2 * i, h]).unwrap(),
        ..pooled
    };
    assert_ne!(run(layer0), want);
}
