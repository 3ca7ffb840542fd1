//! The driver's launch, capture and replay machinery against the mock engine (mock_engine.rs) and a synthetic
//! cubin, so these rules are tested whatever state the real engine is in.

use std::ffi::{c_void, CString};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cubin::testing::{build, FakeKernel};
use crate::mock_engine::last_launch;
use crate::types::*;
use crate::*;

fn setup() {
    unsafe {
        assert_eq!(cuInit(0), CUDA_SUCCESS);
        let mut ctx = null_mut();
        assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, 0), CUDA_SUCCESS);
        assert_eq!(cuCtxSetCurrent(ctx), CUDA_SUCCESS);
    }
}

fn kernel(name: &'static str, param_sizes: &'static [u32]) -> FakeKernel<'static> {
    FakeKernel { name, param_sizes, max_threads: None, static_smem: 0, registers: Some(32) }
}

/// A module of the mock engine's kernels, plus one the engine lacks and one whose signature disagrees with it.
fn module() -> CUmodule {
    let image = build(&[
        FakeKernel { max_threads: Some(128), ..kernel("fill_u32", &[8, 4, 4]) },
        kernel("trap", &[]),
        kernel("read_map", &[128, 8]),
        kernel("sig_mismatch", &[8, 4]),
        kernel("not_in_engine", &[8]),
    ]);
    let mut m = null_mut();
    assert_eq!(unsafe { cuModuleLoadData(&mut m, image.as_ptr().cast()) }, CUDA_SUCCESS);
    m
}

fn function(m: CUmodule, name: &str) -> (CUresult, CUfunction) {
    let name = CString::new(name).unwrap();
    let mut f = null_mut();
    let r = unsafe { cuModuleGetFunction(&mut f, m, name.as_ptr()) };
    (r, f)
}

fn alloc(bytes: usize) -> CUdeviceptr {
    let mut p = 0;
    assert_eq!(unsafe { cuMemAlloc_v2(&mut p, bytes) }, CUDA_SUCCESS);
    p
}

fn download_u32(p: CUdeviceptr, n: usize) -> Vec<u32> {
    let mut out = vec![0u32; n];
    assert_eq!(unsafe { cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), p, n * 4) }, CUDA_SUCCESS);
    out
}

fn stream() -> CUstream {
    let mut s = null_mut();
    assert_eq!(unsafe { cuStreamCreate(&mut s, CU_STREAM_NON_BLOCKING) }, CUDA_SUCCESS);
    s
}

/// fill_u32 over `n` words at `out`, one block of `threads`.
fn launch_fill(f: CUfunction, s: CUstream, out: CUdeviceptr, value: u32, n: u32, threads: u32) -> CUresult {
    let (mut out, mut value, mut n) = (out, value, n);
    let mut params: [*mut c_void; 3] =
        [(&mut out as *mut u64).cast(), (&mut value as *mut u32).cast(), (&mut n as *mut u32).cast()];
    unsafe { cuLaunchKernel(f, 1, 1, 1, threads, 1, 1, 0, s, params.as_mut_ptr(), null_mut()) }
}

fn capture(s: CUstream, body: impl FnOnce()) -> CUgraphExec {
    unsafe {
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
        body();
        let mut graph = null_mut();
        assert_eq!(cuStreamEndCapture(s, &mut graph), CUDA_SUCCESS);
        let mut exec = null_mut();
        assert_eq!(cuGraphInstantiateWithFlags(&mut exec, graph, 0), CUDA_SUCCESS);
        assert_eq!(cuGraphDestroy(graph), CUDA_SUCCESS, "an executable graph outlives its graph");
        exec
    }
}

