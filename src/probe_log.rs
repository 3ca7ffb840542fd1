//! Records and replays the inputs and outputs of the sm_90a probe kernels, so that one device run also validates
//! the emulator bit for bit: `scripts/gpu-check` runs the probe tests with `R1K_PROBE_RECORD=<dir>` on the GPU, and
//! `scripts/emu-replay-probes <dir>` runs them again on the emulator (hopper numerics) with `R1K_PROBE_REPLAY=<dir>`,
//! which fails on the first byte the emulator computes differently. Without either variable nothing happens.

use std::fs;
use std::path::PathBuf;

/// One named buffer of a probe launch.
pub type Buffer<'a> = (&'a str, &'a [u8]);

fn case_dir(root: &str, test: &str, case: &str) -> PathBuf {
    let clean =
        |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect::<String>();
    PathBuf::from(root).join(clean(test)).join(clean(case))
}

/// Records (R1K_PROBE_RECORD) or checks against a recording (R1K_PROBE_REPLAY) the inputs and outputs of one probe
/// launch. A replay panics when an input differs (the recording is of another launch) or an output differs (the
/// emulator and the GPU disagree), naming the first differing byte.
pub fn probe_io(test: &str, case: &str, inputs: &[Buffer], outputs: &[Buffer]) {
    if let Ok(root) = std::env::var("R1K_PROBE_RECORD") {
        let dir = case_dir(&root, test, case);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("probe record: cannot create {}: {e}", dir.display()));
        for (kind, bufs) in [("in", inputs), ("out", outputs)] {
            for (name, bytes) in bufs {
                let path = dir.join(format!("{kind}-{name}.bin"));
                fs::write(&path, bytes)
                    .unwrap_or_else(|e| panic!("probe record: cannot write {}: {e}", path.display()));
            }
        }
    }
    if let Ok(root) = std::env::var("R1K_PROBE_REPLAY") {
        let dir = case_dir(&root, test, case);
        for (kind, bufs) in [("in", inputs), ("out", outputs)] {
            for (name, bytes) in bufs {
                let path = dir.join(format!("{kind}-{name}.bin"));
                let recorded =
                    fs::read(&path).unwrap_or_else(|e| panic!("probe replay: no recording {} ({e})", path.display()));
                assert_eq!(recorded.len(), bytes.len(), "probe replay {test}/{case}: {kind} {name} has another size");
                if let Some(i) = recorded.iter().zip(bytes.iter()).position(|(a, b)| a != b) {
                    panic!(
                        "probe replay {test}/{case}: {kind}put {name} differs from the recording at byte {i} \
                         (recorded {:#04x}, now {:#04x}){}",
                        recorded[i],
                        bytes[i],
                        if kind == "in" { ": not the same launch" } else { "" }
                    );
                }
            }
        }
        eprintln!("probe replay {test}/{case}: every input and output matches the recording");
    }
}
