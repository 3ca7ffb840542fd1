//! The sm_90a MLA decode path (wgmma + bulk copies); see kernels/mla_decode_sm90.cu.

use half::bf16;

use super::{Checked, MlaPlan, MlaWorkspace};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::tensor::DeviceTensor;

#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_decode(
    gpu: &Gpu,
    _q: &DeviceTensor<bf16>,
    _kv: &DeviceTensor<bf16>,
    _block_table: &DeviceTensor<i32>,
    _seqlens: &DeviceTensor<i32>,
    _plan: &MlaPlan,
    _c: &Checked,
    _ws: &mut MlaWorkspace,
) -> Result<()> {
    gpu.require_hopper("MLA decode sm_90a")?;
    Err(Error::InvalidConfig("sm_90a MLA decode not wired yet".into()))
}
