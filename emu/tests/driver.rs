//! The emulated driver through its exported entry points, called directly as Rust functions.
//!
//! Tests that load the crate's kernels read the cubins `cargo build --release` leaves in
//! target/release/build/r1-kernels-*/out/ and are skipped (with the reason printed) when there are none; tests
//! that launch a kernel are skipped when the engine does not have it.

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use cuda::types::*;
use cuda::*;

/// cuInit, and device 0's primary context current on this thread (each test runs on its own thread).
fn setup() -> CUcontext {
    unsafe {
        assert_eq!(cuInit(0), CUDA_SUCCESS);
        let mut ctx = null_mut();
        assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, 0), CUDA_SUCCESS);
        assert_eq!(cuCtxSetCurrent(ctx), CUDA_SUCCESS);
        ctx
    }
}

fn alloc(bytes: usize) -> CUdeviceptr {
    let mut ptr = 0;
    assert_eq!(unsafe { cuMemAlloc_v2(&mut ptr, bytes) }, CUDA_SUCCESS);
    ptr
}

fn free(ptr: CUdeviceptr) {
    assert_eq!(unsafe { cuMemFree_v2(ptr) }, CUDA_SUCCESS);
}

fn upload<T: Copy>(data: &[T]) -> CUdeviceptr {
    let bytes = std::mem::size_of_val(data);
    let ptr = alloc(bytes);
    assert_eq!(unsafe { cuMemcpyHtoD_v2(ptr, data.as_ptr().cast(), bytes) }, CUDA_SUCCESS);
    ptr
}

fn download<T: Copy + Default>(ptr: CUdeviceptr, len: usize) -> Vec<T> {
    let mut out = vec![T::default(); len];
    let bytes = std::mem::size_of_val(out.as_slice());
    assert_eq!(unsafe { cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), ptr, bytes) }, CUDA_SUCCESS);
    out
}

fn new_stream() -> CUstream {
    let mut s = null_mut();
    assert_eq!(unsafe { cuStreamCreate(&mut s, CU_STREAM_NON_BLOCKING) }, CUDA_SUCCESS);
    s
}

fn new_event(flags: u32) -> CUevent {
    let mut e = null_mut();
    assert_eq!(unsafe { cuEventCreate(&mut e, flags) }, CUDA_SUCCESS);
    e
}

fn attribute(attr: u32) -> i32 {
    let mut v = 0;
    assert_eq!(unsafe { cuDeviceGetAttribute(&mut v, attr, 0) }, CUDA_SUCCESS, "attribute {attr}");
    v
}

#[test]
fn device_is_an_emulated_hopper() {
    setup();
    unsafe {
        let mut count = 0;
        assert_eq!(cuDeviceGetCount(&mut count), CUDA_SUCCESS);
        assert!(count >= 1);
        let mut name = [0i8; 128];
        assert_eq!(cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, 0), CUDA_SUCCESS);
        let name = CStr::from_ptr(name.as_ptr()).to_str().unwrap();
        assert!(name.contains("r1k-emu"), "{name}");
        let mut short = [0x55i8; 8];
        assert_eq!(cuDeviceGetName(short.as_mut_ptr(), short.len() as i32, 0), CUDA_SUCCESS);
        assert_eq!(short[7], 0, "a short buffer gets a truncated, terminated name");
        let mut dev = -1;
        assert_eq!(cuDeviceGet(&mut dev, 0), CUDA_SUCCESS);
        assert_eq!(dev, 0);
        assert_eq!(cuDeviceGet(&mut dev, count), CUDA_ERROR_INVALID_DEVICE);
        let mut version = 0;
        assert_eq!(cuDriverGetVersion(&mut version), CUDA_SUCCESS);
        assert!(version >= 12080);
        let mut total = 0usize;
        assert_eq!(cuDeviceTotalMem_v2(&mut total, 0), CUDA_SUCCESS);
        assert!(total > 0);
    }
    assert_eq!((attribute(75), attribute(76)), (9, 0), "compute capability 9.0");
    let expected_sms = std::env::var("R1K_EMU_SMS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    assert_eq!(attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT), expected_sms);
    assert_eq!(attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), 232_448);
    assert_eq!(attribute(8), 49_152, "MAX_SHARED_MEMORY_PER_BLOCK");
    assert_eq!(attribute(81), 233_472, "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR");
    assert_eq!(attribute(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK), 1024);
    assert_eq!(attribute(10), 32, "WARP_SIZE");
    assert_eq!(attribute(38), 50 << 20, "L2_CACHE_SIZE");
    assert_eq!(attribute(CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH), 1);
    assert_eq!(attribute(CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED), 1);
    let mut v = 0;
    assert_eq!(unsafe { cuDeviceGetAttribute(&mut v, 22, 0) }, CUDA_ERROR_INVALID_VALUE, "texture limits");
    assert_eq!(unsafe { cuDeviceGetAttribute(&mut v, 75, 99) }, CUDA_ERROR_INVALID_DEVICE);
}

