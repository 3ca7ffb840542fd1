//! Writes `BENCHMARKS.md` and `roofline.svg` from a results file produced by a device run.
//!
//! ```text
//! cargo run --example report -- --results target/gpu-results.tsv --out docs/
//! ```
//!
//! The results format is described in `src/report.rs` (tab-separated `meta`, `ceiling`, `note` and `kernel` lines).
//! A file without `kernel` lines produces a page that says there are no device measurements.

use std::path::PathBuf;
use std::process::ExitCode;

const HELP: &str = "\
report: turn a benchmark results file into docs/BENCHMARKS.md and docs/roofline.svg

USAGE:
    cargo run --example report -- --results FILE [--out DIR]

OPTIONS:
    --results FILE   results file written by a device run (format v1, see src/report.rs):
                       meta<TAB>KEY<TAB>VALUE          date, commit, device
                       ceiling<TAB>NAME<TAB>VALUE      copy_gbps, bf16_tflops, fp8_tflops (same run)
                       note<TAB>TEXT
                       kernel<TAB>NAME<TAB>SHAPE<TAB>PRECISION<TAB>TIME_US<TAB>FLOPS<TAB>BYTES<TAB>PEER<TAB>PEER_TIME_US
                     PRECISION is fp8, bf16, f32 or mem; PEER and PEER_TIME_US are '-' when there is no peer.
    --out DIR        where to write BENCHMARKS.md and roofline.svg (default: docs/)
    -h, --help       print this help

The H200 data-sheet ceilings (4.8 TB/s, 989 bf16 / 1979 FP8 dense TFLOPS) are drawn dashed as references; every
other number comes from the results file. Without kernel lines the page says \"No device measurements\".
";

fn main() -> ExitCode {
    let mut results: Option<PathBuf> = None;
    let mut out = PathBuf::from("docs");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
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
    match r1_kernels::report::write_report(&results, &out) {
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
