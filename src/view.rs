//! Borrowed device tensors: [`TensorRef`] (read) and [`TensorMut`] (write), the form every launcher takes.
//!
//! A view is a device pointer, the number of elements it may address, the ordinal of the device that memory lives
//! on, a row-major shape of rank ≤ [`MAX_RANK`] and a row stride (the distance, in elements, between consecutive
//! rows of the last dimension; every dimension above the rows is dense over them). It is made
//!
//! - from a [`DeviceTensor`] ([`DeviceTensor::as_tensor_ref`], or `&tensor` wherever a launcher takes
//!   `impl Into<TensorRef>`),
//! - from cudarc memory the caller owns ([`TensorRef::from_cuda_slice`], [`TensorMut::from_cuda_slice`]; a part of
//!   it through [`TensorRef::narrow`]), keeping cudarc's cross-stream event tracking for it,
//! - or, `unsafe`ly, from a raw device pointer ([`TensorRef::from_raw`]) for memory of another allocator or another
//!   cudarc version.
//!
//! Every constructor checks, before any launch can see the view: the shape's element count fits, the rows the shape
//! and row stride reach lie inside the memory, the first element sits on a 16-byte boundary and a row stride that
//! is not the row length is a multiple of 16 bytes (the kernels' vector loads and TMA need both). Launchers then check
//! the device ordinal, the shape, and whether they accept a row stride: most kernels read dense rows and refuse a
//! strided view with [`Error::Shape`] instead of reading the wrong elements.
//!
//! [`TensorRef::narrow`] / [`TensorMut::narrow`] select a range of one dimension without copying: a layer's part of a
//! pooled KV cache, a micro-batch of a batch, or the columns of a fused projection (a narrowed last dimension gives
//! a strided view).

use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchArgs, PushKernelArg, SyncOnDrop};

use crate::error::{Error, Result};
use crate::tensor::DeviceTensor;

/// The highest rank a view may have.
pub const MAX_RANK: usize = 6;

/// Byte alignment every view's first element and every non-dense row stride must have.
pub const VIEW_ALIGN: usize = 16;

/// The modulus of the address bits a layout tracks (all its checks need).
const ADDR_MOD: u64 = VIEW_ALIGN as u64;

/// Shape, strides and extent of a view: everything but the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    dims: [usize; MAX_RANK],
    rank: usize,
    numel: usize,
    row_stride: usize,
    /// Elements addressable from the first one.
    len: usize,
    /// The first element's address modulo [`ADDR_MOD`].
    addr_low: u64,
    ordinal: usize,
}

impl Layout {
    fn new(
        arg: &'static str,
        shape: &[usize],
        row_stride: Option<usize>,
        len: usize,
        addr_low: u64,
        ordinal: usize,
        elem_bytes: usize,
    ) -> Result<Self> {
        if shape.len() > MAX_RANK {
            return Err(Error::shape(arg, format!("a rank ≤ {MAX_RANK} shape"), format!("{shape:?}")));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::shape(arg, "a size that fits in usize", format!("{shape:?}")))?;
        let cols = shape.last().copied().unwrap_or(1);
        let row_stride = match row_stride {
            None => cols,
            Some(s) => {
                if shape.len() < 2 && s != cols {
                    return Err(Error::shape(arg, "a row stride only for rank ≥ 2", format!("{shape:?}")));
                }
                if s < cols {
                    return Err(Error::shape(arg, format!("a row stride ≥ the row length {cols}"), s));
                }
                s
            }
        };
        let mut dims = [0usize; MAX_RANK];
        dims[..shape.len()].copy_from_slice(shape);
        let layout = Layout { dims, rank: shape.len(), numel, row_stride, len, addr_low, ordinal };
        let extent =
            layout.extent().ok_or_else(|| Error::shape(arg, "a row stride whose extent fits in usize", row_stride))?;
        if extent > len {
            return Err(Error::shape(
                arg,
                format!("memory for {extent} elements (shape {shape:?}, row stride {row_stride})"),
                format!("{len} elements"),
            ));
        }
        layout.check_alignment(arg, elem_bytes)?;
        Ok(layout)
    }