#[test]
fn contexts_are_per_thread_and_primary_handles_are_stable() {
    let ctx = setup();
    unsafe {
        let mut again = null_mut();
        assert_eq!(cuDevicePrimaryCtxRetain(&mut again, 0), CUDA_SUCCESS);
        assert_eq!(again, ctx);
        assert_eq!(cuDevicePrimaryCtxRelease_v2(0), CUDA_SUCCESS);
        let mut current = null_mut();
        assert_eq!(cuCtxGetCurrent(&mut current), CUDA_SUCCESS);
        assert_eq!(current, ctx);
        let other_thread = std::thread::spawn(|| {
            let mut current = 1 as CUcontext;
            assert_eq!(cuCtxGetCurrent(&mut current), CUDA_SUCCESS);
            let mut ptr = 0;
            (current as usize, cuMemAlloc_v2(&mut ptr, 16))
        })
        .join()
        .unwrap();
        assert_eq!(other_thread, (0, CUDA_ERROR_INVALID_CONTEXT), "a new thread has no current context");
        let mut dev = -1;
        assert_eq!(cuCtxGetDevice(&mut dev), CUDA_SUCCESS);
        assert_eq!(dev, 0);
        assert_eq!(cuCtxSynchronize(), CUDA_SUCCESS);
        assert_eq!(cuCtxSetCurrent(0xdead0 as CUcontext), CUDA_ERROR_INVALID_CONTEXT);
    }
}

#[test]
fn memory_round_trip() {
    setup();
    let data: Vec<u32> = (0..1000).collect();
    let a = upload(&data);
    assert_eq!(a % 256, 0, "allocations are 256-byte aligned");
    assert_eq!(download::<u32>(a, 1000), data);
    let b = alloc(4000);
    unsafe {
        assert_eq!(cuMemcpyDtoD_v2(b, a + 400, 3600), CUDA_SUCCESS);
        assert_eq!(cuMemsetD32_v2(b + 3600, 7, 100), CUDA_SUCCESS);
    }
    let got = download::<u32>(b, 1000);
    assert_eq!(&got[..900], &data[100..]);
    assert!(got[900..].iter().all(|&v| v == 7));
    unsafe {
        assert_eq!(cuMemsetD8_v2(b, 0xAB, 3), CUDA_SUCCESS);
        assert_eq!(cuMemsetD16_v2(b + 4, 0x1234, 2), CUDA_SUCCESS);
        let mut base = 0;
        let mut size = 0usize;
        assert_eq!(cuMemGetAddressRange_v2(&mut base, &mut size, b + 17), CUDA_SUCCESS);
        assert_eq!((base, size), (b, 4000));
        let mut kind = 0u32;
        assert_eq!(
            cuPointerGetAttribute((&mut kind as *mut u32).cast(), CU_POINTER_ATTRIBUTE_MEMORY_TYPE, b),
            CUDA_SUCCESS
        );
        assert_eq!(kind, CU_MEMORYTYPE_DEVICE);
        let (mut free_bytes, mut total) = (0usize, 0usize);
        assert_eq!(cuMemGetInfo_v2(&mut free_bytes, &mut total), CUDA_SUCCESS);
        assert!(free_bytes <= total);
    }
    let bytes = download::<u8>(b, 8);
    assert_eq!(&bytes[..3], &[0xAB; 3]);
    assert_eq!(&bytes[4..8], &[0x34, 0x12, 0x34, 0x12]);
    free(a);
    free(b);
}

#[test]
fn new_allocations_read_as_nan_unless_poisoning_is_off() {
    setup();
    let p = alloc(64);
    let poisoned = std::env::var("R1K_EMU_POISON").map(|v| v != "0").unwrap_or(true);
    if poisoned {
        assert!(download::<f32>(p, 16).iter().all(|v| v.is_nan()));
    }
    free(p);
}

#[test]
fn memory_misuse_is_refused() {
    setup();
    let p = alloc(100);
    let mut host = [0u8; 101];
    unsafe {
        let mut out = 0;
        assert_eq!(cuMemAlloc_v2(&mut out, 0), CUDA_ERROR_INVALID_VALUE, "zero-byte allocation");
        assert_eq!(cuMemAlloc_v2(null_mut(), 16), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), p, 101), CUDA_ERROR_INVALID_VALUE, "one byte past");
        assert_eq!(cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), p + 1, 100), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(cuMemcpyHtoD_v2(p + 100, host.as_ptr().cast(), 1), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(cuMemcpyHtoD_v2(p, host.as_ptr().cast(), 0), CUDA_SUCCESS, "empty copies are fine");
        assert_eq!(cuMemsetD32_v2(p + 2, 0, 1), CUDA_ERROR_INVALID_VALUE, "misaligned 32-bit fill");
        assert_eq!(cuMemsetD32_v2(p, 0, 26), CUDA_ERROR_INVALID_VALUE, "104 bytes into 100");
        assert_eq!(cuMemcpyDtoD_v2(p, 0x10, 4), CUDA_ERROR_INVALID_VALUE, "not device memory");
        assert_eq!(cuMemFree_v2(p + 8), CUDA_ERROR_INVALID_VALUE, "interior pointer");
    }
    free(p);
    assert_eq!(unsafe { cuMemFree_v2(p) }, CUDA_ERROR_INVALID_VALUE, "double free");
    assert_eq!(unsafe { cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), p, 1) }, CUDA_ERROR_INVALID_VALUE, "after free");
}

