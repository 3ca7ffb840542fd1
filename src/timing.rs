//! GPU-event timing for benchmarks: times what was enqueued on the GPU's stream, not host overhead.

use std::time::Duration;

use cudarc::driver::sys::CUevent_flags;

use crate::device::Gpu;
use crate::error::Result;

/// Runs `launch` `iters` times between two CUDA events on the GPU's stream and returns the elapsed GPU time.
/// Suitable for criterion's `iter_custom`.
pub fn time_launches(gpu: &Gpu, iters: u64, mut launch: impl FnMut() -> Result<()>) -> Result<Duration> {
    let stream = gpu.stream();
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..iters {
        launch()?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ms = start.elapsed_ms(&end)?;
    Ok(Duration::from_secs_f64(ms as f64 / 1e3))
}

/// Median time of one launch over `reps` timed batches of `batch` launches each, after one warm-up batch.
pub fn median_launch_time(
    gpu: &Gpu,
    batch: u64,
    reps: usize,
    mut launch: impl FnMut() -> Result<()>,
) -> Result<Duration> {
    time_launches(gpu, batch, &mut launch)?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        samples.push(time_launches(gpu, batch, &mut launch)? / batch.max(1) as u32);
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}