    /// A layout over `len` elements at raw address `ptr` (refused when null).
    fn raw(
        ptr: u64,
        len: usize,
        ordinal: usize,
        shape: &[usize],
        row_stride: Option<usize>,
        elem_bytes: usize,
    ) -> Result<Self> {
        if ptr == 0 {
            return Err(Error::shape("ptr", "a device address", "null"));
        }
        Layout::new("raw", shape, row_stride, len, addr_low_of(ptr), ordinal, elem_bytes)
    }

    /// A layout over a cudarc allocation (its address read once, for the alignment check).
    fn of_slice<T>(slice: &CudaSlice<T>, shape: &[usize], row_stride: Option<usize>) -> Result<Self> {
        let addr = addr_low_of(slice_addr(slice));
        Layout::new("slice", shape, row_stride, slice.len(), addr, slice.ordinal(), size_of::<T>())
    }

    /// Another shape and row stride over the same memory, from the same first element.
    fn reshaped(&self, arg: &'static str, shape: &[usize], row_stride: Option<usize>, elem: usize) -> Result<Self> {
        Layout::new(arg, shape, row_stride, self.len, self.addr_low, self.ordinal, elem)
    }

    fn shape(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    fn cols(&self) -> usize {
        self.shape().last().copied().unwrap_or(1)
    }

    /// Rows of the last dimension (the product of all leading dimensions).
    fn rows(&self) -> usize {
        if self.rank == 0 {
            1
        } else {
            self.dims[..self.rank - 1].iter().product()
        }
    }

    /// Elements from the first to one past the last that the view reaches.
    fn extent(&self) -> Option<usize> {
        if self.numel == 0 {
            return Some(0);
        }
        (self.rows() - 1).checked_mul(self.row_stride)?.checked_add(self.cols())
    }

    fn is_dense(&self) -> bool {
        self.row_stride == self.cols() || self.rows() <= 1
    }

    fn check_alignment(&self, arg: &'static str, elem_bytes: usize) -> Result<()> {
        if !self.addr_low.is_multiple_of(VIEW_ALIGN as u64) {
            return Err(Error::Alignment { arg, required: VIEW_ALIGN, got: self.addr_low as usize });
        }
        let stride_bytes = self.row_stride.saturating_mul(elem_bytes);
        if !self.is_dense() && !stride_bytes.is_multiple_of(VIEW_ALIGN) {
            return Err(Error::Alignment { arg, required: VIEW_ALIGN, got: stride_bytes });
        }
        Ok(())
    }

    /// The layout of `range` of dimension `dim`, and the element offset of its first element.
    fn narrow(&self, dim: usize, range: Range<usize>, elem_bytes: usize) -> Result<(Layout, usize)> {
        if dim >= self.rank {
            return Err(Error::shape("narrow", format!("a dimension below rank {}", self.rank), dim));
        }
        if range.start > range.end || range.end > self.dims[dim] {
            return Err(Error::shape(
                "narrow",
                format!("a range inside 0..{} of dimension {dim}", self.dims[dim]),
                format!("{range:?}"),
            ));
        }
        let last = self.rank - 1;
        // Above the rows a view is dense, so a part of a middle dimension is one only when nothing above it repeats.
        let outer: usize = self.dims[..dim].iter().product();
        if dim != last && outer > 1 && range.end - range.start != self.dims[dim] {
            return Err(Error::shape(
                "narrow",
                format!(
                    "a part of dimension {dim} only when the dimensions above it are 1 (a view has one row stride)"
                ),
                format!("{:?} of shape {:?}", range, self.shape()),
            ));
        }
        // Elements between consecutive indices of `dim`: the row stride for the last dimension's rows, times the
        // rows under it.
        let step = if dim == last { 1 } else { self.row_stride * self.dims[dim + 1..last].iter().product::<usize>() };
        let mut dims = self.dims;
        dims[dim] = range.end - range.start;
        // An empty part has no element to place: it stays at the view's start (so it is never misaligned).
        let empty = dims[..self.rank].contains(&0);
        let offset = if empty { 0 } else { range.start * step };
        let shape = &dims[..self.rank];
        // A narrowed last dimension keeps the row stride; narrowing a leading one keeps it too.
        let addr_low = (self.addr_low + (offset as u64 % ADDR_MOD) * elem_bytes as u64) % ADDR_MOD;
        let stride = if self.rank >= 2 { Some(self.row_stride) } else { None };
        let layout =
            Layout::new("narrow", shape, stride, self.len - offset.min(self.len), addr_low, self.ordinal, elem_bytes)?;
        Ok((layout, offset))
    }
}

fn addr_low_of(ptr: u64) -> u64 {
    ptr % ADDR_MOD
}

/// The device address of a cudarc allocation (cudarc exposes it only with its event bookkeeping).
pub(crate) fn slice_addr<T>(slice: &CudaSlice<T>) -> u64 {
    let stream = slice.stream().clone();
    let (ptr, _sync) = slice.device_ptr(&stream);
    ptr
}

/// A device pointer pushed as a kernel argument, holding cudarc's event guard (when the memory is cudarc's) until
/// the launch has been enqueued.
#[doc(hidden)]
#[derive(Debug)]
pub struct KernelPtr<'s> {
    ptr: u64,
    _sync: Option<SyncOnDrop<'s>>,
}