#[test]
fn stream_ordered_allocation_and_async_copies() {
    setup();
    let s = new_stream();
    unsafe {
        let mut p = 0;
        assert_eq!(cuMemAllocAsync(&mut p, 256, s), CUDA_SUCCESS);
        let src = [3u16; 128];
        assert_eq!(cuMemcpyHtoDAsync_v2(p, src.as_ptr().cast(), 256, s), CUDA_SUCCESS);
        assert_eq!(cuMemsetD16Async(p, 9, 64, s), CUDA_SUCCESS);
        let mut dst = [0u16; 128];
        assert_eq!(cuMemcpyDtoHAsync_v2(dst.as_mut_ptr().cast(), p, 256, s), CUDA_SUCCESS);
        assert_eq!(cuStreamSynchronize(s), CUDA_SUCCESS);
        assert!(dst[..64].iter().all(|&v| v == 9) && dst[64..].iter().all(|&v| v == 3));
        assert_eq!(cuMemFreeAsync(p, s), CUDA_SUCCESS);
        assert_eq!(cuMemFreeAsync(p, s), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(cuStreamDestroy_v2(s), CUDA_SUCCESS);
        assert_eq!(cuStreamSynchronize(s), CUDA_ERROR_INVALID_HANDLE);
    }
}

#[test]
fn events_report_virtual_time() {
    setup();
    let s = new_stream();
    let (start, end, untimed) = (new_event(0), new_event(0), new_event(CU_EVENT_DISABLE_TIMING));
    unsafe {
        let mut ms = -1.0f32;
        assert_eq!(cuEventElapsedTime(&mut ms, start, end), CUDA_ERROR_INVALID_HANDLE, "never recorded");
        assert_eq!(cuEventRecord(start, s), CUDA_SUCCESS);
        let p = alloc(64);
        assert_eq!(cuMemsetD8Async(p, 0, 64, s), CUDA_SUCCESS);
        assert_eq!(cuEventRecord(end, s), CUDA_SUCCESS);
        assert_eq!(cuEventRecord(untimed, s), CUDA_SUCCESS);
        assert_eq!(cuEventSynchronize(end), CUDA_SUCCESS);
        assert_eq!(cuEventQuery(end), CUDA_SUCCESS, "an emulated stream is idle after every call");
        assert_eq!(cuEventElapsedTime(&mut ms, start, end), CUDA_SUCCESS);
        assert!(ms > 0.0 && ms < 1.0, "{ms}");
        assert_eq!(cuEventElapsedTime(&mut ms, start, untimed), CUDA_ERROR_INVALID_HANDLE);
        assert_eq!(cuStreamWaitEvent(s, end, 0), CUDA_SUCCESS);
        for e in [start, end, untimed] {
            assert_eq!(cuEventDestroy_v2(e), CUDA_SUCCESS);
        }
        assert_eq!(cuEventQuery(start), CUDA_ERROR_INVALID_HANDLE);
        free(p);
        assert_eq!(cuStreamDestroy_v2(s), CUDA_SUCCESS);
    }
}

fn instantiate(graph: CUgraph) -> CUgraphExec {
    let mut exec = null_mut();
    assert_eq!(unsafe { cuGraphInstantiateWithFlags(&mut exec, graph, 0) }, CUDA_SUCCESS);
    exec
}

#[test]
fn captured_work_runs_only_when_the_graph_is_launched() {
    setup();
    let s = new_stream();
    let a = upload(&[1u32; 64]);
    let b = upload(&[2u32; 64]);
    unsafe {
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
        let mut status = 9u32;
        assert_eq!(cuStreamIsCapturing(s, &mut status), CUDA_SUCCESS);
        assert_eq!(status, CU_STREAM_CAPTURE_STATUS_ACTIVE);
        assert_eq!(cuMemsetD32Async(a, 5, 32, s), CUDA_SUCCESS);
        assert_eq!(cuMemcpyDtoDAsync_v2(b, a, 256, s), CUDA_SUCCESS);
        let mut graph = null_mut();
        assert_eq!(cuStreamEndCapture(s, &mut graph), CUDA_SUCCESS);
        assert!(!graph.is_null());
        // (Checked after the capture: a synchronous copy is one of the calls capture forbids on this thread.)
        assert_eq!(download::<u32>(b, 64), vec![2; 64], "nothing ran during capture");
        assert_eq!(cuStreamIsCapturing(s, &mut status), CUDA_SUCCESS);
        assert_eq!(status, CU_STREAM_CAPTURE_STATUS_NONE);
        let exec = instantiate(graph);
        assert_eq!(cuGraphLaunch(exec, s), CUDA_SUCCESS);
        assert_eq!(cuStreamSynchronize(s), CUDA_SUCCESS);
        let expected: Vec<u32> = [5; 32].into_iter().chain([1; 32]).collect();
        assert_eq!(download::<u32>(b, 64), expected);
        // A replay redoes the same work on the current contents.
        assert_eq!(cuMemcpyHtoD_v2(a, [8u32; 64].as_ptr().cast(), 256), CUDA_SUCCESS);
        assert_eq!(cuGraphLaunch(exec, s), CUDA_SUCCESS);
        let expected: Vec<u32> = [5; 32].into_iter().chain([8; 32]).collect();
        assert_eq!(download::<u32>(b, 64), expected);
        assert_eq!(cuGraphExecDestroy(exec), CUDA_SUCCESS);
        assert_eq!(cuGraphDestroy(graph), CUDA_SUCCESS);
        assert_eq!(cuGraphLaunch(exec, s), CUDA_ERROR_INVALID_VALUE, "destroyed");
        assert_eq!(cuStreamDestroy_v2(s), CUDA_SUCCESS);
    }
    free(a);
    free(b);
}

fn end_capture(s: CUstream) -> (CUresult, CUgraph) {
    let mut graph = 1 as CUgraph;
    let r = unsafe { cuStreamEndCapture(s, &mut graph) };
    (r, graph)
}

#[test]
fn capture_rules_match_the_driver() {
    setup();
    let s = new_stream();
    let p = alloc(64);
    unsafe {
        // Synchronizing a capturing stream invalidates the capture.
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_ERROR_ILLEGAL_STATE);
        assert_eq!(cuStreamSynchronize(s), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        let mut status = 0u32;
        assert_eq!(cuStreamIsCapturing(s, &mut status), CUDA_SUCCESS);
        assert_eq!(status, CU_STREAM_CAPTURE_STATUS_INVALIDATED);
        assert_eq!(cuMemsetD8Async(p, 0, 1, s), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
        assert_eq!(end_capture(s), (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, null_mut()));

        // Waiting on an event recorded outside the capture.
        let outside = new_event(0);
        assert_eq!(cuEventRecord(outside, s), CUDA_SUCCESS);
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
        assert_eq!(cuStreamWaitEvent(s, outside, 0), CUDA_ERROR_STREAM_CAPTURE_ISOLATION);
        assert_eq!(end_capture(s).0, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);

        // Synchronous allocation under a thread-local capture on this thread.
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
        let mut q = 0;
        assert_eq!(cuMemAlloc_v2(&mut q, 16), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        assert_eq!(end_capture(s).0, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);

        // Querying an event recorded into the capture.
        let inside = new_event(0);
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_RELAXED), CUDA_SUCCESS);
        assert_eq!(cuEventRecord(inside, s), CUDA_SUCCESS);
        assert_eq!(cuEventQuery(inside), CUDA_ERROR_CAPTURED_EVENT);
        assert_eq!(end_capture(s).0, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);

        // Relaxed mode permits synchronous allocation; an empty capture makes an empty graph.
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_RELAXED), CUDA_SUCCESS);
        assert_eq!(cuMemAlloc_v2(&mut q, 16), CUDA_SUCCESS);
        let (r, graph) = end_capture(s);
        assert_eq!(r, CUDA_SUCCESS);
        let mut exec = null_mut();
        let device_launch = CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH | CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        assert_eq!(cuGraphInstantiateWithFlags(&mut exec, graph, device_launch), CUDA_ERROR_INVALID_VALUE);
        let exec = instantiate(graph);
        assert_eq!(cuGraphLaunch(exec, s), CUDA_SUCCESS);
        assert_eq!(cuGraphExecDestroy(exec), CUDA_SUCCESS);
        assert_eq!(cuGraphDestroy(graph), CUDA_SUCCESS);
        free(q);

        assert_eq!(end_capture(s).0, CUDA_ERROR_ILLEGAL_STATE, "not capturing");
        assert_eq!(cuStreamBeginCapture_v2(null_mut(), 1), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "NULL stream");
        for e in [outside, inside] {
            assert_eq!(cuEventDestroy_v2(e), CUDA_SUCCESS);
        }
        assert_eq!(cuStreamDestroy_v2(s), CUDA_SUCCESS);
    }
    free(p);
}

