//! The kernel images embedded by `build.rs`.

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// True when the crate was built with nvcc and embeds its kernels.
pub const KERNELS_BUILT: bool = generated::KERNELS_BUILT;

/// The sm_90a cubin of kernel file `kernels/<module>.cu`.
pub fn cubin(module: &str) -> Option<&'static [u8]> {
    generated::CUBINS.iter().find(|(name, _)| *name == module).map(|(_, bytes)| *bytes)
}

/// The portable compute_80 PTX of `kernels/<module>.cu`, for kernels marked portable.
pub fn ptx(module: &str) -> Option<&'static str> {
    generated::PTX.iter().find(|(name, _)| *name == module).map(|(_, text)| *text)
}

/// ptxas's `-v` report (registers, shared memory, spills) for `kernels/<module>.cu`.
pub fn ptxas_report(module: &str) -> Option<&'static str> {
    generated::PTXAS_REPORTS.iter().find(|(name, _)| *name == module).map(|(_, text)| *text)
}

/// Names of all embedded kernel modules.
pub fn modules() -> impl Iterator<Item = &'static str> {
    generated::CUBINS.iter().map(|(name, _)| *name)
}