#[test]
fn launches_reach_the_engine_with_the_validated_configuration() {
    setup();
    let m = module();
    let (r, f) = function(m, "fill_u32");
    assert_eq!(r, CUDA_SUCCESS);
    let s = stream();
    let out = alloc(64 * 4);
    assert_eq!(launch_fill(f, s, out, 10, 64, 128), CUDA_SUCCESS);
    assert_eq!(download_u32(out, 64), (10..74).collect::<Vec<u32>>());
    let cfg = last_launch("fill_u32").unwrap();
    assert_eq!((cfg.grid, cfg.block, cfg.cluster), ([1, 1, 1], [128, 1, 1], [1, 1, 1]));
    assert_eq!(cfg.max_dynamic_smem_bytes, 48 * 1024);
    assert_eq!(launch_fill(f, s, out, 0, 1, 256), CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "launch bounds are 128");

    // A cluster launch passes the cluster shape through.
    let (mut out_arg, mut value, mut n) = (out, 1u32, 4u32);
    let mut params: [*mut c_void; 3] =
        [(&mut out_arg as *mut u64).cast(), (&mut value as *mut u32).cast(), (&mut n as *mut u32).cast()];
    let mut attr: CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.words[..3].copy_from_slice(&[2, 1, 1]);
    let config = CUlaunchConfig {
        grid_dim_x: 4,
        grid_dim_y: 1,
        grid_dim_z: 1,
        block_dim_x: 32,
        block_dim_y: 1,
        block_dim_z: 1,
        shared_mem_bytes: 1024,
        h_stream: s,
        attrs: &mut attr,
        num_attrs: 1,
    };
    assert_eq!(unsafe { cuLaunchKernelEx(&config, f, params.as_mut_ptr(), null_mut()) }, CUDA_SUCCESS);
    let cfg = last_launch("fill_u32").unwrap();
    assert_eq!((cfg.grid, cfg.cluster, cfg.dynamic_smem_bytes), ([4, 1, 1], [2, 1, 1], 1024));
    unsafe {
        assert_eq!(cuMemFree_v2(out), CUDA_SUCCESS);
        assert_eq!(cuStreamDestroy_v2(s), CUDA_SUCCESS);
        assert_eq!(cuModuleUnload(m), CUDA_SUCCESS);
        let mut v = 0;
        assert_eq!(cuFuncGetAttribute(&mut v, CU_FUNC_ATTRIBUTE_NUM_REGS, f), CUDA_ERROR_INVALID_HANDLE, "unloaded");
    }
}

#[test]
fn kernel_faults_are_reported_at_the_launch_and_once_more_at_synchronization() {
    setup();
    let m = module();
    let (_, fill) = function(m, "fill_u32");
    let s = stream();
    let host = [0u32; 4];
    // Host memory is not device memory: the engine refuses the store.
    assert_eq!(launch_fill(fill, s, host.as_ptr() as u64, 0, 4, 32), CUDA_ERROR_ILLEGAL_ADDRESS);
    unsafe {
        assert_eq!(cuStreamSynchronize(s), CUDA_ERROR_ILLEGAL_ADDRESS);
        assert_eq!(cuStreamSynchronize(s), CUDA_SUCCESS, "reported once");
        let (_, trap) = function(m, "trap");
        let r = cuLaunchKernel(trap, 1, 1, 1, 32, 1, 1, 0, s, null_mut(), null_mut());
        assert_eq!(r, CUDA_ERROR_LAUNCH_FAILED);
        assert_eq!(cuCtxSynchronize(), CUDA_ERROR_LAUNCH_FAILED);
        assert_eq!(cuStreamSynchronize(s), CUDA_SUCCESS, "context synchronization took it");
    }
}

#[test]
fn functions_must_exist_in_the_engine_with_the_cubins_signature() {
    setup();
    let m = module();
    assert_eq!(function(m, "not_in_engine").0, CUDA_ERROR_NOT_FOUND);
    assert_eq!(function(m, "sig_mismatch").0, CUDA_ERROR_INVALID_IMAGE);
    assert_eq!(function(m, "absent").0, CUDA_ERROR_NOT_FOUND);
    let (r1, f1) = function(m, "trap");
    let (r2, f2) = function(m, "trap");
    assert_eq!((r1, r2), (CUDA_SUCCESS, CUDA_SUCCESS));
    assert_eq!(f1, f2);
    assert!(emulated_kernels().contains(&"fill_u32".to_string()));
}

#[test]
fn captured_launches_keep_copies_of_their_arguments() {
    setup();
    let m = module();
    let (_, fill) = function(m, "fill_u32");
    let (_, read_map) = function(m, "read_map");
    let s = stream();
    let out = alloc(16 * 4);
    let word = alloc(8);
    let exec = capture(s, || {
        // Arguments on this closure's stack are gone by the time the graph runs.
        assert_eq!(launch_fill(fill, s, out, 5, 16, 32), CUDA_SUCCESS);
        let mut map = CUtensorMap { opaque: [0; 16] };
        map.opaque[0] = 0xfeed_f00d;
        let mut word_arg = word;
        let mut params: [*mut c_void; 2] = [(&mut map as *mut CUtensorMap).cast(), (&mut word_arg as *mut u64).cast()];
        let r = unsafe { cuLaunchKernel(read_map, 1, 1, 1, 32, 1, 1, 0, s, params.as_mut_ptr(), null_mut()) };
        assert_eq!(r, CUDA_SUCCESS);
    });
    assert_eq!(unsafe { cuMemsetD32_v2(out, 0, 16) }, CUDA_SUCCESS);
    assert_eq!(download_u32(out, 16), vec![0; 16], "capture ran nothing");
    assert_eq!(unsafe { cuGraphLaunch(exec, s) }, CUDA_SUCCESS);
    assert_eq!(download_u32(out, 16), (5..21).collect::<Vec<u32>>());
    assert_eq!(download_u32(word, 2), [0xfeed_f00d, 0], "a 128-byte parameter, kept 128-byte aligned");
    unsafe {
        assert_eq!(cuGraphExecDestroy(exec), CUDA_SUCCESS);
        assert_eq!(cuMemFree_v2(out), CUDA_SUCCESS);
        assert_eq!(cuMemFree_v2(word), CUDA_SUCCESS);
    }
}

