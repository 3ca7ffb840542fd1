//! FP8 quantization: GPU kernels vs the CPU reference (bitwise), plus host-side validation.

use r1_kernels::device::test_gpu;
use r1_kernels::quant::{activation_scale_shape, quantize_activations, quantize_weights, weight_scale_shape};
use r1_kernels::reference::quant::{
    quantize_per_block_with, quantize_per_token_group_with, scales_to_mn_major, ScaleFormat,
};
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor, Error, Gpu, E4M3};

mod common;
use common::expect_launched;

fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = SplitMix64::new(seed);
    // Mix magnitudes across groups so scales differ, with a few exact zeros and large outliers.
    (0..n)
        .map(|i| {
            let magnitude = 10f32.powi((i / 97 % 7) as i32 - 3);
            let v = (rng.next_f32() - 0.5) * 2.0 * magnitude;
            bf16::from_f32(if i % 1013 == 0 {
                0.0
            } else if i % 4099 == 0 {
                v * 1e4
            } else {
                v
            })
        })
        .collect()
}

#[test]
fn gpu_entry_points_never_panic_without_a_gpu() {
    // On a machine without a driver this must be an error, not a panic; with one it must succeed.
    match Gpu::new(0) {
        Ok(gpu) => assert!(gpu.info().sm_count > 0),
        Err(e) => assert!(matches!(e, Error::NoCudaDriver | Error::Cuda { .. }), "{e}"),
    }
    let none = Gpu::new(usize::MAX);
    assert!(matches!(none, Err(Error::NoCudaDriver | Error::NoSuchDevice { ordinal: usize::MAX, .. })), "{none:?}");
}

#[test]
fn gpu_tensors_of_another_device_are_refused() {
    let name = "gpu_tensors_of_another_device_are_refused";
    let Some(gpu0) = test_gpu(name) else { return };
    let gpu1 = match Gpu::new(1) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("SKIPPED {name}: needs a second device ({e})");
            return;
        }
    };
    let x = DeviceTensor::from_host(&gpu1, &random_bf16(2 * 256, 5), &[2, 256]).unwrap();
    let mut q = DeviceTensor::<E4M3>::zeros(&gpu0, &[2, 256]).unwrap();
    let mut s = DeviceTensor::<f32>::zeros(&gpu0, &activation_scale_shape(2, 256)).unwrap();
    let r = quantize_activations(&gpu0, &x, &mut q, &mut s, ScaleFormat::F32);
    assert_eq!(r, Err(Error::DeviceMismatch { arg: "x", expected: 0, got: 1 }));
    // The same tensors on their own device are fine.
    let mut q1 = DeviceTensor::<E4M3>::zeros(&gpu1, &[2, 256]).unwrap();
    let mut s1 = DeviceTensor::<f32>::zeros(&gpu1, &activation_scale_shape(2, 256)).unwrap();
    quantize_activations(&gpu1, &x, &mut q1, &mut s1, ScaleFormat::F32).unwrap();
    let r = quantize_activations(&gpu1, &x, &mut q, &mut s1, ScaleFormat::F32);
    assert_eq!(r, Err(Error::DeviceMismatch { arg: "q", expected: 1, got: 0 }));
    // A stream of device 1 cannot share device 0's kernels.
    let r = gpu0.on_stream(gpu1.stream().clone());
    assert!(matches!(r, Err(Error::DeviceMismatch { arg: "stream", expected: 0, got: 1 })), "{r:?}");
}

/// Quantizes `x` on `gpu` and checks codes and scales bitwise against the CPU reference.
fn quantize_and_check(gpu: &Gpu, what: &str, m: usize, k: usize, seed: u64) {
    let x = random_bf16(m * k, seed);
    let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let (q_ref, s_ref) = quantize_per_token_group_with(&x32, m, k, 128, ScaleFormat::F32).unwrap();
    let s_ref = scales_to_mn_major(&s_ref, m, k.div_ceil(128)).unwrap();
    let xd = DeviceTensor::from_host(gpu, &x, &[m, k]).unwrap();
    let mut q = DeviceTensor::from_host(gpu, &vec![E4M3(0xff); m * k], &[m, k]).unwrap();
    let shape = activation_scale_shape(m, k);
    let mut s = DeviceTensor::from_host(gpu, &vec![f32::NAN; shape[0] * shape[1]], &shape).unwrap();
    quantize_activations(gpu, &xd, &mut q, &mut s, ScaleFormat::F32).unwrap();
    assert_eq!(q.to_host(gpu).unwrap(), q_ref, "{what}: codes");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&s.to_host(gpu).unwrap()), bits(&s_ref), "{what}: scales");
}

