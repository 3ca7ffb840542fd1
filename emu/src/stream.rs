//! Streams, events, stream capture and graphs.
//!
//! Work runs at the call, so streams are always idle and events complete when recorded. Capture follows the
//! driver's rules closely enough that code which misuses it fails here as it would on a device: synchronizing or
//! querying a capturing stream, waiting on an event recorded outside the capture, querying a captured event,
//! unsafe calls under global/thread-local capture, ending a capture from the wrong stream or thread or with
//! unjoined forked streams. A captured graph is the list of operations in the order they were enqueued, which
//! respects every dependency the streams expressed.

use std::ffi::{c_int, c_uint, c_ulonglong, c_void};
use std::sync::Arc;

use crate::entry::{entry, write_out};
use crate::errors::{fail, DriverResult, Failure};
use crate::state::{driver, Capture, Driver, Event, EventState, GraphBody, Membership, Stream, StreamKey};
use crate::types::*;
use crate::work::{execute, submit, Work};

/// Virtual nanoseconds between consecutive event records, so an event pair always spans a positive time.
const RECORD_NS: u64 = 500;

fn create_stream(ph_stream: *mut CUstream, flags: c_uint, priority: c_int) -> DriverResult {
    if ph_stream.is_null() || flags & !CU_STREAM_NON_BLOCKING != 0 {
        return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
    }
    let mut d = driver();
    let ctx = d.current_ctx()?;
    let h = d.new_handle();
    d.streams.insert(h, Stream { ctx, flags, priority: priority.clamp(-5, 0), pending: None, capture: None });
    // SAFETY: checked non-null; the caller provides storage for one CUstream.
    unsafe { write_out(ph_stream, h as CUstream) }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph_stream: *mut CUstream, flags: c_uint) -> CUresult {
    entry("cuStreamCreate", || create_stream(ph_stream, flags, 0))
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    ph_stream: *mut CUstream,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    entry("cuStreamCreateWithPriority", || create_stream(ph_stream, flags, priority))
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(h_stream: CUstream) -> CUresult {
    entry("cuStreamDestroy_v2", || {
        let mut d = driver();
        let h = h_stream as usize;
        let stream = d.stream_mut(h)?;
        if let Some(m) = stream.capture.take() {
            d.invalidate_capture(m.capture, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
            // Nothing can end a capture whose origin is gone: release the streams that joined it.
            if d.captures.get(&m.capture).is_some_and(|c| c.origin == h) {
                let capture = d.captures.remove(&m.capture).expect("checked above");
                for member in capture.members {
                    if let Some(s) = d.streams.get_mut(&member) {
                        s.capture = None;
                    }
                }
            }
        }
        d.streams.remove(&h);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCtx(h_stream: CUstream, pctx: *mut CUcontext) -> CUresult {
    entry("cuStreamGetCtx", || {
        let d = driver();
        let ctx = match d.resolve_stream(h_stream as usize)? {
            StreamKey::Explicit(h) => d.streams[&h].ctx,
            StreamKey::Implicit(ctx) => ctx,
        };
        // SAFETY: the caller provides storage for one CUcontext.
        unsafe { write_out(pctx, ctx as CUcontext) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetFlags(h_stream: CUstream, flags: *mut c_uint) -> CUresult {
    entry("cuStreamGetFlags", || {
        let d = driver();
        let f = match d.resolve_stream(h_stream as usize)? {
            StreamKey::Explicit(h) => d.streams[&h].flags,
            StreamKey::Implicit(_) => 0,
        };
        // SAFETY: the caller provides storage for one unsigned int.
        unsafe { write_out(flags, f) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetPriority(h_stream: CUstream, priority: *mut c_int) -> CUresult {
    entry("cuStreamGetPriority", || {
        let d = driver();
        let p = match d.resolve_stream(h_stream as usize)? {
            StreamKey::Explicit(h) => d.streams[&h].priority,
            StreamKey::Implicit(_) => 0,
        };
        // SAFETY: the caller provides storage for one int.
        unsafe { write_out(priority, p) }
    })
}

/// Refuses synchronizing or querying a capturing stream (and invalidates its capture, as a device does).
fn refuse_if_capturing(d: &mut Driver, key: StreamKey, what: &str) -> DriverResult {
    if let Some(capture) = d.capture_of(key) {
        d.invalidate_capture(capture, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        fail!(
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            "{what} on {}, which is capturing (the capture is now invalidated)",
            key.describe()
        );
    }
    Ok(())
}

fn take_pending(d: &mut Driver, key: StreamKey) -> DriverResult {
    let pending = match key {
        StreamKey::Explicit(h) => d.streams.get_mut(&h).and_then(|s| s.pending.take()),
        StreamKey::Implicit(ctx) => d.contexts.get_mut(&ctx).and_then(|c| c.pending.take()),
    };
    pending.map_or(Ok(()), |p| Err(p.failure))
}

/// The stream is idle; a launch failure left pending on it is reported once.
#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(h_stream: CUstream) -> CUresult {
    entry("cuStreamSynchronize", || {
        let mut d = driver();
        let key = d.resolve_stream(h_stream as usize)?;
        refuse_if_capturing(&mut d, key, "cuStreamSynchronize")?;
        take_pending(&mut d, key)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(h_stream: CUstream) -> CUresult {
    entry("cuStreamQuery", || {
        let mut d = driver();
        let key = d.resolve_stream(h_stream as usize)?;
        refuse_if_capturing(&mut d, key, "cuStreamQuery")?;
        take_pending(&mut d, key)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(h_stream: CUstream, f: CUhostFn, user_data: *mut c_void) -> CUresult {
    entry("cuLaunchHostFunc", || {
        let Some(f) = f else { return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE)) };
        submit(h_stream as usize, Work::HostFn { f, data: user_data as usize })
    })
}

// ---- events ----

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph_event: *mut CUevent, flags: c_uint) -> CUresult {
    entry("cuEventCreate", || {
        let known = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS;
        if ph_event.is_null() || flags & !known != 0 {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        if flags & CU_EVENT_INTERPROCESS != 0 {
            fail!(CUDA_ERROR_NOT_SUPPORTED, "interprocess events are not emulated");
        }
        let mut d = driver();
        d.current_ctx()?;
        let h = d.new_handle();
        d.events.insert(h, Event { flags, state: EventState::NeverRecorded });
        // SAFETY: checked non-null; the caller provides storage for one CUevent.
        unsafe { write_out(ph_event, h as CUevent) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(h_event: CUevent) -> CUresult {
    entry("cuEventDestroy_v2", || {
        let mut d = driver();
        d.event_mut(h_event as usize)?;
        d.events.remove(&(h_event as usize));
        Ok(())
    })
}

fn record_event(h_event: CUevent, h_stream: CUstream) -> DriverResult {
    let mut d = driver();
    let key = d.resolve_stream(h_stream as usize)?;
    d.event_mut(h_event as usize)?;
    let state = match (d.capture_of(key), key) {
        (Some(capture), StreamKey::Explicit(h)) => {
            let seen = d.streams[&h].capture.as_ref().map(|m| m.seen.clone()).unwrap_or_default();
            EventState::Captured { capture, seen }
        }
        _ => {
            d.clock_ns += RECORD_NS;
            EventState::At(d.clock_ns)
        }
    };
    d.event_mut(h_event as usize)?.state = state;
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(h_event: CUevent, h_stream: CUstream) -> CUresult {
    entry("cuEventRecord", || record_event(h_event, h_stream))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(h_event: CUevent, h_stream: CUstream, flags: c_uint) -> CUresult {
    entry("cuEventRecordWithFlags", || {
        if flags != 0 {
            fail!(CUDA_ERROR_NOT_SUPPORTED, "event record flags {flags:#x} (external event nodes) are not emulated");
        }
        record_event(h_event, h_stream)
    })
}

/// Refuses operations on an event last recorded into a capture; querying one inside its capture also
/// invalidates that capture, as on a device.
fn refuse_if_captured(d: &mut Driver, h_event: usize, what: &str) -> DriverResult {
    if let EventState::Captured { capture, .. } = d.event_mut(h_event)?.state {
        d.invalidate_capture(capture, CUDA_ERROR_CAPTURED_EVENT);
        fail!(CUDA_ERROR_CAPTURED_EVENT, "{what} on event {h_event:#x}, last recorded in a capturing stream");
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(h_event: CUevent) -> CUresult {
    entry("cuEventQuery", || refuse_if_captured(&mut driver(), h_event as usize, "cuEventQuery"))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(h_event: CUevent) -> CUresult {
    entry("cuEventSynchronize", || refuse_if_captured(&mut driver(), h_event as usize, "cuEventSynchronize"))
}

fn elapsed_ms(ms: *mut f32, start: CUevent, end: CUevent) -> DriverResult {
    if ms.is_null() {
        return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
    }
    let mut d = driver();
    refuse_if_captured(&mut d, start as usize, "cuEventElapsedTime")?;
    refuse_if_captured(&mut d, end as usize, "cuEventElapsedTime")?;
    let time = |d: &mut Driver, h: usize| -> DriverResult<u64> {
        let e = d.event_mut(h)?;
        if e.flags & CU_EVENT_DISABLE_TIMING != 0 {
            fail!(CUDA_ERROR_INVALID_HANDLE, "event {h:#x} was created with CU_EVENT_DISABLE_TIMING");
        }
        match e.state {
            EventState::At(t) => Ok(t),
            _ => fail!(CUDA_ERROR_INVALID_HANDLE, "event {h:#x} was never recorded"),
        }
    };
    let (t0, t1) = (time(&mut d, start as usize)?, time(&mut d, end as usize)?);
    // Virtual time: a small number that only orders events, never a measurement.
    // SAFETY: checked non-null; the caller provides storage for one float.
    unsafe { write_out(ms, (t1 as f64 - t0 as f64) as f32 / 1e6) }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult {
    entry("cuEventElapsedTime", || elapsed_ms(ms, start, end))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult {
    entry("cuEventElapsedTime_v2", || elapsed_ms(ms, start, end))
}

/// Work already ran, so outside capture a wait orders nothing. Inside capture the wait is how streams fork into
/// and join a capture.
#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(h_stream: CUstream, h_event: CUevent, flags: c_uint) -> CUresult {
    entry("cuStreamWaitEvent", || {
        if flags & !CU_EVENT_WAIT_EXTERNAL != 0 {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        let mut d = driver();
        let key = d.resolve_stream(h_stream as usize)?;
        let event_state = d.event_mut(h_event as usize)?.state.clone();
        let waiter_capture = d.capture_of(key);
        match (event_state, waiter_capture) {
            (EventState::NeverRecorded, _) => Ok(()),
            (EventState::At(_), None) => Ok(()),
            (EventState::At(_), Some(_)) if flags & CU_EVENT_WAIT_EXTERNAL != 0 => Ok(()),
            (EventState::At(_), Some(capture)) => {
                d.invalidate_capture(capture, CUDA_ERROR_STREAM_CAPTURE_ISOLATION);
                fail!(
                    CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
                    "{} is capturing and waits on event {:#x}, recorded outside the capture (the capture is now \
                     invalidated)",
                    key.describe(),
                    h_event as usize
                )
            }
            (EventState::Captured { capture, seen }, waiter) => {
                if !d.captures.contains_key(&capture) {
                    fail!(
                        CUDA_ERROR_CAPTURED_EVENT,
                        "event {:#x} was last recorded in a capture that has ended",
                        h_event as usize
                    );
                }
                join_capture(&mut d, key, capture, waiter, &seen)
            }
        }
    })
}

/// `key` waits on an event of `capture`: it joins the capture (fork) or merges what it has seen (join).
fn join_capture(
    d: &mut Driver,
    key: StreamKey,
    capture: u64,
    waiter: Option<u64>,
    seen: &std::collections::HashMap<usize, u64>,
) -> DriverResult {
    let StreamKey::Explicit(h) = key else {
        fail!(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "the NULL stream cannot join a capture");
    };
    match waiter {
        Some(own) if own != capture => {
            d.invalidate_capture(own, CUDA_ERROR_STREAM_CAPTURE_MERGE);
            fail!(CUDA_ERROR_STREAM_CAPTURE_MERGE, "stream {h:#x} would merge two separate captures");
        }
        Some(_) => {
            if let Some(m) = d.stream_mut(h)?.capture.as_mut() {
                m.merge(seen);
            }
        }
        None => {
            let mut membership = Membership { capture, seen: seen.clone() };
            membership.seen.entry(h).or_insert(0);
            d.stream_mut(h)?.capture = Some(membership);
            if let Some(c) = d.captures.get_mut(&capture) {
                c.members.push(h);
            }
        }
    }
    Ok(())
}

// ---- capture ----

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(h_stream: CUstream, mode: c_uint) -> CUresult {
    entry("cuStreamBeginCapture_v2", || {
        if mode > CU_STREAM_CAPTURE_MODE_RELAXED {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        let mut d = driver();
        let StreamKey::Explicit(h) = d.resolve_stream(h_stream as usize)? else {
            fail!(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "the NULL stream cannot be captured");
        };
        if d.streams[&h].capture.is_some() {
            fail!(CUDA_ERROR_ILLEGAL_STATE, "stream {h:#x} is already capturing");
        }
        let id = d.new_capture_id();
        d.captures.insert(
            id,
            Capture {
                origin: h,
                mode,
                thread: std::thread::current().id(),
                invalidated: None,
                work: Vec::new(),
                members: Vec::new(),
                allocated_inside: Vec::new(),
                freed_inside: Vec::new(),
            },
        );
        let mut membership = Membership { capture: id, seen: Default::default() };
        membership.seen.insert(h, 0);
        d.stream_mut(h)?.capture = Some(membership);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(h_stream: CUstream, ph_graph: *mut CUgraph) -> CUresult {
    entry("cuStreamEndCapture", || {
        if ph_graph.is_null() {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        let mut d = driver();
        let StreamKey::Explicit(h) = d.resolve_stream(h_stream as usize)? else {
            fail!(CUDA_ERROR_ILLEGAL_STATE, "the NULL stream is never capturing");
        };
        let Some(id) = d.streams[&h].capture.as_ref().map(|m| m.capture) else {
            fail!(CUDA_ERROR_ILLEGAL_STATE, "stream {h:#x} is not capturing");
        };
        let (origin, mode, thread) = {
            let c = &d.captures[&id];
            (c.origin, c.mode, c.thread)
        };
        if origin != h {
            d.invalidate_capture(id, CUDA_ERROR_STREAM_CAPTURE_UNMATCHED);
            fail!(
                CUDA_ERROR_STREAM_CAPTURE_UNMATCHED,
                "the capture began on stream {origin:#x}, not {h:#x} (the capture is now invalidated)"
            );
        }
        if mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL && thread != std::thread::current().id() {
            fail!(
                CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD,
                "a thread-local capture must end on the thread that began it"
            );
        }
        let unjoined = unjoined_streams(&d, id, h);
        let capture = d.captures.remove(&id).expect("looked up above");
        for m in std::iter::once(capture.origin).chain(capture.members.iter().copied()) {
            if let Some(s) = d.streams.get_mut(&m) {
                s.capture = None;
            }
        }
        // SAFETY: checked non-null; the caller provides storage for one CUgraph. A failed capture yields null.
        unsafe { *ph_graph = std::ptr::null_mut() };
        if let Some(code) = capture.invalidated {
            let why = match code {
                CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED => "a call that capture forbids",
                CUDA_ERROR_STREAM_CAPTURE_ISOLATION => "a wait on an event recorded outside the capture",
                CUDA_ERROR_CAPTURED_EVENT => "a query of an event recorded in the capture",
                CUDA_ERROR_STREAM_CAPTURE_MERGE => "an attempt to merge two captures",
                _ => "an earlier error",
            };
            fail!(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "the capture was invalidated by {why}; no graph was made");
        }
        if !unjoined.is_empty() {
            fail!(
                CUDA_ERROR_STREAM_CAPTURE_UNJOINED,
                "streams {unjoined:x?} forked from the capture but their last work was never joined back into \
                 stream {h:#x}"
            );
        }
        let body = Arc::new(GraphBody { work: capture.work, freed_inside: capture.freed_inside });
        let graph = d.new_handle();
        d.graphs.insert(graph, body);
        // SAFETY: as above.
        unsafe { *ph_graph = graph as CUgraph };
        Ok(())
    })
}

/// Member streams whose latest captured work the origin has not waited on.
fn unjoined_streams(d: &Driver, capture: u64, origin: usize) -> Vec<usize> {
    let origin_seen = d.streams.get(&origin).and_then(|s| s.capture.as_ref()).map(|m| &m.seen);
    d.captures[&capture]
        .members
        .iter()
        .copied()
        .filter(|m| {
            let own = d.streams.get(m).and_then(|s| s.capture.as_ref()).and_then(|c| c.seen.get(m)).copied();
            let known = origin_seen.and_then(|s| s.get(m)).copied().unwrap_or(0);
            own.unwrap_or(0) > known
        })
        .collect()
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(h_stream: CUstream, status: *mut c_uint) -> CUresult {
    entry("cuStreamIsCapturing", || {
        let d = driver();
        let key = d.resolve_stream(h_stream as usize)?;
        let value = match d.capture_of(key).map(|c| d.captures[&c].invalidated) {
            None => CU_STREAM_CAPTURE_STATUS_NONE,
            Some(None) => CU_STREAM_CAPTURE_STATUS_ACTIVE,
            Some(Some(_)) => CU_STREAM_CAPTURE_STATUS_INVALIDATED,
        };
        // SAFETY: the caller provides storage for one CUstreamCaptureStatus (a C enum: 4 bytes).
        unsafe { write_out(status, value) }
    })
}

// ---- graphs ----

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    ph_graph_exec: *mut CUgraphExec,
    h_graph: CUgraph,
    flags: c_ulonglong,
) -> CUresult {
    entry("cuGraphInstantiateWithFlags", || {
        let known = CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH
            | CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD
            | CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH
            | CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY;
        if ph_graph_exec.is_null() || flags & !known != 0 {
            return Err(Failure::quiet(CUDA_ERROR_INVALID_VALUE));
        }
        if flags & CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH != 0 {
            if flags != CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH {
                fail!(CUDA_ERROR_INVALID_VALUE, "CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH cannot be combined");
            }
            fail!(CUDA_ERROR_NOT_SUPPORTED, "device-launchable graphs are not emulated");
        }
        let mut d = driver();
        let Some(body) = d.graphs.get(&(h_graph as usize)).cloned() else {
            fail!(CUDA_ERROR_INVALID_VALUE, "{:#x} is not a graph", h_graph as usize);
        };
        let exec = d.new_handle();
        d.graph_execs.insert(exec, body);
        // SAFETY: checked non-null; the caller provides storage for one CUgraphExec.
        unsafe { write_out(ph_graph_exec, exec as CUgraphExec) }
    })
}

/// Replays the graph's work in capture order; into a capturing stream, the work is captured again.
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(h_graph_exec: CUgraphExec, h_stream: CUstream) -> CUresult {
    entry("cuGraphLaunch", || {
        let (key, body) = {
            let d = driver();
            let Some(body) = d.graph_execs.get(&(h_graph_exec as usize)).cloned() else {
                fail!(CUDA_ERROR_INVALID_VALUE, "{:#x} is not an instantiated graph", h_graph_exec as usize);
            };
            (d.resolve_stream(h_stream as usize)?, body)
        };
        let capturing = driver().capture_of(key).is_some();
        for work in &body.work {
            if capturing {
                submit(h_stream as usize, work.clone())?;
            } else {
                execute(key, work.clone())?;
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphUpload(h_graph_exec: CUgraphExec, h_stream: CUstream) -> CUresult {
    entry("cuGraphUpload", || {
        let d = driver();
        if !d.graph_execs.contains_key(&(h_graph_exec as usize)) {
            fail!(CUDA_ERROR_INVALID_VALUE, "{:#x} is not an instantiated graph", h_graph_exec as usize);
        }
        d.resolve_stream(h_stream as usize).map(|_| ())
    })
}

/// Releases memory allocated and freed inside the capture once nothing can replay it any more.
fn release_graph_body(body: Arc<GraphBody>) -> DriverResult {
    if let Ok(body) = Arc::try_unwrap(body) {
        for ptr in body.freed_inside {
            crate::memory::free_device(ptr)?;
        }
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(h_graph_exec: CUgraphExec) -> CUresult {
    entry("cuGraphExecDestroy", || {
        let body = driver().graph_execs.remove(&(h_graph_exec as usize));
        match body {
            Some(body) => release_graph_body(body),
            None => fail!(CUDA_ERROR_INVALID_VALUE, "{:#x} is not an instantiated graph", h_graph_exec as usize),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(h_graph: CUgraph) -> CUresult {
    entry("cuGraphDestroy", || {
        let body = driver().graphs.remove(&(h_graph as usize));
        match body {
            Some(body) => release_graph_body(body),
            None => fail!(CUDA_ERROR_INVALID_VALUE, "{:#x} is not a graph", h_graph as usize),
        }
    })
}