#[test]
fn a_failing_replay_is_reported() {
    setup();
    let m = module();
    let (_, trap) = function(m, "trap");
    let s = stream();
    let exec = capture(s, || {
        let r = unsafe { cuLaunchKernel(trap, 1, 1, 1, 32, 1, 1, 0, s, null_mut(), null_mut()) };
        assert_eq!(r, CUDA_SUCCESS, "captured, not run");
    });
    unsafe {
        assert_eq!(cuGraphLaunch(exec, s), CUDA_ERROR_LAUNCH_FAILED);
        assert_eq!(cuStreamSynchronize(s), CUDA_ERROR_LAUNCH_FAILED);
        assert_eq!(cuStreamSynchronize(s), CUDA_SUCCESS);
        assert_eq!(cuGraphExecDestroy(exec), CUDA_SUCCESS);
    }
}

#[test]
fn a_graph_launched_into_a_capture_is_captured() {
    setup();
    let s = stream();
    let p = alloc(16);
    let inner = capture(s, || assert_eq!(unsafe { cuMemsetD32Async(p, 7, 4, s) }, CUDA_SUCCESS));
    let outer = capture(s, || assert_eq!(unsafe { cuGraphLaunch(inner, s) }, CUDA_SUCCESS));
    assert_eq!(unsafe { cuMemsetD32_v2(p, 0, 4) }, CUDA_SUCCESS);
    assert_eq!(download_u32(p, 4), [0; 4]);
    assert_eq!(unsafe { cuGraphLaunch(outer, s) }, CUDA_SUCCESS);
    assert_eq!(download_u32(p, 4), [7; 4]);
    unsafe {
        assert_eq!(cuGraphExecDestroy(inner), CUDA_SUCCESS);
        assert_eq!(cuGraphExecDestroy(outer), CUDA_SUCCESS);
        assert_eq!(cuMemFree_v2(p), CUDA_SUCCESS);
    }
}

fn is_live(p: CUdeviceptr) -> bool {
    let (mut base, mut size) = (0, 0usize);
    unsafe { cuMemGetAddressRange_v2(&mut base, &mut size, p) == CUDA_SUCCESS }
}

