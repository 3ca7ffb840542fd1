//! Writes `BENCHMARKS.md` and `roofline.svg` from a results file produced by a device run.
//!
//! ```text
//! cargo run --release --features bench-tools --example report -- --measure-ceilings --results target/gpu-results.tsv
//! cargo run --features bench-tools --example report -- --results target/gpu-results.tsv --out docs/
//! ```
//!
//! The example needs the `bench-tools` feature (cuBLAS, for the measured ceilings). The results format is described
//! in `examples/report/results.rs` (tab-separated `meta`, `ceiling`, `note` and `kernel` lines).
//! A file without `kernel` lines produces a page that says there are no device measurements.

use std::path::PathBuf;
use std::process::ExitCode;

mod ceilings;
#[allow(dead_code)] // the parser and renderers also serve tests/report.rs
mod results;

const HELP: &str = "\
report: turn a benchmark results file into docs/BENCHMARKS.md and docs/roofline.svg

USAGE:
    cargo run --features bench-tools --example report -- --results FILE [--out DIR]
    cargo run --release --features bench-tools --example report -- --measure-ceilings --results FILE

OPTIONS:
    --results FILE   results file written by a device run (format v1, see examples/report/results.rs):
                       meta<TAB>KEY<TAB>VALUE          date, commit, device
                       ceiling<TAB>NAME<TAB>VALUE      copy_gbps, bf16_tflops, fp8_tflops (same run)
                       note<TAB>TEXT
                       kernel<TAB>NAME<TAB>SHAPE<TAB>PRECISION<TAB>TIME_US<TAB>FLOPS<TAB>BYTES<TAB>PEER<TAB>PEER_TIME_US
                     PRECISION is fp8, bf16, f32 or mem; PEER and PEER_TIME_US are '-' when there is no peer.
    --out DIR        where to write BENCHMARKS.md and roofline.svg (default: docs/)
    --measure-ceilings
                     instead of writing the report, measure the ceilings on GPU 0 (1 GiB device-to-device copy,
                     cuBLAS bf16 GEMM 8192^3) and append them, with the device name, to FILE. Without a usable GPU
                     it appends a note saying so (the report then says \"No device measurements\").
    -h, --help       print this help

The H200 data-sheet ceilings (4.8 TB/s, 989 bf16 / 1979 FP8 dense TFLOPS) are drawn dashed as references; every
other number comes from the results file. Without kernel lines the page says \"No device measurements\".
";

fn main() -> ExitCode {
    let mut results: Option<PathBuf> = None;
    let mut out = PathBuf::from("docs");
    let mut measure = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            "--measure-ceilings" => measure = true,
            "--results" | "--out" => {
                let Some(v) = args.next() else {
                    eprintln!("error: {a} needs a value\n\n{HELP}");
                    return ExitCode::from(2);
                };
                if a == "--results" {
                    results = Some(PathBuf::from(v));
                } else {
                    out = PathBuf::from(v);
                }
            }
            other => {
                eprintln!("error: unknown argument `{other}`\n\n{HELP}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(results) = results else {
        eprintln!("error: --results FILE is required\n\n{HELP}");
        return ExitCode::from(2);
    };
    if measure {
        return match append(&results, &measure_ceilings()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: appending to {}: {e}", results.display());
                ExitCode::FAILURE
            }
        };
    }
    match results::write_report(&results, &out) {
        Ok((md, svg)) => {
            println!("wrote {} and {}", md.display(), svg.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Results-file lines for the ceilings of GPU 0, or a note saying why there are none.
fn measure_ceilings() -> String {
    use crate::ceilings;
    let Some(gpu) = r1_kernels::device::bench_gpu("report --measure-ceilings") else {
        return "note\tceilings not measured: no usable GPU on this machine\n".to_string();
    };
    let name = gpu.context().name().unwrap_or_else(|_| "unknown GPU".into());
    let info = gpu.info();
    let mut lines = format!("meta\tdevice\t{name} ({}, {} SMs)\n", info.arch_name(), info.sm_count);
    eprintln!("measuring copy bandwidth ({} MiB device-to-device)...", ceilings::COPY_BYTES >> 20);
    match ceilings::measure_copy_gbps(&gpu, ceilings::COPY_BYTES) {
        Ok(v) => lines.push_str(&format!("ceiling\tcopy_gbps\t{v:.1}\n")),
        Err(e) => lines.push_str(&format!("note\tcopy bandwidth not measured: {e}\n")),
    }
    let (m, n, k) = ceilings::GEMM_MNK;
    eprintln!("measuring cuBLAS bf16 GEMM ({m}x{n}x{k})...");
    match ceilings::measure_cublas_bf16_tflops(&gpu, m, n, k) {
        Ok(v) => lines.push_str(&format!("ceiling\tbf16_tflops\t{v:.1}\n")),
        Err(e) => lines.push_str(&format!("note\tcuBLAS bf16 rate not measured: {e}\n")),
    }
    lines
}

fn append(path: &std::path::Path, lines: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(lines.as_bytes())?;
    eprint!("{lines}");
    Ok(())
}
