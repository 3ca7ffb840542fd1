//! The benchmark report: a results file from a device run → `docs/BENCHMARKS.md` (a table of every kernel against the
//! ceilings measured in the same run and against its peer) and `docs/roofline.svg` (every kernel on a log-log
//! roofline of the H200).
//!
//! # Results file (format v1)
//!
//! Plain text, one record per line, fields separated by a single TAB; empty lines and lines starting with `#` are
//! ignored. The first field says what the line is:
//!
//! ```text
//! meta      KEY  VALUE                      date, commit, device (free text), anything else worth recording
//! ceiling   NAME VALUE                      copy_gbps | bf16_tflops | fp8_tflops, measured in the same run
//! note      TEXT                            shown under the table (e.g. why a kernel was skipped)
//! kernel    NAME SHAPE PRECISION TIME_US FLOPS BYTES PEER_NAME PEER_TIME_US
//! ```
//!
//! `PRECISION` is `fp8`, `bf16`, `f32` or `mem` (bandwidth-bound kernels with no meaningful compute roof); it picks
//! the compute ceiling the kernel is compared with. `FLOPS` and `BYTES` are the work of one launch (the minimum
//! bytes that must move, not what the kernel happens to move); `TIME_US` is one launch's time. `PEER_NAME` and
//! `PEER_TIME_US` are `-` when there is no peer. [`Results::to_text`] writes this format; [`parse_results`] reads
//! it, with the line number in every error.
//!
//! Numbers come only from the results file: nothing here invents or estimates a measurement. The H200 data-sheet
//! values ([`H200_SPEC`]) are drawn as dashed reference lines and labelled as specifications.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use r1_kernels::error::{Error, Result};

/// Published H200 SXM figures (dense, no sparsity): the dashed lines of the roofline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSpec {
    /// Device name.
    pub name: &'static str,
    /// HBM bandwidth, TB/s.
    pub hbm_tbps: f64,
    /// Dense bf16 tensor-core rate, TFLOPS.
    pub bf16_tflops: f64,
    /// Dense FP8 tensor-core rate, TFLOPS.
    pub fp8_tflops: f64,
}

/// The H200 SXM data sheet: 4.8 TB/s HBM3e, 989 bf16 and 1979 FP8 dense TFLOPS.
pub const H200_SPEC: DeviceSpec =
    DeviceSpec { name: "H200 SXM", hbm_tbps: 4.8, bf16_tflops: 989.0, fp8_tflops: 1979.0 };

/// Which compute roof a kernel is held against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    /// FP8 tensor cores.
    Fp8,
    /// bf16 tensor cores.
    Bf16,
    /// f32 (CUDA cores).
    F32,
    /// Bandwidth-bound, no compute roof (quantization, copies).
    Mem,
}

impl Precision {
    /// The results-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp8 => "fp8",
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
            Precision::Mem => "mem",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "fp8" => Some(Precision::Fp8),
            "bf16" => Some(Precision::Bf16),
            "f32" => Some(Precision::F32),
            "mem" => Some(Precision::Mem),
            _ => None,
        }
    }
}

/// Ceilings measured in the same run as the kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ceilings {
    /// Device-to-device copy bandwidth, GB/s.
    pub copy_gbps: Option<f64>,
    /// cuBLAS bf16 GEMM rate, TFLOPS.
    pub bf16_tflops: Option<f64>,
    /// cuBLAS(Lt) FP8 GEMM rate, TFLOPS, when measured.
    pub fp8_tflops: Option<f64>,
}

/// A comparison implementation timed in the same run (cuBLAS, a naive kernel, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// What it is.
    pub name: String,
    /// One launch, microseconds.
    pub time_us: f64,
}

/// One kernel measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelResult {
    /// Kernel (or operation) name.
    pub kernel: String,
    /// Problem shape in words, e.g. `m=128 n=7168 k=2048`.
    pub shape: String,
    /// Which compute roof applies.
    pub precision: Precision,
    /// One launch, microseconds.
    pub time_us: f64,
    /// Floating-point operations of one launch.
    pub flops: f64,
    /// Minimum bytes one launch must move.
    pub bytes: f64,
    /// The same-run peer, if any.
    pub peer: Option<Peer>,
}

