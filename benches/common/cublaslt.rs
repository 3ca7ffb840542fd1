//! cuBLASLt block-scaled FP8 GEMM, the peer several benches compare against: row-major D[m, n] (bf16) =
//! A[m, k]·B[n, k]ᵀ with 1×128 activation scales on A and 128×128 block scales on B (scale modes `VEC128_32F` = 4 and
//! `BLK128x128_32F` = 5 of `cublasLtMatmulMatrixScale_t`, CUDA 12.9+, set through the raw attribute API since the
//! crate's cuda-12080 bindings lack those enum values). Scales are in the crate's layouts: A's MN-major
//! `[ceil(k/128), round_up(m, 4)]`, B's row-major `[ceil(n/128), ceil(k/128)]`.
//!
//! Every failure (library missing, layout rejected, no algorithm) is an `Err` with a reason, never a panic, so a
//! bench can print "skipped" and carry on. Included by several benches with `#[path]`; not every bench uses every
//! item, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::sys::cublasLtMatmulAlgo_t;
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use r1_kernels::{bf16, DeviceTensor, Gpu, E4M3};

const LT_WORKSPACE: usize = 32 << 20;
const SCALE_MODE_VEC128_32F: i32 = 4;
const SCALE_MODE_BLK128X128_32F: i32 = 5;

fn err(e: lt::CublasError) -> String {
    format!("{e:?}")
}

/// Whether libcublasLt can be loaded (cudarc panics on the first call when it cannot, so check first).
pub fn lt_present() -> bool {
    // SAFETY: only dlopens the library.
    unsafe { ltsys::is_culib_present() }
}

/// cuBLASLt reads BLK128x128 scales with the K-block dimension leading and padded to a multiple of 4; the crate's
/// weight scales are `[ceil(n/128), ceil(k/128)]` unpadded, so only when ceil(k/128) % 4 == 0 do the two layouts
/// coincide (otherwise the library would read past the end of the scales).
pub fn check_scale_k(k: usize) -> Result<(), String> {
    if !k.div_ceil(128).is_multiple_of(4) {
        return Err(format!("ceil(k/128) = {} is not a multiple of 4 (cuBLASLt's scale layout)", k.div_ceil(128)));
    }
    Ok(())
}