#[test]
fn forked_streams_must_join_before_the_capture_ends() {
    setup();
    let (origin, side) = (new_stream(), new_stream());
    let (fork, join) = (new_event(CU_EVENT_DISABLE_TIMING), new_event(CU_EVENT_DISABLE_TIMING));
    let p = upload(&[0u32; 2]);
    // Thread-local mode: a global-mode capture would refuse other tests' synchronous calls meanwhile.
    let mode = CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    let mut status = 0u32;
    unsafe {
        // Fork and join: both streams' work lands in the graph.
        assert_eq!(cuStreamBeginCapture_v2(origin, mode), CUDA_SUCCESS);
        assert_eq!(cuMemsetD32Async(p, 1, 1, origin), CUDA_SUCCESS);
        assert_eq!(cuEventRecord(fork, origin), CUDA_SUCCESS);
        assert_eq!(cuStreamWaitEvent(side, fork, 0), CUDA_SUCCESS, "side joins the capture");
        assert_eq!(cuStreamIsCapturing(side, &mut status), CUDA_SUCCESS);
        assert_eq!(status, CU_STREAM_CAPTURE_STATUS_ACTIVE);
        assert_eq!(cuMemsetD32Async(p + 4, 2, 1, side), CUDA_SUCCESS);
        assert_eq!(cuEventRecord(join, side), CUDA_SUCCESS);
        assert_eq!(cuStreamWaitEvent(origin, join, 0), CUDA_SUCCESS);
        let (r, graph) = end_capture(origin);
        assert_eq!(r, CUDA_SUCCESS);
        assert_eq!(cuStreamIsCapturing(side, &mut status), CUDA_SUCCESS);
        assert_eq!(status, CU_STREAM_CAPTURE_STATUS_NONE, "ending the capture releases joined streams");
        assert_eq!(download::<u32>(p, 2), [0, 0]);
        let exec = instantiate(graph);
        assert_eq!(cuGraphLaunch(exec, origin), CUDA_SUCCESS);
        assert_eq!(download::<u32>(p, 2), [1, 2]);
        assert_eq!(cuGraphExecDestroy(exec), CUDA_SUCCESS);
        assert_eq!(cuGraphDestroy(graph), CUDA_SUCCESS);

        // Only the stream that began the capture can end it.
        assert_eq!(cuStreamBeginCapture_v2(origin, mode), CUDA_SUCCESS);
        assert_eq!(cuEventRecord(fork, origin), CUDA_SUCCESS);
        assert_eq!(cuStreamWaitEvent(side, fork, 0), CUDA_SUCCESS);
        assert_eq!(end_capture(side).0, CUDA_ERROR_STREAM_CAPTURE_UNMATCHED);
        assert_eq!(end_capture(origin), (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, null_mut()));

        // Unjoined: the side stream's last work never reached the origin.
        assert_eq!(cuStreamBeginCapture_v2(origin, mode), CUDA_SUCCESS);
        assert_eq!(cuEventRecord(fork, origin), CUDA_SUCCESS);
        assert_eq!(cuStreamWaitEvent(side, fork, 0), CUDA_SUCCESS);
        assert_eq!(cuMemsetD32Async(p, 3, 1, side), CUDA_SUCCESS);
        assert_eq!(end_capture(origin).0, CUDA_ERROR_STREAM_CAPTURE_UNJOINED);
        assert_eq!(download::<u32>(p, 2), [1, 2], "no captured work ran");
    }
    free(p);
}