impl KernelResult {
    /// Achieved TFLOPS.
    pub fn tflops(&self) -> f64 {
        self.flops / (self.time_us * 1e-6) / 1e12
    }

    /// Achieved GB/s (of the minimum bytes).
    pub fn gbps(&self) -> f64 {
        self.bytes / (self.time_us * 1e-6) / 1e9
    }

    /// Arithmetic intensity, FLOP per byte (`None` when either is zero: the kernel cannot be placed on a roofline).
    pub fn intensity(&self) -> Option<f64> {
        (self.flops > 0.0 && self.bytes > 0.0).then(|| self.flops / self.bytes)
    }

    /// `peer time / our time`: above 1 means faster than the peer.
    pub fn speedup_vs_peer(&self) -> Option<f64> {
        self.peer.as_ref().map(|p| p.time_us / self.time_us)
    }

    /// The results-file line for this measurement (no trailing newline).
    pub fn to_line(&self) -> String {
        let (pn, pt) = match &self.peer {
            Some(p) => (clean_field(&p.name), format!("{}", p.time_us)),
            None => ("-".to_string(), "-".to_string()),
        };
        format!(
            "kernel\t{}\t{}\t{}\t{}\t{}\t{}\t{pn}\t{pt}",
            clean_field(&self.kernel),
            clean_field(&self.shape),
            self.precision.as_str(),
            self.time_us,
            self.flops,
            self.bytes
        )
    }
}

/// Tabs and newlines would break the format; they become spaces.
fn clean_field(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

/// A parsed results file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    /// `meta` lines (date, commit, device, ...).
    pub meta: BTreeMap<String, String>,
    /// `ceiling` lines.
    pub ceilings: Ceilings,
    /// `kernel` lines, in file order.
    pub kernels: Vec<KernelResult>,
    /// `note` lines.
    pub notes: Vec<String>,
}

impl Results {
    /// `meta` value or `"unknown"`.
    pub fn meta_or_unknown(&self, key: &str) -> &str {
        self.meta.get(key).map(String::as_str).filter(|s| !s.is_empty()).unwrap_or("unknown")
    }

    /// True when the file holds at least one kernel measurement.
    pub fn has_device_measurements(&self) -> bool {
        !self.kernels.is_empty()
    }

