//! Thin typed tensors: a buffer plus its shape, so launchers check shapes instead of trusting lengths.
//!
//! Tensors are dense and row-major. A zero-sized tensor is valid (its device buffer holds one unused element, since
//! the driver refuses zero-byte allocations).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};

use crate::device::Gpu;
use crate::error::{CudaCall, Error, Result};

fn numel(shape: &[usize]) -> Result<usize> {
    if shape.len() > crate::view::MAX_RANK {
        return Err(Error::shape("shape", format!("a rank ≤ {} shape", crate::view::MAX_RANK), format!("{shape:?}")));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::shape("shape", "a size that fits in usize", format!("{shape:?}")))
}

/// A host tensor: a `Vec<T>` and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor<T> {
    data: Vec<T>,
    shape: Vec<usize>,
}

impl<T> HostTensor<T> {
    /// Wraps `data` with `shape`; errors when the lengths disagree.
    pub fn new(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        let n = numel(shape)?;
        if data.len() != n {
            return Err(Error::shape("data", format!("{n} elements for shape {shape:?}"), data.len()));
        }
        Ok(HostTensor { data, shape: shape.to_vec() })
    }
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The elements, row-major.
    pub fn data(&self) -> &[T] {
        &self.data
    }
    /// Mutable elements.
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
    /// Unwraps the elements.
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }
}

/// A device tensor: a `CudaSlice<T>` and its shape.
#[derive(Debug)]
pub struct DeviceTensor<T> {
    data: CudaSlice<T>,
    shape: Vec<usize>,
    numel: usize,
}

impl<T: DeviceRepr> DeviceTensor<T> {
    /// Copies `data` (row-major, `shape`) to the device, enqueued on the GPU's stream.
    pub fn from_host(gpu: &Gpu, data: &[T], shape: &[usize]) -> Result<Self> {
        let n = numel(shape)?;
        if data.len() != n {
            return Err(Error::shape("data", format!("{n} elements for shape {shape:?}"), data.len()));
        }
        let stream = gpu.stream();
        let buffer = if n == 0 {
            // SAFETY: the single element is never read: every access is bounded by `numel`, which is 0.
            unsafe { stream.alloc::<T>(1) }.cuda_call("cuMemAllocAsync")?
        } else {
            stream.clone_htod(data).cuda_call("cuMemcpyHtoDAsync")?
        };
        Ok(DeviceTensor { data: buffer, shape: shape.to_vec(), numel: n })
    }

    /// Allocates without initializing. The contents are unspecified until a kernel writes them.
    ///
    /// # Safety
    /// The caller must write every element before reading it back (reading returns whatever the allocator left).
    pub unsafe fn uninit(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        let n = numel(shape)?;
        let buffer = unsafe { gpu.stream().alloc::<T>(n.max(1)) }.cuda_call("cuMemAllocAsync")?;
        Ok(DeviceTensor { data: buffer, shape: shape.to_vec(), numel: n })
    }

    /// Copies the tensor back to the host. This synchronizes the GPU's stream.
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<T>>
    where
        T: Clone + Default,
    {
        if self.numel == 0 {
            return Ok(Vec::new());
        }
        gpu.stream().clone_dtoh(&self.data.slice(0..self.numel)).cuda_call("cuMemcpyDtoHAsync")
    }

    /// Overwrites the whole tensor with `data` (e.g. to poison an output before a test launch).
    pub fn copy_from_host(&mut self, gpu: &Gpu, data: &[T]) -> Result<()> {
        if data.len() != self.numel {
            return Err(Error::shape("data", self.numel, data.len()));
        }
        if self.numel > 0 {
            gpu.stream().memcpy_htod(data, &mut self.data.slice_mut(0..self.numel)).cuda_call("cuMemcpyHtoDAsync")?;
        }
        Ok(())
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// A view over exactly the tensor's elements.
    pub fn view(&self) -> CudaView<'_, T> {
        self.data.slice(0..self.numel)
    }
    /// A mutable view over exactly the tensor's elements.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.data.slice_mut(0..self.numel)
    }
    /// The ordinal of the device this tensor's memory lives on.
    pub fn device_ordinal(&self) -> usize {
        self.data.ordinal()
    }
    /// The underlying buffer: at least [`Self::numel`] elements (one unused element when the tensor is empty).
    pub fn buffer(&self) -> &CudaSlice<T> {
        &self.data
    }
    /// The underlying buffer, mutably. Crate-internal: handing it out would let safe code swap in a shorter buffer
    /// behind the shape that launchers trust. Users write through [`Self::view_mut`], which covers exactly the
    /// tensor's elements.
    pub(crate) fn buffer_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }

    /// Wraps a cudarc allocation the caller already owns (for example an engine's own buffer, or one made through
    /// the re-exported [`crate::cudarc`]) as a tensor of `shape`, without copying. The slice may be longer than the
    /// shape needs; the tensor covers its first `numel` elements. Errors when it is shorter or its address is not
    /// 16-byte aligned. To borrow instead of taking ownership, see [`crate::TensorRef::from_cuda_slice`].
    pub fn from_cuda_slice(data: CudaSlice<T>, shape: &[usize]) -> Result<Self> {
        let n = numel(shape)?;
        if data.len() < n.max(1) {
            return Err(Error::shape(
                "data",
                format!("at least {} elements for shape {shape:?}", n.max(1)),
                data.len(),
            ));
        }
        // Views of a tensor assume its first element 16-byte aligned; an allocation made with cudarc is, but a
        // slice upgraded from a foreign pointer may not be.
        let addr = crate::view::slice_addr(&data);
        if !addr.is_multiple_of(crate::view::VIEW_ALIGN as u64) {
            return Err(Error::Alignment { arg: "data", required: crate::view::VIEW_ALIGN, got: (addr % 16) as usize });
        }
        Ok(DeviceTensor { data, shape: shape.to_vec(), numel: n })
    }

    /// Unwraps the allocation (at least [`Self::numel`] elements), e.g. to hand an output back to an engine.
    pub fn into_cuda_slice(self) -> CudaSlice<T> {
        self.data
    }

    /// Checks that the shape is exactly `expected`.
    pub fn expect_shape(&self, arg: &'static str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::shape(arg, format!("{expected:?}"), format!("{:?}", self.shape)));
        }
        Ok(())
    }

    /// Checks the rank and returns the dimensions.
    pub fn dims<const N: usize>(&self, arg: &'static str) -> Result<[usize; N]> {
        self.shape
            .as_slice()
            .try_into()
            .map_err(|_| Error::shape(arg, format!("a rank-{N} tensor"), format!("{:?}", self.shape)))
    }

    /// Changes the shape in place (same element count), e.g. to view a GEMM's [m, h·d] output as [m, h, d].
    pub fn set_shape(&mut self, shape: &[usize]) -> Result<()> {
        let n = numel(shape)?;
        if n != self.numel {
            return Err(Error::shape("set_shape", format!("{} elements", self.numel), format!("{shape:?}")));
        }
        self.shape = shape.to_vec();
        Ok(())
    }

    /// Reinterprets with a new shape of the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n = numel(shape)?;
        if n != self.numel {
            return Err(Error::shape("reshape", format!("{} elements", self.numel), format!("{shape:?}")));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> DeviceTensor<T> {
    /// A zero-filled tensor.
    pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        let n = numel(shape)?;
        let buffer = gpu.stream().alloc_zeros::<T>(n.max(1)).cuda_call("cuMemAllocAsync")?;
        Ok(DeviceTensor { data: buffer, shape: shape.to_vec(), numel: n })
    }
}