#[test]
fn concurrent_threads_share_the_driver_safely() {
    setup();
    let workers: Vec<_> = (0..4u32)
        .map(|t| {
            std::thread::spawn(move || {
                setup();
                let s = new_stream();
                for i in 0..50u32 {
                    let data = vec![t * 1000 + i; 256];
                    let p = upload(&data);
                    let mut back = vec![0u32; 256];
                    let r = unsafe { cuMemcpyDtoHAsync_v2(back.as_mut_ptr().cast(), p, 1024, s) };
                    assert_eq!(r, CUDA_SUCCESS);
                    assert_eq!(back, data);
                    free(p);
                }
                assert_eq!(unsafe { cuStreamDestroy_v2(s) }, CUDA_SUCCESS);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn error_names_and_strings() {
    unsafe {
        let mut s = null();
        assert_eq!(cuGetErrorName(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, &mut s), CUDA_SUCCESS);
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED");
        assert_eq!(cuGetErrorString(CUDA_ERROR_OUT_OF_MEMORY, &mut s), CUDA_SUCCESS);
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), "out of memory");
        assert_eq!(cuGetErrorString(4242, &mut s), CUDA_ERROR_INVALID_VALUE);
    }
}

// ---- modules ----

/// The directory of the most recently built cubins of the main crate, if any.
fn cubin_dir() -> Option<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let targets = [std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from), Some(manifest.join("../target"))];
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for target in targets.into_iter().flatten() {
        for profile in ["release", "debug"] {
            let Ok(builds) = std::fs::read_dir(target.join(profile).join("build")) else { continue };
            for b in builds.filter_map(Result::ok) {
                let out = b.path().join("out");
                let name = b.file_name().to_string_lossy().into_owned();
                let cubin = out.join("quant.sm_90a.cubin");
                if name.starts_with("r1-kernels-") && cubin.exists() {
                    let modified = std::fs::metadata(&cubin).and_then(|m| m.modified()).ok()?;
                    found.push((modified, out));
                }
            }
        }
    }
    found.into_iter().max_by_key(|(t, _)| *t).map(|(_, dir)| dir)
}

fn cubins_or_skip(test: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let Some(dir) = cubin_dir() else {
        eprintln!("SKIPPED {test}: no cubins (run `cargo build --release` in the main crate with the CUDA toolchain)");
        return None;
    };
    let mut cubins: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".sm_90a.cubin"))
        .map(|p| {
            let module = p.file_name().unwrap().to_string_lossy().trim_end_matches(".sm_90a.cubin").to_string();
            (module, std::fs::read(&p).unwrap())
        })
        .collect();
    cubins.sort();
    Some(cubins)
}