#[test]
fn memory_allocated_and_freed_inside_a_capture_lives_as_long_as_the_graph() {
    setup();
    let s = stream();
    let out = alloc(16);
    let mut scratch = 0;
    unsafe {
        assert_eq!(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
        assert_eq!(cuMemAllocAsync(&mut scratch, 16, s), CUDA_SUCCESS);
        assert_eq!(cuMemsetD32Async(scratch, 3, 4, s), CUDA_SUCCESS);
        assert_eq!(cuMemcpyDtoDAsync_v2(out, scratch, 16, s), CUDA_SUCCESS);
        assert_eq!(cuMemFreeAsync(scratch, s), CUDA_SUCCESS);
        let mut graph = null_mut();
        assert_eq!(cuStreamEndCapture(s, &mut graph), CUDA_SUCCESS);
        let mut exec = null_mut();
        assert_eq!(cuGraphInstantiateWithFlags(&mut exec, graph, 0), CUDA_SUCCESS);
        for _ in 0..2 {
            assert_eq!(cuMemsetD32_v2(out, 0, 4), CUDA_SUCCESS);
            assert_eq!(cuGraphLaunch(exec, s), CUDA_SUCCESS);
            assert_eq!(download_u32(out, 4), [3; 4]);
        }
        assert_eq!(cuGraphExecDestroy(exec), CUDA_SUCCESS);
        assert!(is_live(scratch), "the graph can still be instantiated again");
        assert_eq!(cuGraphDestroy(graph), CUDA_SUCCESS);
        assert!(!is_live(scratch));
        assert_eq!(cuMemFree_v2(out), CUDA_SUCCESS);
    }
}

static HOST_CALLS: AtomicU32 = AtomicU32::new(0);

/// Adds the u32 `data` points to.
unsafe extern "C" fn count_call(data: *mut c_void) {
    HOST_CALLS.fetch_add(unsafe { *data.cast::<u32>() }, Ordering::SeqCst);
}

#[test]
fn host_functions_run_in_stream_order() {
    setup();
    let s = stream();
    unsafe {
        let (mut one, mut ten) = (1u32, 10u32);
        let (one, ten): (*mut u32, *mut u32) = (&mut one, &mut ten);
        assert_eq!(cuLaunchHostFunc(s, Some(count_call), one.cast()), CUDA_SUCCESS);
        assert_eq!(HOST_CALLS.load(Ordering::SeqCst), 1);
        let exec = capture(s, || {
            assert_eq!(cuLaunchHostFunc(s, Some(count_call), ten.cast()), CUDA_SUCCESS);
        });
        assert_eq!(HOST_CALLS.load(Ordering::SeqCst), 1, "captured, not run");
        assert_eq!(cuGraphLaunch(exec, s), CUDA_SUCCESS);
        assert_eq!(HOST_CALLS.load(Ordering::SeqCst), 11);
        assert_eq!(cuGraphExecDestroy(exec), CUDA_SUCCESS);
    }
}

#[test]
fn launch_attributes_are_honoured_ignored_or_refused() {
    setup();
    let m = module();
    let (_, trap) = function(m, "trap");
    let with_attribute = |id: u32, value: u32| {
        let mut attr: CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = id;
        attr.value.words[0] = value;
        let config = CUlaunchConfig {
            grid_dim_x: 1,
            grid_dim_y: 1,
            grid_dim_z: 1,
            block_dim_x: 32,
            block_dim_y: 1,
            block_dim_z: 1,
            shared_mem_bytes: 0,
            h_stream: null_mut(),
            attrs: &mut attr,
            num_attrs: 1,
        };
        unsafe { cuLaunchKernelEx(&config, trap, null_mut(), null_mut()) }
    };
    assert_eq!(with_attribute(99, 0), CUDA_ERROR_INVALID_VALUE, "unknown attribute");
    assert_eq!(with_attribute(CU_LAUNCH_ATTRIBUTE_COOPERATIVE, 1), CUDA_ERROR_NOT_SUPPORTED);
    assert_eq!(with_attribute(CU_LAUNCH_ATTRIBUTE_LAUNCH_COMPLETION_EVENT, 0), CUDA_ERROR_NOT_SUPPORTED);
    // Accepted: the launch reaches the engine (whose trap kernel then fails).
    assert_eq!(with_attribute(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1), CUDA_ERROR_LAUNCH_FAILED);
    assert_eq!(with_attribute(CU_LAUNCH_ATTRIBUTE_PRIORITY, 0), CUDA_ERROR_LAUNCH_FAILED);
    let mut extra = [null_mut::<c_void>(); 1];
    let r = unsafe { cuLaunchKernel(trap, 1, 1, 1, 32, 1, 1, 0, null_mut(), null_mut(), extra.as_mut_ptr()) };
    assert_eq!(r, CUDA_ERROR_NOT_SUPPORTED, "arguments through `extra`");
    assert_eq!(unsafe { cuCtxSynchronize() }, CUDA_ERROR_LAUNCH_FAILED);
}

#[test]
fn tensor_map_encoding_forwards_the_engines_verdict() {
    setup();
    let p = alloc(4096);
    let mut map = CUtensorMap { opaque: [1; 16] };
    let (dims, strides, boxes, elem) = ([64u64, 64], [64u64], [64u32, 8], [1u32, 1]);
    let encode = |map: &mut CUtensorMap, rank: u32| unsafe {
        let (d, st, b, e) = (dims.as_ptr(), strides.as_ptr(), boxes.as_ptr(), elem.as_ptr());
        cuTensorMapEncodeTiled(map, 0, rank, p as *mut c_void, d, st, b, e, 0, 0, 0, 0)
    };
    assert_eq!(encode(&mut map, 2), CUDA_SUCCESS);
    assert_eq!(map.opaque[0], p);
    assert_eq!(encode(&mut map, 9), CUDA_ERROR_INVALID_VALUE);
    assert_eq!(unsafe { cuMemFree_v2(p) }, CUDA_SUCCESS);
}

#[test]
fn unimplemented_entry_points_fail_loudly() {
    assert_eq!(unsafe { crate::cuMemAllocManaged() }, CUDA_ERROR_NOT_SUPPORTED);
    assert_eq!(unsafe { crate::cuGraphAddKernelNode() }, CUDA_ERROR_NOT_SUPPORTED);
}