impl KernelPtr<'_> {
    /// The device address.
    pub fn addr(&self) -> u64 {
        self.ptr
    }
}

// SAFETY: pushes the address of a `u64` that lives as long as the borrow, exactly as cudarc's impl for `&u64`.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b KernelPtr<'_>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b KernelPtr<'_>) -> &mut Self {
        self.arg(&arg.ptr)
    }
}

// SAFETY: as above.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b mut KernelPtr<'_>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut KernelPtr<'_>) -> &mut Self {
        self.arg(&arg.ptr)
    }
}

enum RefSource<'a, T> {
    Slice(&'a CudaSlice<T>),
    Raw { ptr: u64, _p: PhantomData<&'a [T]> },
}

impl<T> Clone for RefSource<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for RefSource<'_, T> {}

/// A borrowed, read-only device tensor: see the [module docs](self). `Copy`, like `&T`.
pub struct TensorRef<'a, T> {
    source: RefSource<'a, T>,
    /// Elements from the source's first element to the view's.
    offset: usize,
    layout: Layout,
}

enum MutSource<'a, T> {
    Slice(&'a mut CudaSlice<T>),
    Raw { ptr: u64, _p: PhantomData<&'a mut [T]> },
}

/// A borrowed, writable device tensor: see the [module docs](self).
pub struct TensorMut<'a, T> {
    source: MutSource<'a, T>,
    /// Elements from the source's first element to the view's.
    offset: usize,
    layout: Layout,
}

impl<T> std::fmt::Debug for TensorRef<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorRef")
            .field("shape", &self.layout.shape())
            .field("row_stride", &self.layout.row_stride)
            .field("device", &self.layout.ordinal)
            .finish()
    }
}

impl<T> std::fmt::Debug for TensorMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorMut")
            .field("shape", &self.layout.shape())
            .field("row_stride", &self.layout.row_stride)
            .field("device", &self.layout.ordinal)
            .finish()
    }
}

impl<T> Clone for TensorRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for TensorRef<'_, T> {}