    /// The whole file in format v1 (what [`parse_results`] reads back).
    pub fn to_text(&self) -> String {
        let mut out =
            String::from("# r1-kernels benchmark results, format v1 (tab-separated; see examples/report/results.rs)\n");
        for (k, v) in &self.meta {
            let _ = writeln!(out, "meta\t{}\t{}", clean_field(k), clean_field(v));
        }
        let c = &self.ceilings;
        for (name, v) in [("copy_gbps", c.copy_gbps), ("bf16_tflops", c.bf16_tflops), ("fp8_tflops", c.fp8_tflops)] {
            if let Some(v) = v {
                let _ = writeln!(out, "ceiling\t{name}\t{v}");
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note\t{}", clean_field(n));
        }
        out.push_str("# kernel\tname\tshape\tprecision\ttime_us\tflops\tbytes\tpeer_name\tpeer_time_us\n");
        for k in &self.kernels {
            out.push_str(&k.to_line());
            out.push('\n');
        }
        out
    }
}

/// Parses a results file (format v1, see the module docs). Errors name the line.
pub fn parse_results(text: &str) -> Result<Results> {
    let mut r = Results::default();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let err = |msg: String| Error::invalid_data(format!("results line {lineno}: {msg}"));
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let num = |s: &str, what: &str, allow_zero: bool| -> Result<f64> {
            let v: f64 = s.trim().parse().map_err(|_| err(format!("{what} `{s}` is not a number")))?;
            if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) {
                return Err(err(format!("{what} must be {}, got {v}", if allow_zero { "≥ 0" } else { "> 0" })));
            }
            Ok(v)
        };
        match f[0] {
            "meta" => {
                if f.len() != 3 {
                    return Err(err(format!("`meta` needs 2 fields (key, value), got {}", f.len() - 1)));
                }
                r.meta.insert(f[1].to_string(), f[2].to_string());
            }
            "ceiling" => {
                if f.len() != 3 {
                    return Err(err(format!("`ceiling` needs 2 fields (name, value), got {}", f.len() - 1)));
                }
                let v = Some(num(f[2], f[1], false)?);
                match f[1] {
                    "copy_gbps" => r.ceilings.copy_gbps = v,
                    "bf16_tflops" => r.ceilings.bf16_tflops = v,
                    "fp8_tflops" => r.ceilings.fp8_tflops = v,
                    other => {
                        return Err(err(format!(
                            "unknown ceiling `{other}` (expected copy_gbps, bf16_tflops or fp8_tflops)"
                        )))
                    }
                }
            }
            "note" => r.notes.push(f[1..].join(" ")),
            "kernel" => {
                if f.len() != 9 {
                    return Err(err(format!(
                        "`kernel` needs 8 fields (name, shape, precision, time_us, flops, bytes, peer_name, \
                         peer_time_us), got {}",
                        f.len() - 1
                    )));
                }
                let precision = Precision::parse(f[3])
                    .ok_or_else(|| err(format!("precision `{}` is not one of fp8, bf16, f32, mem", f[3])))?;
                let peer = match (f[7].trim(), f[8].trim()) {
                    ("-", "-") | ("", "") => None,
                    (name, t) => Some(Peer { name: name.to_string(), time_us: num(t, "peer_time_us", false)? }),
                };
                if f[1].trim().is_empty() {
                    return Err(err("empty kernel name".into()));
                }
                r.kernels.push(KernelResult {
                    kernel: f[1].to_string(),
                    shape: f[2].to_string(),
                    precision,
                    time_us: num(f[4], "time_us", false)?,
                    flops: num(f[5], "flops", true)?,
                    bytes: num(f[6], "bytes", true)?,
                    peer,
                });
            }
            other => {
                return Err(err(format!("unknown record type `{other}` (expected meta, ceiling, note or kernel)")))
            }
        }
    }
    Ok(r)
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// `1234.5` → `"1234.5"`, `3.14159` → `"3.14"`: three significant digits below 100, whole numbers above.
fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn pct(v: f64, of: f64) -> String {
    format!("{:.0}%", 100.0 * v / of)
}

/// The compute ceiling a kernel is compared with: the measured one for its precision, else the measured bf16 one
/// (flagged), else none.
fn compute_ceiling(c: &Ceilings, p: Precision) -> Option<(f64, bool)> {
    match p {
        Precision::Fp8 => c.fp8_tflops.map(|v| (v, false)).or(c.bf16_tflops.map(|v| (v, true))),
        Precision::Bf16 => c.bf16_tflops.map(|v| (v, false)),
        Precision::F32 | Precision::Mem => None,
    }
}

/// The sentence used when a results file holds no kernel rows.
pub const NO_DEVICE_MEASUREMENTS: &str = "No device measurements";