fn load_module(image: &[u8]) -> (CUresult, CUmodule) {
    let mut module = null_mut();
    let r = unsafe { cuModuleLoadData(&mut module, image.as_ptr().cast()) };
    (r, module)
}

fn get_function(module: CUmodule, name: &str) -> (CUresult, CUfunction) {
    let name = CString::new(name).unwrap();
    let mut f = null_mut();
    let r = unsafe { cuModuleGetFunction(&mut f, module, name.as_ptr()) };
    (r, f)
}

#[test]
fn images_other_than_sm90_cubins_are_refused() {
    setup();
    let ptx = b"//\n// Generated by NVIDIA NVVM Compiler\n.version 8.5\n.target sm_80\n.address_size 64\n\0";
    assert_eq!(load_module(ptx).0, CUDA_ERROR_NOT_SUPPORTED);
    let garbage = [0x12u8; 64];
    assert_eq!(load_module(&garbage).0, CUDA_ERROR_INVALID_IMAGE);
    let Some(cubins) = cubins_or_skip("images_other_than_sm90_cubins_are_refused") else { return };
    let mut other_arch = cubins[0].1.clone();
    // ELF ABI version 8 keeps the SM in e_flags bits 8-15: make it sm_80.
    other_arch[49] = 80;
    assert_eq!(load_module(&other_arch).0, CUDA_ERROR_NO_BINARY_FOR_GPU);
}

/// Every kernel of every cubin the crate builds resolves to an emulated kernel whose parameter sizes match the
/// cubin's (cuModuleGetFunction checks the signatures).
#[test]
fn every_cubin_kernel_is_emulated() {
    setup();
    let Some(cubins) = cubins_or_skip("every_cubin_kernel_is_emulated") else { return };
    let emulated = emulated_kernels();
    let mut missing = Vec::new();
    let mut checked = 0;
    for (module_name, image) in &cubins {
        let (r, module) = load_module(image);
        assert_eq!(r, CUDA_SUCCESS, "loading {module_name}");
        assert_eq!(get_function(module, "no_such_kernel").0, CUDA_ERROR_NOT_FOUND);
        for name in kernels_in_cubin(image).unwrap() {
            let (r, f) = get_function(module, &name);
            if r == CUDA_ERROR_NOT_FOUND && !emulated.contains(&name) {
                missing.push(format!("{module_name}::{name}"));
                continue;
            }
            assert_eq!(r, CUDA_SUCCESS, "{module_name}::{name}");
            assert_eq!(get_function(module, &name).1, f, "one handle per kernel");
            checked += 1;
        }
        assert_eq!(unsafe { cuModuleUnload(module) }, CUDA_SUCCESS);
        assert_eq!(unsafe { cuModuleUnload(module) }, CUDA_ERROR_INVALID_HANDLE);
    }
    assert!(missing.is_empty(), "kernels not compiled into the emulator ({checked} are): {missing:?}");
}

/// act_quant_group128's one argument, `ActQuantParams` of kernels/common/quant_params.cuh (48 bytes).
#[repr(C)]
struct ActQuantParams {
    x: u64,
    q: u64,
    scales: u64,
    m: i32,
    k: i32,
    m_pad: i32,
    ue8m0: i32,
    vec: i32,
}

/// quant::act_quant_group128 (`__launch_bounds__(256)`), or None (printing why) when unavailable.
fn act_quant(test: &str) -> Option<(CUmodule, CUfunction)> {
    let cubins = cubins_or_skip(test)?;
    let (_, image) = cubins.iter().find(|(m, _)| m == "quant")?;
    let (r, module) = load_module(image);
    assert_eq!(r, CUDA_SUCCESS);
    let (r, f) = get_function(module, "act_quant_group128");
    if r != CUDA_SUCCESS {
        eprintln!("SKIPPED {test}: the engine has no act_quant_group128");
        return None;
    }
    Some((module, f))
}