/// Accessors and reshaping shared by both view types (the same fields, the same rules).
macro_rules! view_methods {
    () => {
        /// The shape.
        pub fn shape(&self) -> &[usize] {
            self.layout.shape()
        }
        /// Number of elements the shape holds.
        pub fn numel(&self) -> usize {
            self.layout.numel
        }
        /// Number of dimensions.
        pub fn rank(&self) -> usize {
            self.layout.rank
        }
        /// Elements between consecutive rows of the last dimension.
        pub fn row_stride(&self) -> usize {
            self.layout.row_stride
        }
        /// True when the rows follow each other with no gap (row stride = row length, or at most one row).
        pub fn is_dense(&self) -> bool {
            self.layout.is_dense()
        }
        /// The ordinal of the device the memory lives on.
        pub fn device_ordinal(&self) -> usize {
            self.layout.ordinal
        }
        /// Checks that the shape is exactly `expected`.
        pub fn expect_shape(&self, arg: &'static str, expected: &[usize]) -> Result<()> {
            if self.shape() != expected {
                return Err(Error::shape(arg, format!("{expected:?}"), format!("{:?}", self.shape())));
            }
            Ok(())
        }
        /// Checks the rank and returns the dimensions.
        pub fn dims<const N: usize>(&self, arg: &'static str) -> Result<[usize; N]> {
            self.shape()
                .try_into()
                .map_err(|_| Error::shape(arg, format!("a rank-{N} tensor"), format!("{:?}", self.shape())))
        }
        /// The part of the view whose index along `dim` lies in `range` (no copy). Errors when the range leaves the
        /// dimension, when it is a part of a middle dimension under a repeated one (a view has one row stride), or
        /// when the part's first element is not 16-byte aligned.
        pub fn narrow(self, dim: usize, range: Range<usize>) -> Result<Self> {
            let (layout, offset) = self.layout.narrow(dim, range, size_of::<T>())?;
            Ok(Self { source: self.source, offset: self.offset + offset, layout })
        }

        /// `shape` with rows `row_stride` elements apart (dense when `None`) over the same memory, e.g. `[rows,
        /// width]` columns of a wider buffer whose rows are `row_stride` long.
        pub fn with_shape(self, shape: &[usize], row_stride: Option<usize>) -> Result<Self> {
            let layout = self.layout.reshaped("with_shape", shape, row_stride, size_of::<T>())?;
            Ok(Self { source: self.source, offset: self.offset, layout })
        }

        /// The same memory with another shape of the same element count (dense views only).
        pub fn reshape(self, shape: &[usize]) -> Result<Self> {
            self.require_dense("reshape")?;
            let layout = self.layout.reshaped("reshape", shape, None, size_of::<T>())?;
            if layout.numel != self.layout.numel {
                return Err(Error::shape("reshape", format!("{} elements", self.layout.numel), format!("{shape:?}")));
            }
            Ok(Self { source: self.source, offset: self.offset, layout })
        }

        /// Errors unless the view is dense (what kernels that read whole rows back to back need).
        pub fn require_dense(&self, arg: &'static str) -> Result<()> {
            if !self.is_dense() {
                return Err(Error::shape(
                    arg,
                    format!("a dense view (row stride {})", self.layout.cols()),
                    format!("row stride {}", self.layout.row_stride),
                ));
            }
            Ok(())
        }
    };
}

impl<'a, T> TensorRef<'a, T> {
    view_methods!();

    /// A view of `shape` (rows `row_stride` elements apart, dense when `None`) over the first elements of a
    /// cudarc allocation, e.g. an engine's buffer (candle's `CudaStorage::as_cuda_slice`); [`Self::narrow`] selects
    /// a part that does not start at the first element. The slice's address is read once here to check its
    /// alignment (while cudarc tracks events, that waits for its last write and records a read on its own stream).
    pub fn from_cuda_slice(slice: &'a CudaSlice<T>, shape: &[usize], row_stride: Option<usize>) -> Result<Self> {
        let layout = Layout::of_slice(slice, shape, row_stride)?;
        Ok(TensorRef { source: RefSource::Slice(slice), offset: 0, layout })
    }

    /// A view of `shape` (rows `row_stride` elements apart) over `len` elements at device address `ptr` on device
    /// `ordinal`: memory of another allocator or another cudarc version.
    ///
    /// # Safety
    /// `ptr .. ptr + len·size_of::<T>()` must lie in one live allocation in the primary context of device
    /// `ordinal`, hold initialized values of `T`, and stay allocated and unwritten by anyone else until all work
    /// enqueued with this view has completed on the stream (the borrow `'a` only covers enqueueing).
    pub unsafe fn from_raw(
        ptr: u64,
        len: usize,
        ordinal: usize,
        shape: &[usize],
        row_stride: Option<usize>,
    ) -> Result<Self> {
        let layout = Layout::raw(ptr, len, ordinal, shape, row_stride, size_of::<T>())?;
        Ok(TensorRef { source: RefSource::Raw { ptr, _p: PhantomData }, offset: 0, layout })
    }

    /// The device address of the first element as a kernel argument, with cudarc's read tracking for cudarc memory.
    pub(crate) fn kernel_arg<'s>(&'s self, stream: &'s CudaStream) -> KernelPtr<'s> {
        let byte_offset = (self.offset * size_of::<T>()) as u64;
        match &self.source {
            RefSource::Slice(v) => {
                let (ptr, sync) = v.device_ptr(stream);
                KernelPtr { ptr: ptr + byte_offset, _sync: Some(sync) }
            }
            RefSource::Raw { ptr, .. } => KernelPtr { ptr: *ptr + byte_offset, _sync: None },
        }
    }
}

impl<'a, T> TensorMut<'a, T> {
    view_methods!();