/// `docs/BENCHMARKS.md` for `results`; `source` names the results file in the page.
pub fn render_markdown(results: &Results, source: &str) -> String {
    let mut md = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        md,
        "<!-- Generated by `cargo run --features bench-tools --example report -- --results {source}`; edit the results, not this page. -->\n"
    );
    let date = results.meta_or_unknown("date");
    let commit = results.meta_or_unknown("commit");
    let device = results.meta_or_unknown("device");
    if !results.has_device_measurements() {
        let c = &results.ceilings;
        let measured: Vec<String> = [
            c.copy_gbps.map(|v| format!("copy bandwidth {} GB/s", fmt_num(v))),
            c.bf16_tflops.map(|v| format!("cuBLAS bf16 {} TFLOPS", fmt_num(v))),
            c.fp8_tflops.map(|v| format!("cuBLASLt FP8 {} TFLOPS", fmt_num(v))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let _ = writeln!(
            md,
            "**{NO_DEVICE_MEASUREMENTS}.** The results file `{source}` (date {date}, commit `{commit}`, device: \
             {device}) contains no kernel timings{}. Run `scripts/gpu-check` on an H200 to produce them.\n",
            if measured.is_empty() {
                ", so this page has no measured numbers".to_string()
            } else {
                format!("; only these ceilings were measured: {}", measured.join(", "))
            }
        );
        if !results.notes.is_empty() {
            md.push_str("Notes from the run:\n\n");
            for n in &results.notes {
                let _ = writeln!(md, "- {n}");
            }
            md.push('\n');
        }
        let _ = writeln!(
            md,
            "The roofline below shows the {} data-sheet ceilings (dashed), which are specifications, not \
             measurements{}.\n\n![Roofline without kernel measurements](roofline.svg)",
            H200_SPEC.name,
            if measured.is_empty() { "" } else { ", and the measured ceilings (solid)" }
        );
        return md;
    }
    let _ = writeln!(md, "Measured on **{}**, {date}, commit `{commit}`.\n", md_cell(device));
    md.push_str("## Ceilings measured in the same run\n\n");
    md.push_str(&format!("| ceiling | measured | {} spec | % of spec |\n|---|---:|---:|---:|\n", H200_SPEC.name));
    let c = &results.ceilings;
    let spec_gbps = H200_SPEC.hbm_tbps * 1000.0;
    let rows = [
        ("device-to-device copy bandwidth", c.copy_gbps, spec_gbps, "GB/s"),
        ("cuBLAS bf16 GEMM", c.bf16_tflops, H200_SPEC.bf16_tflops, "TFLOPS"),
        ("cuBLASLt FP8 GEMM", c.fp8_tflops, H200_SPEC.fp8_tflops, "TFLOPS"),
    ];
    for (name, measured, spec, unit) in rows {
        match measured {
            Some(v) => {
                let _ =
                    writeln!(md, "| {name} | {} {unit} | {} {unit} | {} |", fmt_num(v), fmt_num(spec), pct(v, spec));
            }
            None => {
                let _ = writeln!(md, "| {name} | not measured | {} {unit} | — |", fmt_num(spec));
            }
        }
    }
    md.push_str("\n## Kernels\n\n");
    md.push_str(
        "Time is one launch. TFLOPS and GB/s use the operation's flops and *minimum* bytes. \"vs peer\" is the peer's \
         time divided by ours (above 1×: faster than the peer).\n\n",
    );
    md.push_str(
        "| # | kernel | shape | precision | time (µs) | TFLOPS | GB/s | % compute ceiling | % copy bandwidth | peer | \
         vs peer |\n|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|\n",
    );
    let mut fallback_used = false;
    for (i, k) in results.kernels.iter().enumerate() {
        let compute = match compute_ceiling(c, k.precision) {
            Some((roof, fallback)) if k.flops > 0.0 => {
                fallback_used |= fallback;
                format!("{}{}", pct(k.tflops(), roof), if fallback { " †" } else { "" })
            }
            _ => "—".to_string(),
        };
        let bw = match c.copy_gbps {
            Some(g) if k.bytes > 0.0 => pct(k.gbps(), g),
            _ => "—".to_string(),
        };
        let tflops = if k.flops > 0.0 { fmt_num(k.tflops()) } else { "—".to_string() };
        let gbps = if k.bytes > 0.0 { fmt_num(k.gbps()) } else { "—".to_string() };
        let (peer, ratio) = match (&k.peer, k.speedup_vs_peer()) {
            (Some(p), Some(r)) => (md_cell(&p.name), format!("{r:.2}×")),
            _ => ("—".to_string(), "—".to_string()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {tflops} | {gbps} | {compute} | {bw} | {peer} | {ratio} |",
            i + 1,
            md_cell(&k.kernel),
            md_cell(&k.shape),
            k.precision.as_str(),
            fmt_num(k.time_us)
        );
    }
    if fallback_used {
        md.push_str("\n† FP8 kernel compared with the measured bf16 cuBLAS rate (no FP8 GEMM ceiling in this run).\n");
    }
    if !results.notes.is_empty() {
        md.push_str("\n## Notes\n\n");
        for n in &results.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    let _ = writeln!(
        md,
        "\n## Roofline\n\nSolid lines: ceilings measured in this run. Dashed: {} data sheet ({} TB/s, {} bf16 / {} FP8 \
         dense TFLOPS). Points are numbered as in the table.\n\n![Roofline](roofline.svg)",
        H200_SPEC.name, H200_SPEC.hbm_tbps, H200_SPEC.bf16_tflops, H200_SPEC.fp8_tflops
    );
    md
}

/// Geometry of the roofline plot, public so tests can check where things land.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlotArea {
    /// Left edge, px.
    pub x: f64,
    /// Top edge, px.
    pub y: f64,
    /// Width, px.
    pub width: f64,
    /// Height, px.
    pub height: f64,
    /// log10 of the smallest and largest intensity shown.
    pub x_decades: (i32, i32),
    /// log10 of the smallest and largest TFLOPS shown.
    pub y_decades: (i32, i32),
}

impl PlotArea {
    /// Pixel x of an intensity.
    pub fn px(&self, intensity: f64) -> f64 {
        let (a, b) = self.x_decades;
        self.x + (intensity.log10() - a as f64) / (b - a) as f64 * self.width
    }
    /// Pixel y of a TFLOPS value.
    pub fn py(&self, tflops: f64) -> f64 {
        let (a, b) = self.y_decades;
        self.y + self.height - (tflops.log10() - a as f64) / (b - a) as f64 * self.height
    }
}

/// Where the roofline's axes go for `results`: 0.1–10⁴ FLOP/byte and 0.1–10⁴ TFLOPS, widened by whole decades to
/// include every plotted kernel (parsing guarantees finite positive values, so this is bounded).
pub fn plot_area(results: &Results) -> PlotArea {
    let (mut x0, mut x1, mut y0, mut y1) = (-1i32, 4i32, -1i32, 4i32);
    for k in &results.kernels {
        if let Some(ai) = k.intensity() {
            x0 = x0.min(ai.log10().floor() as i32);
            x1 = x1.max(ai.log10().ceil() as i32);
            y0 = y0.min(k.tflops().log10().floor() as i32);
            y1 = y1.max(k.tflops().log10().ceil() as i32);
        }
    }
    PlotArea {
        x: 90.0,
        y: 60.0,
        width: 620.0,
        height: 460.0,
        x_decades: (x0, x1.max(x0 + 1)),
        y_decades: (y0, y1.max(y0 + 1)),
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

fn decade_label(d: i32) -> String {
    if d >= 0 {
        format!("{}", 10f64.powi(d))
    } else {
        format!("{:.*}", (-d) as usize, 10f64.powi(d))
    }
}

fn precision_color(p: Precision) -> &'static str {
    match p {
        Precision::Fp8 => "#d62728",
        Precision::Bf16 => "#1f77b4",
        Precision::F32 => "#2ca02c",
        Precision::Mem => "#9467bd",
    }
}

/// `docs/roofline.svg` for `results`: plain SVG 1.1 text, no external resources.
pub fn render_roofline_svg(results: &Results) -> String {
    let a = plot_area(results);
    let plotted: Vec<(usize, &KernelResult)> =
        results.kernels.iter().enumerate().filter(|(_, k)| k.intensity().is_some()).collect();
    let legend_rows = plotted.len() + 8;
    let width = 1160.0;
    let height = (a.y + a.height + 70.0).max(60.0 + 16.0 * legend_rows as f64);
    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let title = if results.has_device_measurements() {
        format!(
            "r1-kernels roofline: {} ({}, commit {})",
            results.meta_or_unknown("device"),
            results.meta_or_unknown("date"),
            results.meta_or_unknown("commit")
        )
    } else {
        format!("r1-kernels roofline: {NO_DEVICE_MEASUREMENTS} of kernels ({} specifications dashed)", H200_SPEC.name)
    };
    let _ = writeln!(s, r#"<title>{}</title>"#, xml_escape(&title));
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="30" font-size="15" font-weight="bold">{}</text>"#, a.x, xml_escape(&title));
    let _ = writeln!(
        s,
        r#"<defs><clipPath id="plot-clip"><rect x="{}" y="{}" width="{}" height="{}"/></clipPath></defs>"#,
        a.x, a.y, a.width, a.height
    );
    let _ = writeln!(
        s,
        r##"<rect id="plot-area" x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        a.x, a.y, a.width, a.height
    );
    // Decade grid and tick labels.
    for d in a.x_decades.0..=a.x_decades.1 {
        let x = a.px(10f64.powi(d));
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#ddd"/>"##, a.y, a.y + a.height);
        let _ = writeln!(
            s,
            r#"<text class="tick x-tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            a.y + a.height + 18.0,
            decade_label(d)
        );
    }
    for d in a.y_decades.0..=a.y_decades.1 {
        let y = a.py(10f64.powi(d));
        let _ = writeln!(s, r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##, a.x, a.x + a.width);
        let _ = writeln!(
            s,
            r#"<text class="tick y-tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            a.x - 8.0,
            y + 4.0,
            decade_label(d)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">arithmetic intensity (FLOP / byte, minimum traffic)</text>"#,
        a.x + a.width / 2.0,
        a.y + a.height + 42.0
    );
    let _ = writeln!(
        s,
        r#"<text x="24" y="{:.1}" text-anchor="middle" transform="rotate(-90 24 {:.1})">achieved TFLOPS</text>"#,
        a.y + a.height / 2.0,
        a.y + a.height / 2.0
    );
    // Ceilings: min(peak, intensity × bandwidth), drawn as a polyline through the ridge point.
    let x_lo = 10f64.powi(a.x_decades.0);
    let x_hi = 10f64.powi(a.x_decades.1);
    let spec_bw = format!("{} TB/s", H200_SPEC.hbm_tbps);
    let mut roofs: Vec<(String, f64, f64, bool, &str)> = vec![
        (
            format!("spec: {spec_bw}, bf16 {} TFLOPS", H200_SPEC.bf16_tflops),
            H200_SPEC.hbm_tbps,
            H200_SPEC.bf16_tflops,
            true,
            "#1f77b4",
        ),
        (
            format!("spec: {spec_bw}, FP8 {} TFLOPS", H200_SPEC.fp8_tflops),
            H200_SPEC.hbm_tbps,
            H200_SPEC.fp8_tflops,
            true,
            "#d62728",
        ),
    ];
    let c = &results.ceilings;
    // Measured roofs: the copy bandwidth (infinite when not measured: horizontal roofs only) under each measured
    // compute rate (infinite when none was measured: the bandwidth line alone).
    let tbps = c.copy_gbps.map_or(f64::INFINITY, |g| g / 1000.0);
    let copy = c.copy_gbps.map(|g| format!("copy {} GB/s", fmt_num(g)));
    let mut computes = Vec::new();
    if let Some(t) = c.bf16_tflops {
        computes.push((format!("cuBLAS bf16 {} TFLOPS", fmt_num(t)), t, "#1f77b4"));
    }
    if let Some(t) = c.fp8_tflops {
        computes.push((format!("cuBLASLt FP8 {} TFLOPS", fmt_num(t)), t, "#d62728"));
    }
    if computes.is_empty() {
        if let Some(copy) = &copy {
            roofs.push((format!("measured: {copy}"), tbps, f64::INFINITY, false, "#555"));
        }
    }
    for (label, t, color) in computes {
        let label = match &copy {
            Some(copy) => format!("measured: {copy}, {label}"),
            None => format!("measured: {label}"),
        };
        roofs.push((label, tbps, t, false, color));
    }
    let _ = writeln!(s, r#"<g clip-path="url(#plot-clip)" fill="none" stroke-width="2">"#);
    for (label, tbps, peak, dashed, color) in &roofs {
        let ridge = peak / tbps;
        let mut pts = vec![(x_lo, (x_lo * tbps).min(*peak))];
        if ridge > x_lo && ridge < x_hi {
            pts.push((ridge, *peak));
        }
        pts.push((x_hi, (x_hi * tbps).min(*peak)));
        let pts: Vec<String> =
            pts.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", a.px(x), a.py(y))).collect();
        let dash = if *dashed { r#" stroke-dasharray="7,5""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline class="roof" points="{}" stroke="{color}"{dash}><title>{}</title></polyline>"#,
            pts.join(" "),
            xml_escape(label)
        );
    }
    let _ = writeln!(s, "</g>");
    // Bandwidth labels along the diagonals, compute labels at the right end of the roofs.
    // The spec bandwidth label sits just above its diagonal, rotated to the diagonal's on-screen slope.
    let label_ai = x_lo * 3.0;
    let (bx, by) = (a.px(label_ai), a.py(label_ai * H200_SPEC.hbm_tbps));
    if by > a.y && by < a.y + a.height {
        let px_per_decade_x = a.width / (a.x_decades.1 - a.x_decades.0) as f64;
        let px_per_decade_y = a.height / (a.y_decades.1 - a.y_decades.0) as f64;
        let angle = (px_per_decade_y / px_per_decade_x).atan().to_degrees();
        let _ = writeln!(
            s,
            r##"<text x="{bx:.1}" y="{:.1}" fill="#555" transform="rotate({:.1} {bx:.1} {:.1})">spec HBM {spec_bw}</text>"##,
            by - 8.0,
            -angle,
            by - 8.0
        );
    }
    // Legend (right of the plot).
    let lx = a.x + a.width + 20.0;
    let mut ly = a.y + 4.0;
    let _ = writeln!(s, r#"<text x="{lx}" y="{ly}" font-weight="bold">ceilings</text>"#);
    for (label, _, _, dashed, color) in &roofs {
        ly += 16.0;
        let dash = if *dashed { r#" stroke-dasharray="7,5""# } else { "" };
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
            ly - 4.0,
            lx + 24.0,
            ly - 4.0
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#, lx + 30.0, xml_escape(label));
    }
    ly += 26.0;
    if plotted.is_empty() {
        let msg = if results.has_device_measurements() {
            "no kernel has both flops and bytes to plot".to_string()
        } else {
            format!("{NO_DEVICE_MEASUREMENTS} of kernels")
        };
        let _ = writeln!(
            s,
            r##"<text class="no-data" x="{:.1}" y="{:.1}" text-anchor="middle" font-size="16" fill="#a00">{}</text>"##,
            a.x + a.width / 2.0,
            a.y + a.height / 2.0,
            xml_escape(&msg)
        );
    } else {
        let _ = writeln!(s, r#"<text x="{lx}" y="{ly}" font-weight="bold">kernels</text>"#);
    }
    // Kernel points, numbered as in the table.
    for (i, k) in &plotted {
        let ai = k.intensity().unwrap_or(1.0);
        let (x, y) = (a.px(ai), a.py(k.tflops()));
        let color = precision_color(k.precision);
        let label = format!("{}. {} [{}] {}", i + 1, k.kernel, k.shape, k.precision.as_str());
        let _ = writeln!(
            s,
            r#"<circle class="kernel" cx="{x:.1}" cy="{y:.1}" r="5" fill="{color}"><title>{}: {} TFLOPS, {} GB/s</title></circle>"#,
            xml_escape(&label),
            fmt_num(k.tflops()),
            fmt_num(k.gbps())
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#, x + 7.0, y - 6.0, i + 1);
        ly += 16.0;
        let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/>"#, lx + 6.0, ly - 4.0);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{ly:.1}" font-size="11">{}</text>"#, lx + 16.0, xml_escape(&label));
    }
    s.push_str("</svg>\n");
    s
}

/// Reads `results_path` and writes `BENCHMARKS.md` and `roofline.svg` into `out_dir`; returns both paths.
pub fn write_report(results_path: &Path, out_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string(results_path)
        .map_err(|e| Error::io(format_args!("reading results {}", results_path.display()), &e))?;
    let results = parse_results(&text).map_err(|e| match e {
        Error::Io { kind, message } => Error::Io { kind, message: format!("{}: {message}", results_path.display()) },
        other => other,
    })?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(format_args!("creating {}", out_dir.display()), &e))?;
    let source = results_path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
    let md_path = out_dir.join("BENCHMARKS.md");
    let svg_path = out_dir.join("roofline.svg");
    std::fs::write(&md_path, render_markdown(&results, &source))
        .map_err(|e| Error::io(format_args!("writing {}", md_path.display()), &e))?;
    std::fs::write(&svg_path, render_roofline_svg(&results))
        .map_err(|e| Error::io(format_args!("writing {}", svg_path.display()), &e))?;
    Ok((md_path, svg_path))
}