fn func_attribute(f: CUfunction, attr: u32) -> i32 {
    let mut v = -7;
    assert_eq!(unsafe { cuFuncGetAttribute(&mut v, attr, f) }, CUDA_SUCCESS, "attribute {attr}");
    v
}

#[test]
fn function_attributes_come_from_the_cubin() {
    setup();
    let Some((_, f)) = act_quant("function_attributes_come_from_the_cubin") else { return };
    assert_eq!(func_attribute(f, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK), 256, "__launch_bounds__(256)");
    assert!(func_attribute(f, CU_FUNC_ATTRIBUTE_NUM_REGS) > 0);
    assert_eq!(func_attribute(f, CU_FUNC_ATTRIBUTE_BINARY_VERSION), 90);
    let static_smem = func_attribute(f, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES);
    assert_eq!(func_attribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), 49_152 - static_smem);
    unsafe {
        let most = 232_448 - static_smem;
        assert_eq!(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, most), CUDA_SUCCESS);
        assert_eq!(func_attribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), most);
        let r = cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, most + 1);
        assert_eq!(r, CUDA_ERROR_INVALID_VALUE, "static + dynamic above the 227 KiB opt-in limit");
        assert_eq!(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_NUM_REGS, 8), CUDA_ERROR_INVALID_VALUE, "read-only");
        let mut blocks = 0;
        assert_eq!(cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut blocks, f, 256, 0), CUDA_SUCCESS);
        assert!((1..=8).contains(&blocks), "{blocks}");
    }
}

/// Launch configurations a device refuses are refused before the engine runs anything.
#[test]
fn invalid_launches_are_refused() {
    setup();
    let Some((_, f)) = act_quant("invalid_launches_are_refused") else { return };
    let (x, q, scales) = (alloc(4096), alloc(4096), alloc(4096));
    let mut args = ActQuantParams { x, q, scales, m: 1, k: 128, m_pad: 1, ue8m0: 0, vec: 1 };
    let mut params: [*mut c_void; 1] = [(&mut args as *mut ActQuantParams).cast()];
    let launch = |grid: u32, block: u32, smem: u32, params: *mut *mut c_void| unsafe {
        cuLaunchKernel(f, grid, 1, 1, block, 1, 1, smem, null_mut(), params, null_mut())
    };
    let p = params.as_mut_ptr();
    assert_eq!(launch(1, 512, 0, p), CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "above __launch_bounds__(256)");
    assert_eq!(launch(0, 256, 0, p), CUDA_ERROR_INVALID_VALUE, "empty grid");
    assert_eq!(launch(1, 2048, 0, p), CUDA_ERROR_INVALID_VALUE, "above 1024 threads");
    assert_eq!(launch(1, 256, 64 << 10, p), CUDA_ERROR_INVALID_VALUE, "above the dynamic shared memory limit");
    assert_eq!(launch(1, 256, 0, null_mut()), CUDA_ERROR_INVALID_VALUE, "no parameters");

    let mut attr: CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    let mut cluster_config = |cluster_x: u32, grid: u32| {
        attr.value.words[..3].copy_from_slice(&[cluster_x, 1, 1]);
        CUlaunchConfig {
            grid_dim_x: grid,
            grid_dim_y: 1,
            grid_dim_z: 1,
            block_dim_x: 256,
            block_dim_y: 1,
            block_dim_z: 1,
            shared_mem_bytes: 0,
            h_stream: null_mut(),
            attrs: &mut attr,
            num_attrs: 1,
        }
    };
    let config = cluster_config(2, 3);
    let r = unsafe { cuLaunchKernelEx(&config, f, p, null_mut()) };
    assert_eq!(r, CUDA_ERROR_INVALID_CLUSTER_SIZE, "grid not a multiple of the cluster");
    let config = cluster_config(16, 16);
    let r = unsafe { cuLaunchKernelEx(&config, f, p, null_mut()) };
    assert_eq!(r, CUDA_ERROR_INVALID_CLUSTER_SIZE, "above the portable cluster size");
    let config = cluster_config(2, 2);
    let mut fit = -1;
    assert_eq!(unsafe { cuOccupancyMaxActiveClusters(&mut fit, f, &config) }, CUDA_SUCCESS);
    assert_eq!(fit, attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) / 2, "one CTA of a cluster per SM");
    for p in [x, q, scales] {
        free(p);
    }
}

