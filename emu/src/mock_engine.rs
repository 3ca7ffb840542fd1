//! A stand-in for the C++ engine in unit tests, with the engine's C ABI as Rust functions: a few toy kernels, an
//! allocation table that rejects double registration and unknown unregistration (so driver bookkeeping bugs
//! surface), and a record of every launch configuration.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

use crate::engine::EngineLaunchConfig;

struct MockKernel {
    name: &'static CStr,
    params: &'static [u32],
}

/// - `fill_u32(u32* out, u32 value, u32 n)`: out[i] = value + i, refusing memory not registered.
/// - `trap()`: fails like a kernel that executed `trap`.
/// - `read_map(CUtensorMap map, u64* out)`: out[0] = the map's first word, refusing a map not 128-byte aligned.
/// - `sig_mismatch(u64)`: a signature the tests' cubin disagrees with.
static KERNELS: [MockKernel; 4] = [
    MockKernel { name: c"fill_u32", params: &[8, 4, 4] },
    MockKernel { name: c"trap", params: &[] },
    MockKernel { name: c"read_map", params: &[128, 8] },
    MockKernel { name: c"sig_mismatch", params: &[8] },
];

static ALLOCATIONS: Mutex<BTreeMap<u64, u64>> = Mutex::new(BTreeMap::new());
static LAUNCHES: Mutex<Vec<(String, EngineLaunchConfig)>> = Mutex::new(Vec::new());

/// The configuration of the most recent launch of `name`.
pub fn last_launch(name: &str) -> Option<EngineLaunchConfig> {
    LAUNCHES.lock().unwrap().iter().rev().find(|(n, _)| n == name).map(|(_, c)| *c)
}

fn registered(ptr: u64, bytes: u64) -> bool {
    let table = ALLOCATIONS.lock().unwrap();
    table.range(..=ptr).next_back().is_some_and(|(&base, &size)| ptr + bytes <= base + size)
}

fn kernel(handle: *const c_void) -> &'static MockKernel {
    KERNELS.iter().find(|&k| std::ptr::eq(k as *const MockKernel as *const c_void, handle)).expect("a mock kernel")
}

fn write_err(err: *mut c_char, err_len: usize, text: &str) {
    let n = text.len().min(err_len - 1);
    // SAFETY: the driver passes a buffer of err_len bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

pub unsafe fn r1k_emu_kernel_count() -> c_int {
    KERNELS.len() as c_int
}

pub unsafe fn r1k_emu_kernel_name(i: c_int) -> *const c_char {
    KERNELS.get(i as usize).map_or(std::ptr::null(), |k| k.name.as_ptr())
}

pub unsafe fn r1k_emu_find_kernel(name: *const c_char) -> *const c_void {
    // SAFETY: the driver passes a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(name) };
    KERNELS.iter().find(|k| k.name == name).map_or(std::ptr::null(), |k| k as *const MockKernel as *const c_void)
}

pub unsafe fn r1k_emu_kernel_param_sizes(kernel_handle: *const c_void, sizes: *mut u32, max: c_int) -> c_int {
    let k = kernel(kernel_handle);
    for (i, &s) in k.params.iter().enumerate().take(max as usize) {
        // SAFETY: the driver passes room for `max` sizes.
        unsafe { *sizes.add(i) = s };
    }
    k.params.len() as c_int
}

pub unsafe fn r1k_emu_launch(
    kernel_handle: *const c_void,
    config: *const EngineLaunchConfig,
    params: *mut *mut c_void,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    let k = kernel(kernel_handle);
    let name = k.name.to_str().unwrap();
    // SAFETY: the driver passes a valid configuration.
    LAUNCHES.lock().unwrap().push((name.to_string(), unsafe { *config }));
    // SAFETY: the driver passes one pointer per parameter of the kernel's signature.
    unsafe {
        match name {
            "fill_u32" => {
                let out = *(*params).cast::<*mut u32>();
                let (value, n) = (*(*params.add(1)).cast::<u32>(), *(*params.add(2)).cast::<u32>());
                if !registered(out as u64, n as u64 * 4) {
                    write_err(err, err_len, "fill_u32: store outside every registered allocation");
                    return 700;
                }
                for i in 0..n {
                    *out.add(i as usize) = value + i;
                }
                0
            }
            "read_map" => {
                let map = *params;
                if !(map as usize).is_multiple_of(128) {
                    write_err(err, err_len, "read_map: tensor map parameter not 128-byte aligned");
                    return 719;
                }
                let out = *(*params.add(1)).cast::<*mut u64>();
                *out = *map.cast::<u64>();
                0
            }
            _ => {
                write_err(err, err_len, "trap: CTA (0,0,0) thread 0 executed trap");
                719
            }
        }
    }
}

pub unsafe fn r1k_emu_register_alloc(ptr: u64, bytes: u64) {
    let previous = ALLOCATIONS.lock().unwrap().insert(ptr, bytes);
    assert!(previous.is_none(), "allocation {ptr:#x} registered twice");
}

pub unsafe fn r1k_emu_unregister_alloc(ptr: u64) {
    let removed = ALLOCATIONS.lock().unwrap().remove(&ptr);
    assert!(removed.is_some(), "unregistering {ptr:#x}, which is not registered");
}

#[allow(clippy::too_many_arguments)]
pub unsafe fn r1k_emu_tensor_map_encode_tiled(
    map: *mut c_void,
    _data_type: c_int,
    rank: u32,
    global_address: *mut c_void,
    _global_dim: *const u64,
    _global_strides: *const u64,
    _box_dim: *const u32,
    _element_strides: *const u32,
    _interleave: c_int,
    _swizzle: c_int,
    _l2_promotion: c_int,
    _oob_fill: c_int,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    if !(1..=5).contains(&rank) {
        write_err(err, err_len, &format!("tensorRank {rank} is outside 1..=5"));
        return 1;
    }
    // SAFETY: the driver passes a 128-byte map.
    unsafe {
        std::ptr::write_bytes(map.cast::<u8>(), 0, 128);
        *map.cast::<u64>() = global_address as u64;
    }
    0
}