/// A cuBLASLt handle and workspace on the GPU's stream, shared by any number of [`LtFp8Gemm`]s (they run in stream
/// order, so one workspace suffices).
pub struct LtContext {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

impl LtContext {
    pub fn new(gpu: &Gpu) -> Result<Self, String> {
        if !lt_present() {
            return Err("libcublasLt not found".into());
        }
        let stream = gpu.stream().clone();
        let workspace = stream.alloc_zeros::<u8>(LT_WORKSPACE).map_err(|e| format!("{e:?}"))?;
        let handle = lt::create_handle().map_err(err)?;
        Ok(LtContext { handle, workspace, stream })
    }
}

impl Drop for LtContext {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// One block-scaled FP8 GEMM shape: row-major D[m, n] = A[m, k]·B[n, k]ᵀ computed as column-major Dᵀ = op(B)·op(A)
/// with op = T on B (the "TN" layout FP8 requires). B (the weights) gets 128×128 block scales, A 1×128 scales.
pub struct LtFp8Gemm {
    desc: ltsys::cublasLtMatmulDesc_t,
    layouts: [ltsys::cublasLtMatrixLayout_t; 3],
    algo: ltsys::cublasLtMatmulAlgo_t,
    m: usize,
    n: usize,
    k: usize,
}

impl LtFp8Gemm {
    /// Builds the descriptors and asks the heuristic for an algorithm. `sa` / `sb` are the scales the first run will
    /// use (the heuristic is queried with the scale pointers already set, as a real caller would).
    pub fn new(
        ctx: &LtContext,
        m: usize,
        n: usize,
        k: usize,
        sa: &impl DevicePtr<f32>,
        sb: &impl DevicePtr<f32>,
    ) -> Result<Self, String> {
        check_scale_k(k)?;
        if m == 0 || n == 0 || k == 0 {
            return Err(format!("empty GEMM {m}x{n}x{k}"));
        }
        let desc =
            lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, ltsys::cudaDataType::CUDA_R_32F)
                .map_err(err)?;
        // From here on `g` owns every descriptor created, so an early return destroys them.
        let mut g = LtFp8Gemm {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: cublasLtMatmulAlgo_t { data: [0; 8] },
            m,
            n,
            k,
        };
        let set = |attr: ltsys::cublasLtMatmulDescAttributes_t, ptr: *const c_void, size: usize| {
            // SAFETY: `ptr` points to a live value of `size` bytes of the type the attribute expects.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, ptr, size) }.map_err(err)
        };
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        let (t, nop) =
            (cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T, cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N);
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, &t as *const _ as *const c_void, std::mem::size_of_val(&t))?;
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, &nop as *const _ as *const c_void, std::mem::size_of_val(&nop))?;
        set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &SCALE_MODE_BLK128X128_32F as *const i32 as *const c_void, 4)?;
        set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &SCALE_MODE_VEC128_32F as *const i32 as *const c_void, 4)?;
        g.set_scales(&ctx.stream, sa, sb)?;
        let e4m3 = ltsys::cudaDataType::CUDA_R_8F_E4M3;
        g.layouts[0] = lt::create_matrix_layout(e4m3, k as u64, n as u64, k as i64).map_err(err)?;
        g.layouts[1] = lt::create_matrix_layout(e4m3, k as u64, m as u64, k as i64).map_err(err)?;
        g.layouts[2] =
            lt::create_matrix_layout(ltsys::cudaDataType::CUDA_R_16BF, n as u64, m as u64, n as i64).map_err(err)?;
        let pref = lt::create_matmul_pref().map_err(err)?;
        let ws = LT_WORKSPACE as u64;
        // SAFETY: the attribute is a u64 byte count.
        let r = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
        };
        let [la, lb, ld] = g.layouts;
        // SAFETY: all descriptors were created above and are valid.
        let heur = r.and_then(|()| unsafe { lt::get_matmul_algo_heuristic(ctx.handle, desc, la, lb, ld, ld, pref) });
        // SAFETY: created above, not used afterwards.
        unsafe { lt::destroy_matmul_pref(pref) }.map_err(err)?;
        let heur = heur.map_err(|e| format!("no cuBLASLt algorithm for block-scaled FP8: {e:?}"))?;
        g.algo = heur.algo;
        Ok(g)
    }

    /// (m, n, k).
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.m, self.n, self.k)
    }

    fn set_scales(
        &mut self,
        stream: &Arc<CudaStream>,
        sa: &impl DevicePtr<f32>,
        sb: &impl DevicePtr<f32>,
    ) -> Result<(), String> {
        let (m, n, k) = (self.m, self.n, self.k);
        let (sa_len, sb_len) = (k.div_ceil(128) * m.div_ceil(4) * 4, n.div_ceil(128) * k.div_ceil(128));
        if sa.len() < sa_len || sb.len() < sb_len {
            return Err(format!(
                "scales too short for {m}x{n}x{k}: a {} < {sa_len} or b {} < {sb_len}",
                sa.len(),
                sb.len()
            ));
        }
        let (psb, psa) = {
            let (p1, _g1) = sb.device_ptr(stream);
            let (p2, _g2) = sa.device_ptr(stream);
            (p1, p2)
        };
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        for (attr, p) in
            [(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, psb), (A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, psa)]
        {
            // SAFETY: the attribute is a device pointer (8 bytes) and `p` lives through the call.
            unsafe { lt::set_matmul_desc_attribute(self.desc, attr, &p as *const u64 as *const c_void, 8) }
                .map_err(err)?;
        }
        Ok(())
    }

    /// Enqueues D = A·Bᵀ on the context's stream. `a` [m, k] codes with scales `sa`, `b` [n, k] with `sb`, `d` [m, n]
    /// (each at least that long). The scale pointers are set on every call (a host-only attribute write), so one
    /// descriptor can serve buffers that change between calls.
    pub fn run(
        &mut self,
        ctx: &mut LtContext,
        a: &impl DevicePtr<E4M3>,
        sa: &impl DevicePtr<f32>,
        b: &impl DevicePtr<E4M3>,
        sb: &impl DevicePtr<f32>,
        d: &mut impl DevicePtrMut<bf16>,
    ) -> r1_kernels::Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        if a.len() < m * k || b.len() < n * k || d.len() < m * n {
            return Err(r1_kernels::Error::InvalidConfig(format!(
                "cuBLASLt {m}x{n}x{k}: buffers too short (a {}, b {}, d {})",
                a.len(),
                b.len(),
                d.len()
            )));
        }
        let stream = ctx.stream.clone();
        self.set_scales(&stream, sa, sb)
            .map_err(|message| r1_kernels::Error::CudaLibrary { call: "cublasLtMatmulDescSetAttribute", message })?;
        let (alpha, beta) = (1f32, 0f32);
        let (pa, _g1) = a.device_ptr(&stream);
        let (pb, _g2) = b.device_ptr(&stream);
        let (pd, _g3) = d.device_ptr_mut(&stream);
        let (pw, _g4) = ctx.workspace.device_ptr_mut(&stream);
        let [la, lb, ld] = self.layouts;
        // SAFETY: layouts describe exactly the buffers passed (B as the k×n "A" operand, A as the k×m "B" operand,
        // D n×m column-major = row-major [m, n]), all checked long enough above, as were the scales; the workspace
        // has LT_WORKSPACE bytes.
        unsafe {
            lt::matmul(
                ctx.handle,
                self.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                pb as *const c_void,
                la,
                pa as *const c_void,
                lb,
                pd as *const c_void,
                ld,
                pd as *mut c_void,
                ld,
                &self.algo,
                pw as *mut c_void,
                LT_WORKSPACE,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| r1_kernels::Error::CudaLibrary { call: "cublasLtMatmul", message: format!("{:?}", e.0) })
    }
}

impl Drop for LtFp8Gemm {
    fn drop(&mut self) {
        // SAFETY: created in `new` (null entries were never created), destroyed once.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// One shape with its own handle and workspace: the single-GEMM peer of the FP8 GEMM bench.
pub struct LtFp8 {
    gemm: LtFp8Gemm,
    ctx: LtContext,
}

impl LtFp8 {
    pub fn new(
        gpu: &Gpu,
        m: usize,
        n: usize,
        k: usize,
        sa: &DeviceTensor<f32>,
        sb: &DeviceTensor<f32>,
    ) -> Result<Self, String> {
        // Same order of checks (and so the same skip reason) as before this wrapper was shared.
        if !lt_present() {
            return Err("libcublasLt not found".into());
        }
        check_scale_k(k)?;
        let ctx = LtContext::new(gpu)?;
        let gemm = LtFp8Gemm::new(&ctx, m, n, k, sa.buffer(), sb.buffer())?;
        Ok(LtFp8 { gemm, ctx })
    }

    pub fn run(
        &mut self,
        a: &DeviceTensor<E4M3>,
        sa: &DeviceTensor<f32>,
        b: &DeviceTensor<E4M3>,
        sb: &DeviceTensor<f32>,
        d: &mut CudaSlice<bf16>,
    ) -> r1_kernels::Result<()> {
        self.gemm.run(&mut self.ctx, a.buffer(), sa.buffer(), b.buffer(), sb.buffer(), d)
    }
}