/// A graph replay of a kernel equals its eager launch, and uses the arguments as they were at capture.
#[test]
fn kernel_graph_replay_equals_eager_launch() {
    setup();
    let Some((_, f)) = act_quant("kernel_graph_replay_equals_eager_launch") else { return };
    let (rows, cols) = (4usize, 256usize);
    let x: Vec<u16> = (0..rows * cols).map(|i| bf16_bits(((i % 97) as f32 - 48.0) / 7.0)).collect();
    let xd = upload(&x);
    let (q_eager, q_graph) = (alloc(rows * cols), alloc(rows * cols));
    let scales_len = cols.div_ceil(128) * rows;
    let (s_eager, s_graph) = (alloc(scales_len * 4), alloc(scales_len * 4));
    let stream = new_stream();
    let run = |q: CUdeviceptr, s: CUdeviceptr| {
        let (m, k) = (rows as i32, cols as i32);
        let mut args = ActQuantParams { x: xd, q, scales: s, m, k, m_pad: m, ue8m0: 0, vec: 1 };
        let mut params: [*mut c_void; 1] = [(&mut args as *mut ActQuantParams).cast()];
        // 16 threads per 128-element group.
        let threads = (rows * cols.div_ceil(128) * 16) as u32;
        // The arguments live in this closure's frame, gone when the graph replays: capture must copy them.
        unsafe { cuLaunchKernel(f, threads.div_ceil(256), 1, 1, 256, 1, 1, 0, stream, params.as_mut_ptr(), null_mut()) }
    };
    assert_eq!(run(q_eager, s_eager), CUDA_SUCCESS);
    unsafe {
        assert_eq!(cuStreamBeginCapture_v2(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
        assert_eq!(run(q_graph, s_graph), CUDA_SUCCESS);
        let (r, graph) = end_capture(stream);
        assert_eq!(r, CUDA_SUCCESS);
        let exec = instantiate(graph);
        assert_eq!(cuGraphLaunch(exec, stream), CUDA_SUCCESS);
        assert_eq!(cuStreamSynchronize(stream), CUDA_SUCCESS);
    }
    assert_eq!(download::<u8>(q_graph, rows * cols), download::<u8>(q_eager, rows * cols));
    let scales = download::<f32>(s_graph, scales_len);
    assert_eq!(scales, download::<f32>(s_eager, scales_len));
    assert!(scales.iter().all(|s| s.is_finite() && *s > 0.0), "{scales:?}");
}

/// bf16 bits of `v` (truncating).
fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

// ---- tensor maps ----

#[repr(C, align(128))]
struct Map([u8; 128]);

/// cuTensorMapEncodeTiled of a 2-D uint8 tensor `rows × cols` at `ptr`, row stride `stride` bytes, box
/// `box_cols × box_rows`, 128-byte swizzle.
fn encode(ptr: u64, rank: u32, cols: u64, rows: u64, stride: u64, box_cols: u32, box_rows: u32) -> CUresult {
    let mut map = Map([0; 128]);
    let dims = [cols, rows, 1, 1, 1, 1];
    let strides = [stride, stride * rows, stride * rows, stride * rows, stride * rows];
    let boxes = [box_cols, box_rows, 1, 1, 1, 1];
    let elem = [1u32; 6];
    unsafe {
        cuTensorMapEncodeTiled(
            (&mut map as *mut Map).cast(),
            0, // CU_TENSOR_MAP_DATA_TYPE_UINT8
            rank,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            0, // no interleave
            3, // CU_TENSOR_MAP_SWIZZLE_128B
            2, // CU_TENSOR_MAP_L2_PROMOTION_L2_128B
            0, // no OOB NaN fill
        )
    }
}

#[test]
fn tensor_map_encoding_follows_the_documented_rules() {
    setup();
    let p = alloc(256 * 1024);
    assert_eq!(encode(p, 2, 256, 1024, 256, 128, 64), CUDA_SUCCESS);
    assert_eq!(encode(p, 0, 256, 1024, 256, 128, 64), CUDA_ERROR_INVALID_VALUE, "rank 0");
    assert_eq!(encode(p, 6, 256, 1024, 256, 128, 64), CUDA_ERROR_INVALID_VALUE, "rank 6");
    assert_eq!(encode(p + 8, 2, 256, 1024, 256, 128, 64), CUDA_ERROR_INVALID_VALUE, "address not 16-byte aligned");
    assert_eq!(encode(p, 2, 256, 1024, 200, 128, 64), CUDA_ERROR_INVALID_VALUE, "stride not a multiple of 16");
    assert_eq!(encode(p, 2, 256, 1024, 256, 128, 512), CUDA_ERROR_INVALID_VALUE, "box dimension above 256");
    assert_eq!(encode(p, 2, 256, 1024, 256, 256, 64), CUDA_ERROR_INVALID_VALUE, "inner box wider than the swizzle");
    let r = unsafe {
        cuTensorMapEncodeTiled(null_mut(), 0, 2, p as *mut c_void, null(), null(), null(), null(), 0, 0, 0, 0)
    };
    assert_eq!(r, CUDA_ERROR_INVALID_VALUE, "null arguments");
    free(p);
}