    /// A writable view over a cudarc allocation; as [`TensorRef::from_cuda_slice`].
    pub fn from_cuda_slice(slice: &'a mut CudaSlice<T>, shape: &[usize], row_stride: Option<usize>) -> Result<Self> {
        let layout = Layout::of_slice(slice, shape, row_stride)?;
        Ok(TensorMut { source: MutSource::Slice(slice), offset: 0, layout })
    }

    /// A writable view over raw device memory; as [`TensorRef::from_raw`].
    ///
    /// # Safety
    /// As [`TensorRef::from_raw`], and nothing else may read or write the memory while enqueued work uses it.
    pub unsafe fn from_raw(
        ptr: u64,
        len: usize,
        ordinal: usize,
        shape: &[usize],
        row_stride: Option<usize>,
    ) -> Result<Self> {
        let layout = Layout::raw(ptr, len, ordinal, shape, row_stride, size_of::<T>())?;
        Ok(TensorMut { source: MutSource::Raw { ptr, _p: PhantomData }, offset: 0, layout })
    }

    /// A shorter-lived writable view of the same memory, leaving `self` usable afterwards.
    pub fn reborrow(&mut self) -> TensorMut<'_, T> {
        let source = match &mut self.source {
            MutSource::Slice(v) => MutSource::Slice(&mut **v),
            MutSource::Raw { ptr, .. } => MutSource::Raw { ptr: *ptr, _p: PhantomData },
        };
        TensorMut { source, offset: self.offset, layout: self.layout }
    }

    /// A read-only view of the same memory.
    pub fn as_tensor_ref(&self) -> TensorRef<'_, T> {
        let source = match &self.source {
            MutSource::Slice(v) => RefSource::Slice(&**v),
            MutSource::Raw { ptr, .. } => RefSource::Raw { ptr: *ptr, _p: PhantomData },
        };
        TensorRef { source, offset: self.offset, layout: self.layout }
    }

    /// The device address of the first element as a kernel argument, with cudarc's write tracking for cudarc
    /// memory.
    pub(crate) fn kernel_arg<'s>(&'s mut self, stream: &'s CudaStream) -> KernelPtr<'s> {
        let byte_offset = (self.offset * size_of::<T>()) as u64;
        match &mut self.source {
            MutSource::Slice(v) => {
                let (ptr, sync) = v.device_ptr_mut(stream);
                KernelPtr { ptr: ptr + byte_offset, _sync: Some(sync) }
            }
            MutSource::Raw { ptr, .. } => KernelPtr { ptr: *ptr + byte_offset, _sync: None },
        }
    }

    /// Zeroes every element of a dense view (a stream-ordered memset).
    pub(crate) fn memset_zero(&mut self, stream: &CudaStream) -> Result<()> {
        debug_assert!(self.is_dense());
        let bytes = self.layout.numel * size_of::<T>();
        if bytes == 0 {
            return Ok(());
        }
        // The driver call needs the stream's context current on this thread (cudarc's own calls bind it first).
        stream.context().bind_to_thread().map_err(|e| Error::cuda("cuCtxSetCurrent", e))?;
        let p = self.kernel_arg(stream);
        // SAFETY: the view's constructor checked that its `numel` elements (dense) lie inside its memory.
        unsafe { cudarc::driver::result::memset_d8_async(p.ptr, 0, bytes, stream.cu_stream()) }
            .map_err(|e| Error::cuda("cuMemsetD8Async", e))
    }
}

impl<'a, T: cudarc::driver::DeviceRepr> From<&'a DeviceTensor<T>> for TensorRef<'a, T> {
    fn from(t: &'a DeviceTensor<T>) -> Self {
        t.as_tensor_ref()
    }
}

/// `&mut tensor` where a launcher reads: what `&tensor` gives (a `&mut` reference used to coerce to `&` here).
impl<'a, T: cudarc::driver::DeviceRepr> From<&'a mut DeviceTensor<T>> for TensorRef<'a, T> {
    fn from(t: &'a mut DeviceTensor<T>) -> Self {
        t.as_tensor_ref()
    }
}

impl<'a, T: cudarc::driver::DeviceRepr> From<&'a mut DeviceTensor<T>> for TensorMut<'a, T> {
    fn from(t: &'a mut DeviceTensor<T>) -> Self {
        t.as_tensor_mut()
    }
}