/// The entry points for engines that own their streams and memory: a second stream sharing the kernel cache, a raw
/// `CUstream` borrowed from another library, a caller-owned allocation wrapped without a copy, and every module
/// loaded up front so that a captured graph loads nothing.
#[test]
fn gpu_engine_streams_buffers_and_preload() {
    use r1_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(gpu) = test_gpu("gpu_engine_streams_buffers_and_preload") else { return };
    quantize_and_check(&gpu, "own stream", 3, 256, 1);

    let second = gpu.on_stream(gpu.context().new_stream().unwrap()).unwrap();
    assert!(second.shares_kernels_with(&gpu));
    quantize_and_check(&second, "second stream, shared kernels", 5, 384, 2);

    let owned = gpu.context().new_stream().unwrap();
    // SAFETY: `owned` is a live stream of device 0's primary context and outlives `borrowed`.
    let borrowed = unsafe { Gpu::from_raw_stream(0, owned.cu_stream()) }.unwrap();
    assert!(!borrowed.shares_kernels_with(&gpu));
    quantize_and_check(&borrowed, "borrowed raw stream", 4, 128, 3);
    drop(borrowed);
    owned.synchronize().unwrap();

    // A caller-owned allocation (longer than needed) as the output, without a copy; too short is an error.
    let (m, k) = (2, 256);
    let x = DeviceTensor::from_host(&gpu, &random_bf16(m * k, 4), &[m, k]).unwrap();
    let raw_q = gpu.stream().alloc_zeros::<E4M3>(m * k + 64).unwrap();
    let mut q = DeviceTensor::from_cuda_slice(raw_q, &[m, k]).unwrap();
    let mut s = DeviceTensor::<f32>::zeros(&gpu, &activation_scale_shape(m, k)).unwrap();
    quantize_activations(&gpu, &x, &mut q, &mut s, ScaleFormat::F32).unwrap();
    let codes = q.to_host(&gpu).unwrap();
    let back = q.into_cuda_slice();
    assert_eq!(back.len(), m * k + 64);
    assert_eq!(gpu.stream().clone_dtoh(&back.slice(0..m * k)).unwrap(), codes);
    let short = gpu.stream().alloc_zeros::<E4M3>(m * k - 1).unwrap();
    assert!(matches!(DeviceTensor::from_cuda_slice(short, &[m, k]), Err(Error::Shape { arg: "data", .. })));

    // Preloaded, a step can be captured and replayed: the graph's result equals the eager one.
    let fresh = Gpu::new(0).unwrap();
    assert!(fresh.preload().unwrap() > 0, "no module loaded");
    let mut q = DeviceTensor::from_host(&fresh, &vec![E4M3(0); m * k], &[m, k]).unwrap();
    let mut s = DeviceTensor::<f32>::zeros(&fresh, &activation_scale_shape(m, k)).unwrap();
    let x = DeviceTensor::from_host(&fresh, &random_bf16(m * k, 5), &[m, k]).unwrap();
    fresh.synchronize().unwrap();
    // SAFETY: every buffer is used on this one stream only.
    unsafe { fresh.context().disable_event_tracking() };
    fresh.stream().begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = quantize_activations(&fresh, &x, &mut q, &mut s, ScaleFormat::F32);
    let graph = fresh.stream().end_capture(CUgraphInstantiate_flags(0)).unwrap();
    unsafe { fresh.context().enable_event_tracking() };
    captured.unwrap();
    graph.expect("a captured graph").launch().unwrap();
    let (gq, gs) = (q.to_host(&fresh).unwrap(), s.to_host(&fresh).unwrap());
    quantize_activations(&fresh, &x, &mut q, &mut s, ScaleFormat::F32).unwrap();
    assert_eq!(gq, q.to_host(&fresh).unwrap(), "replayed codes equal eager");
    assert_eq!(gs, s.to_host(&fresh).unwrap(), "replayed scales equal eager");
}

#[test]
fn activation_quant_matches_reference_bitwise() {
    let Some(gpu) = test_gpu("activation_quant_matches_reference_bitwise") else { return };
    let shapes = [(1, 128), (7, 7168), (129, 1536), (64, 300), (3, 12), (5, 135), (1000, 512), (4, 128 * 3 + 8)];
    for (case, &(m, k)) in shapes.iter().enumerate() {
        for format in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let mut x = random_bf16(m * k, case as u64);
            if case == 1 {
                // An all-zero group (the amax floor) and a group with a huge value next to tiny ones.
                x[128..256].fill(bf16::ZERO);
                x[7168 + 5] = bf16::from_f32(3.0e38);
                x[2 * 7168 + 300] = bf16::from_f32(-1.0e-30);
            }
            let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let (q_ref, s_ref) = quantize_per_token_group_with(&x32, m, k, 128, format).unwrap();
            let s_ref = scales_to_mn_major(&s_ref, m, k.div_ceil(128)).unwrap();

            let xd = DeviceTensor::from_host(&gpu, &x, &[m, k]).unwrap();
            let mut q = DeviceTensor::from_host(&gpu, &vec![E4M3(0xff); m * k], &[m, k]).unwrap();
            let shape = activation_scale_shape(m, k);
            let mut s = DeviceTensor::from_host(&gpu, &vec![f32::NAN; shape[0] * shape[1]], &shape).unwrap();
            expect_launched(&gpu, &["act_quant_group128"], || quantize_activations(&gpu, &xd, &mut q, &mut s, format))
                .unwrap();
            let (q_gpu, s_gpu) = (q.to_host(&gpu).unwrap(), s.to_host(&gpu).unwrap());
            assert_eq!(q_gpu, q_ref, "codes differ for m={m} k={k} {format:?}");
            let s_bits: Vec<u32> = s_gpu.iter().map(|v| v.to_bits()).collect();
            let r_bits: Vec<u32> = s_ref.iter().map(|v| v.to_bits()).collect();
            assert_eq!(s_bits, r_bits, "scales differ for m={m} k={k} {format:?}");

            // Determinism: a second launch gives the same bits.
            quantize_activations(&gpu, &xd, &mut q, &mut s, format).unwrap();
            assert_eq!(q.to_host(&gpu).unwrap(), q_gpu);
        }
    }
}

