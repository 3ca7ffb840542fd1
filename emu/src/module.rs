//! Modules and functions. A module is an sm_90a cubin: the driver reads which kernels it holds and what their
//! `.nv.info` says (parameters, launch bounds, cluster shape, resources), and runs each kernel as the engine's
//! host-compiled twin of the same source.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::Arc;

use crate::cubin::{parse_image_at, ImageError, KernelInfo};
use crate::device::{
    MAX_SHARED_MEMORY_PER_BLOCK, MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, MAX_THREADS_PER_BLOCK, REGISTERS_PER_SM,
};
use crate::engine;
use crate::entry::{entry, write_out};
use crate::errors::{fail, DriverResult, Failure};
use crate::state::{driver, Function, Module};
use crate::types::*;

/// Registers are allocated to warps in units of 256.
const REGISTER_ALLOCATION_UNIT: u32 = 256;

/// The most threads a block of this kernel may have: 1024, its launch bounds, and what its registers allow.
pub fn max_threads_per_block(info: &KernelInfo) -> u32 {
    let mut limit = MAX_THREADS_PER_BLOCK;
    if let Some(bound) = info.max_threads.filter(|&t| t > 0) {
        limit = limit.min(bound);
    }
    if let Some(regs) = info.registers.filter(|&r| r > 0) {
        let per_warp = (regs * 32).div_ceil(REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT;
        limit = limit.min(REGISTERS_PER_SM / per_warp * 32);
    }
    limit
}

fn load(module: *mut CUmodule, image: *const c_void) -> DriverResult {
    if module.is_null() || image.is_null() {
        return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
    }
    driver().current_ctx()?;
    // SAFETY: the caller passes a module image, readable over the extent its headers describe.
    let cubin = match unsafe { parse_image_at(image.cast()) } {
        Ok(cubin) => cubin,
        Err(ImageError::PtxText) => fail!(
            CUDA_ERROR_NOT_SUPPORTED,
            "PTX cannot be loaded: the emulator runs the sm_90a cubins (this device is compute capability 9.0, so \
             load the cubin)"
        ),
        Err(ImageError::Fatbinary) => {
            fail!(CUDA_ERROR_NOT_SUPPORTED, "fatbinary images are not read; load the bare sm_90a cubin")
        }
        Err(ImageError::WrongArch(sm)) => {
            fail!(CUDA_ERROR_NO_BINARY_FOR_GPU, "the cubin is for sm_{sm}; the emulated device is sm_90")
        }
        Err(ImageError::Malformed(why)) => fail!(CUDA_ERROR_INVALID_IMAGE, "not a loadable cubin: {why}"),
    };
    let mut d = driver();
    let h = d.new_handle();
    d.modules.insert(h, Module { cubin, functions: HashMap::new() });
    // SAFETY: checked non-null; the caller provides storage for one CUmodule.
    unsafe { write_out(module, h as CUmodule) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    entry("cuModuleLoadData", || load(module, image))
}

/// JIT options are irrelevant to a cubin and ignored.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut CUmodule,
    image: *const c_void,
    _num_options: c_uint,
    _options: *mut c_int,
    _option_values: *mut *mut c_void,
) -> CUresult {
    entry("cuModuleLoadDataEx", || load(module, image))
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(hmod: CUmodule) -> CUresult {
    entry("cuModuleUnload", || {
        let mut d = driver();
        let Some(module) = d.modules.remove(&(hmod as usize)) else {
            fail!(CUDA_ERROR_INVALID_HANDLE, "{:#x} is not a loaded module", hmod as usize);
        };
        for f in module.functions.values() {
            d.functions.remove(f);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(hfunc: *mut CUfunction, hmod: CUmodule, name: *const c_char) -> CUresult {
    entry("cuModuleGetFunction", || {
        if hfunc.is_null() || name.is_null() {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        // SAFETY: checked non-null; the caller passes a NUL-terminated name.
        let c_name = unsafe { CStr::from_ptr(name) };
        let name = c_name.to_string_lossy().into_owned();
        let info = {
            let d = driver();
            let Some(module) = d.modules.get(&(hmod as usize)) else {
                fail!(CUDA_ERROR_INVALID_HANDLE, "{:#x} is not a loaded module", hmod as usize);
            };
            if let Some(&f) = module.functions.get(&name) {
                // SAFETY: checked non-null; the caller provides storage for one CUfunction.
                return unsafe { write_out(hfunc, f as CUfunction) };
            }
            match module.cubin.kernels.get(&name) {
                Some(info) => info.clone(),
                None => fail!(CUDA_ERROR_NOT_FOUND, "the module has no kernel named {name}"),
            }
        };
        let Some(kernel) = engine::find_kernel(c_name) else {
            fail!(CUDA_ERROR_NOT_FOUND, "kernel {name} is in the cubin but not compiled into the emulator");
        };
        let param_sizes = checked_param_sizes(&name, &info, engine::kernel_param_sizes(kernel))?;
        let mut d = driver();
        let handle = d.new_handle();
        let Some(module) = d.modules.get_mut(&(hmod as usize)) else {
            fail!(CUDA_ERROR_INVALID_HANDLE, "module {:#x} was unloaded during the lookup", hmod as usize);
        };
        // Another thread may have looked the same kernel up meanwhile: hand out one handle per kernel.
        let handle = *module.functions.entry(name.clone()).or_insert(handle);
        if let std::collections::hash_map::Entry::Vacant(slot) = d.functions.entry(handle) {
            let max_dynamic_smem = MAX_SHARED_MEMORY_PER_BLOCK.saturating_sub(info.static_smem_bytes);
            slot.insert(Function {
                name,
                kernel,
                info,
                param_sizes,
                max_dynamic_smem,
                carveout: -1,
                non_portable_cluster: false,
                cluster_scheduling_policy: 0,
            });
        }
        // SAFETY: checked non-null; the caller provides storage for one CUfunction.
        unsafe { write_out(hfunc, handle as CUfunction) }
    })
}

/// The engine's parameter sizes, which must agree with the cubin's layout: a launch hands the engine the caller's
/// parameter pointers, typed by the cubin's signature.
fn checked_param_sizes(name: &str, info: &KernelInfo, engine_sizes: Vec<u32>) -> DriverResult<Arc<[u32]>> {
    let cubin_sizes: Vec<u32> = info.params.iter().map(|p| p.size).collect();
    let cubin_knows = !cubin_sizes.is_empty() || info.param_bytes == 0;
    if cubin_knows && cubin_sizes != engine_sizes {
        fail!(
            CUDA_ERROR_INVALID_IMAGE,
            "kernel {name}: the emulator's compiled signature has parameter sizes {engine_sizes:?} but the cubin's \
             has {cubin_sizes:?}"
        );
    }
    Ok(engine_sizes.into())
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(pi: *mut c_int, attrib: c_uint, hfunc: CUfunction) -> CUresult {
    entry("cuFuncGetAttribute", || {
        let d = driver();
        let f = d.function(hfunc as usize)?;
        let cluster = f.info.required_cluster.unwrap_or([0; 3]);
        let value = match attrib {
            CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK => max_threads_per_block(&f.info) as c_int,
            CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES => f.info.static_smem_bytes as c_int,
            CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES => 0,
            CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES => f.info.frame_bytes as c_int,
            CU_FUNC_ATTRIBUTE_NUM_REGS => f.info.registers.unwrap_or(0) as c_int,
            CU_FUNC_ATTRIBUTE_PTX_VERSION | CU_FUNC_ATTRIBUTE_BINARY_VERSION => 90,
            CU_FUNC_ATTRIBUTE_CACHE_MODE_CA => 0,
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES => f.max_dynamic_smem as c_int,
            CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT => f.carveout,
            CU_FUNC_ATTRIBUTE_CLUSTER_SIZE_MUST_BE_SET => f.info.explicit_cluster as c_int,
            CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH => cluster[0] as c_int,
            CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT => cluster[1] as c_int,
            CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_DEPTH => cluster[2] as c_int,
            CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED => f.non_portable_cluster as c_int,
            CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE => f.cluster_scheduling_policy,
            other => fail!(CUDA_ERROR_INVALID_VALUE, "function attribute {other} does not exist"),
        };
        // SAFETY: the caller provides storage for one int.
        unsafe { write_out(pi, value) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(hfunc: CUfunction, attrib: c_uint, value: c_int) -> CUresult {
    entry("cuFuncSetAttribute", || {
        let mut d = driver();
        let f = d.function_mut(hfunc as usize)?;
        match attrib {
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES => {
                let limit =
                    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN - f.info.static_smem_bytes.min(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
                if value < 0 || value as u32 > limit {
                    fail!(
                        CUDA_ERROR_INVALID_VALUE,
                        "{}: {value} bytes of dynamic shared memory plus {} static exceed the {} a block may opt into",
                        f.name,
                        f.info.static_smem_bytes,
                        MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
                    );
                }
                f.max_dynamic_smem = value as u32;
            }
            CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT if (-1..=100).contains(&value) => f.carveout = value,
            CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED if (0..=1).contains(&value) => {
                f.non_portable_cluster = value == 1
            }
            CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE if (0..=2).contains(&value) => {
                f.cluster_scheduling_policy = value
            }
            CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
            | CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
            | CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE => {
                fail!(CUDA_ERROR_INVALID_VALUE, "value {value} is out of range for function attribute {attrib}")
            }
            other => fail!(CUDA_ERROR_INVALID_VALUE, "function attribute {other} cannot be set"),
        }
        Ok(())
    })
}

/// The L1/shared split is a hint with no effect on results.
#[no_mangle]
pub unsafe extern "C" fn cuFuncSetCacheConfig(hfunc: CUfunction, config: c_uint) -> CUresult {
    entry("cuFuncSetCacheConfig", || {
        if config > 3 {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        driver().function(hfunc as usize).map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_limit_follows_launch_bounds_and_registers() {
        let mut info = KernelInfo { max_threads: Some(384), registers: Some(168), ..Default::default() };
        assert_eq!(max_threads_per_block(&info), 384);
        info.max_threads = None;
        // 168 registers · 32 lanes = 5376 per warp; 65536 / 5376 = 12 warps.
        assert_eq!(max_threads_per_block(&info), 384);
        info.registers = Some(32);
        assert_eq!(max_threads_per_block(&info), 1024);
        info.registers = Some(255);
        assert_eq!(max_threads_per_block(&info), 256);
    }

    #[test]
    fn parameter_signatures_must_agree() {
        let info = KernelInfo {
            params: vec![
                crate::cubin::ParamSlot { offset: 0, size: 8 },
                crate::cubin::ParamSlot { offset: 8, size: 4 },
            ],
            param_bytes: 12,
            ..Default::default()
        };
        assert_eq!(&*checked_param_sizes("k", &info, vec![8, 4]).unwrap(), &[8, 4]);
        assert_eq!(checked_param_sizes("k", &info, vec![8, 8]).unwrap_err().code, CUDA_ERROR_INVALID_IMAGE);
        // A cubin without a recorded layout defers to the engine.
        let unknown = KernelInfo { param_bytes: 12, ..Default::default() };
        assert_eq!(&*checked_param_sizes("k", &unknown, vec![8, 4]).unwrap(), &[8, 4]);
    }
}