impl<'a, T> From<&'a TensorRef<'_, T>> for TensorRef<'a, T> {
    fn from(t: &'a TensorRef<'_, T>) -> Self {
        let source = match t.source {
            RefSource::Slice(v) => RefSource::Slice(v),
            RefSource::Raw { ptr, .. } => RefSource::Raw { ptr, _p: PhantomData },
        };
        TensorRef { source, offset: t.offset, layout: t.layout }
    }
}

impl<'a, T> From<&'a mut TensorMut<'_, T>> for TensorMut<'a, T> {
    fn from(t: &'a mut TensorMut<'_, T>) -> Self {
        t.reborrow()
    }
}

impl<'a, T> From<&'a TensorMut<'_, T>> for TensorRef<'a, T> {
    fn from(t: &'a TensorMut<'_, T>) -> Self {
        t.as_tensor_ref()
    }
}

impl<'a, T> From<TensorMut<'a, T>> for TensorRef<'a, T> {
    fn from(t: TensorMut<'a, T>) -> Self {
        let source = match t.source {
            MutSource::Slice(v) => RefSource::Slice(v),
            MutSource::Raw { ptr, .. } => RefSource::Raw { ptr, _p: PhantomData },
        };
        TensorRef { source, offset: t.offset, layout: t.layout }
    }
}

impl<T: cudarc::driver::DeviceRepr> DeviceTensor<T> {
    /// The layout of the whole tensor. Its constructors keep the rank ≤ [`MAX_RANK`] and the buffer at least
    /// `numel` elements long, and `cuMemAlloc` aligns the buffer, so no check can fail here.
    fn dense_layout(&self) -> Layout {
        let shape = self.shape();
        let rank = shape.len().min(MAX_RANK);
        let mut dims = [0usize; MAX_RANK];
        dims[..rank].copy_from_slice(&shape[..rank]);
        let buffer = self.buffer();
        Layout {
            dims,
            rank,
            numel: self.numel(),
            row_stride: shape.last().copied().unwrap_or(1),
            len: buffer.len(),
            addr_low: 0,
            ordinal: buffer.ordinal(),
        }
    }

    /// A read-only view of the whole tensor (dense).
    pub fn as_tensor_ref(&self) -> TensorRef<'_, T> {
        let layout = self.dense_layout();
        TensorRef { source: RefSource::Slice(self.buffer()), offset: 0, layout }
    }

    /// A writable view of the whole tensor (dense).
    pub fn as_tensor_mut(&mut self) -> TensorMut<'_, T> {
        let layout = self.dense_layout();
        TensorMut { source: MutSource::Slice(self.buffer_mut()), offset: 0, layout }
    }
}