#[test]
fn weight_quant_matches_reference_bitwise() {
    let Some(gpu) = test_gpu("weight_quant_matches_reference_bitwise") else { return };
    for (case, &(n, k)) in [(128, 128), (256, 7168), (300, 260), (7, 12), (2112, 7168), (129, 135)].iter().enumerate() {
        for format in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let w = random_bf16(n * k, 100 + case as u64);
            let w32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let (q_ref, s_ref) = quantize_per_block_with(&w32, n, k, 128, format).unwrap();
            let wd = DeviceTensor::from_host(&gpu, &w, &[n, k]).unwrap();
            let mut q = DeviceTensor::from_host(&gpu, &vec![E4M3(0xff); n * k], &[n, k]).unwrap();
            let shape = weight_scale_shape(n, k);
            let mut s = DeviceTensor::from_host(&gpu, &vec![f32::NAN; shape[0] * shape[1]], &shape).unwrap();
            expect_launched(&gpu, &["weight_quant_block128"], || quantize_weights(&gpu, &wd, &mut q, &mut s, format))
                .unwrap();
            assert_eq!(q.to_host(&gpu).unwrap(), q_ref, "codes differ for n={n} k={k}");
            let s_gpu: Vec<u32> = s.to_host(&gpu).unwrap().iter().map(|v| v.to_bits()).collect();
            let s_ref: Vec<u32> = s_ref.iter().map(|v| v.to_bits()).collect();
            assert_eq!(s_gpu, s_ref, "scales differ for n={n} k={k}");
        }
    }
}

#[test]
fn quant_rejects_bad_shapes_and_handles_empty() {
    let Some(gpu) = test_gpu("quant_rejects_bad_shapes_and_handles_empty") else { return };
    let x = DeviceTensor::from_host(&gpu, &random_bf16(4 * 256, 9), &[4, 256]).unwrap();
    let mut q = DeviceTensor::<E4M3>::zeros(&gpu, &[4, 256]).unwrap();
    let mut bad_q = DeviceTensor::<E4M3>::zeros(&gpu, &[4, 255]).unwrap();
    let mut s = DeviceTensor::<f32>::zeros(&gpu, &activation_scale_shape(4, 256)).unwrap();
    let mut bad_s = DeviceTensor::<f32>::zeros(&gpu, &[4, 2]).unwrap(); // row-major, not MN-major
    assert!(matches!(quantize_activations(&gpu, &x, &mut bad_q, &mut s, ScaleFormat::F32), Err(Error::Shape { .. })));
    assert!(matches!(quantize_activations(&gpu, &x, &mut q, &mut bad_s, ScaleFormat::F32), Err(Error::Shape { .. })));
    let x3 = DeviceTensor::from_host(&gpu, &random_bf16(256, 9), &[1, 1, 256]).unwrap();
    assert!(quantize_activations(&gpu, &x3, &mut q, &mut s, ScaleFormat::F32).is_err());
    // Nothing was written by the failed calls.
    assert!(q.to_host(&gpu).unwrap().iter().all(|c| c.0 == 0));

    let empty = DeviceTensor::<bf16>::zeros(&gpu, &[0, 256]).unwrap();
    let mut eq = DeviceTensor::<E4M3>::zeros(&gpu, &[0, 256]).unwrap();
    let mut es = DeviceTensor::<f32>::zeros(&gpu, &activation_scale_shape(0, 256)).unwrap();
    quantize_activations(&gpu, &empty, &mut eq, &mut es, ScaleFormat::F32).unwrap();
    let mut wq = DeviceTensor::<E4M3>::zeros(&gpu, &[0, 256]).unwrap();
    let mut ws = DeviceTensor::<f32>::zeros(&gpu, &weight_scale_shape(0, 256)).unwrap();
    quantize_weights(&gpu, &empty, &mut wq, &mut ws, ScaleFormat::F32).unwrap();
    gpu.synchronize().unwrap();
}