/// "No tensor" for an optional tensor argument (`None` alone leaves the argument's type open):
/// `moe::swiglu_quant(gpu, &h, &mut q, &mut s, format, no_tensor())`.
pub fn no_tensor<'a, T>() -> Option<TensorRef<'a, T>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// A view of raw memory that is never launched: only its layout is exercised.
    fn raw<T>(ptr: u64, len: usize, shape: &[usize], stride: Option<usize>) -> Result<TensorRef<'static, T>> {
        // SAFETY: nothing dereferences the pointer (no launch).
        unsafe { TensorRef::from_raw(ptr, len, 0, shape, stride) }
    }

    #[test]
    fn extent_covers_the_last_row_only_to_its_length() {
        // Rows of 8 floats, 16 apart: the 4th row ends at 3·16 + 8 = 56.
        assert!(raw::<f32>(0x1000, 56, &[4, 8], Some(16)).is_ok());
        assert!(matches!(raw::<f32>(0x1000, 55, &[4, 8], Some(16)), Err(Error::Shape { .. })));
        assert!(raw::<f32>(0x1000, 32, &[2, 2, 8], None).is_ok());
        assert!(raw::<f32>(0x1000, 31, &[2, 2, 8], None).is_err());
        // Leading dimensions are dense over the rows: [2, 2, 8] with stride 16 spans (4 − 1)·16 + 8.
        assert!(raw::<f32>(0x1000, 56, &[2, 2, 8], Some(16)).is_ok());
        // Empty shapes need no memory.
        assert!(raw::<f32>(0x1000, 0, &[0, 8], None).is_ok());
        assert_eq!(raw::<f32>(0x1000, 1, &[], None).unwrap().numel(), 1);
    }

    #[test]
    fn malformed_shapes_and_strides_are_refused() {
        assert!(raw::<f32>(0x1000, 1 << 20, &[1; 7], None).is_err());
        assert!(raw::<u8>(0x1000, usize::MAX, &[usize::MAX, 2], None).is_err());
        assert!(raw::<f32>(0x1000, 64, &[4, 8], Some(7)).is_err());
        assert!(raw::<f32>(0x1000, 64, &[8], Some(16)).is_err());
        assert!(raw::<f32>(0, 64, &[8], None).is_err());
        // A stride whose extent overflows.
        assert!(raw::<u8>(0x1000, usize::MAX, &[3, 1], Some(usize::MAX / 2)).is_err());
    }

    #[test]
    fn alignment_of_the_start_and_of_a_row_stride() {
        assert!(matches!(raw::<f32>(0x1004, 64, &[64], None), Err(Error::Alignment { got: 4, .. })));
        // bf16 rows 12 apart are 24 bytes apart: refused; 16 apart (32 bytes) are fine; dense rows of any length
        // are fine.
        assert!(matches!(raw::<bf16>(0x1000, 64, &[3, 8], Some(12)), Err(Error::Alignment { got: 24, .. })));
        assert!(raw::<bf16>(0x1000, 64, &[3, 8], Some(16)).is_ok());
        assert!(raw::<bf16>(0x1000, 64, &[3, 5], None).is_ok());
    }

    #[test]
    fn narrowing_moves_the_start_and_keeps_the_row_stride() {
        let t = raw::<f32>(0x1000, 80, &[10, 8], None).unwrap();
        let rows = t.narrow(0, 2..5).unwrap();
        assert_eq!((rows.shape(), rows.offset, rows.layout.len), (&[3, 8][..], 16, 64));
        assert!(rows.is_dense());
        let cols = t.narrow(1, 4..8).unwrap();
        assert_eq!((cols.shape(), cols.row_stride(), cols.offset), (&[10, 4][..], 8, 4));
        assert!(!cols.is_dense() && cols.reshape(&[40]).is_err());
        // Narrowing a narrowed view adds up, and the extent is checked again.
        let both = cols.narrow(0, 9..10).unwrap();
        assert_eq!((both.offset, both.layout.len), (4 + 72, 4));
        // 3 floats = 12 bytes: not a 16-byte boundary.
        assert!(matches!(t.narrow(1, 3..5), Err(Error::Alignment { .. })));
        let (start, end) = (4, 3);
        assert!(t.narrow(0, start..end).is_err() && t.narrow(0, 0..11).is_err() && t.narrow(2, 0..1).is_err());
        // An empty range anywhere is a valid empty view, even where a non-empty part would be misaligned.
        assert_eq!(t.narrow(0, 10..10).unwrap().numel(), 0);
        let empty = t.narrow(1, 3..3).unwrap();
        assert_eq!((empty.numel(), empty.offset), (0, 0));
        // A middle dimension steps by whole rows; a part of it is a view only when nothing above it repeats (the
        // rows of [2, 1..3, 16] are not evenly spaced).
        let c = raw::<f32>(0x1000, 96, &[1, 3, 16], None).unwrap().narrow(1, 1..3).unwrap();
        assert_eq!((c.shape(), c.offset, c.layout.extent()), (&[1, 2, 16][..], 16, Some(32)));
        let t3 = raw::<f32>(0x1000, 96, &[2, 3, 16], None).unwrap();
        assert!(matches!(t3.narrow(1, 1..3), Err(Error::Shape { .. })));
        assert_eq!(t3.narrow(1, 0..3).unwrap().shape(), &[2, 3, 16]);
        assert_eq!(t3.narrow(2, 4..8).unwrap().row_stride(), 16);
    }

    #[test]
    fn raw_kernel_arguments_point_at_the_view() {
        let t = raw::<f32>(0x1000, 80, &[10, 8], None).unwrap().narrow(0, 2..5).unwrap();
        match t.source {
            RefSource::Raw { ptr, .. } => assert_eq!(ptr + (t.offset * 4) as u64, 0x1000 + 64),
            RefSource::Slice(_) => unreachable!("made from a raw pointer"),
        }
    }
}
