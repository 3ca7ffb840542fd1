//! The benchmark-report pipeline: results-file parsing, the Markdown table, and the roofline SVG (parsed back to check
//! it is well-formed, that every point lies inside the plot and that the axes have their ticks).
//!
//! EVERY NUMBER IN THIS FILE IS A FAKE TEST FIXTURE, not a measurement. Reports are written to temporary directories
//! only, never to docs/.

// The report is the `report` example's code, not the library's: its results module is compiled in here.
#[path = "../examples/report/results.rs"]
#[allow(dead_code)]
mod results;

use results::{
    parse_results, plot_area, render_markdown, render_roofline_svg, write_report, Ceilings, KernelResult, Peer,
    Precision, Results, NO_DEVICE_MEASUREMENTS,
};

/// A fake results file (made-up numbers for tests only).
const FAKE: &str = "# FAKE TEST FIXTURE: these numbers are invented, not measured\n\
meta\tdate\t2000-01-01\n\
meta\tcommit\tfake000\n\
meta\tdevice\tFAKE DEVICE (test fixture)\n\
ceiling\tcopy_gbps\t1000\n\
ceiling\tbf16_tflops\t500\n\
\n\
kernel\tfp8_gemm\tm=128 n=7168 k=2048\tfp8\t20\t3758096384\t15597568\tcublas_bf16\t40\n\
kernel\tmla_decode\tb=64 ctx=4096\tbf16\t100\t1.2e9\t3.1e8\t-\t-\n\
kernel\tquant_act\tm=4096 k=7168\tmem\t50\t0\t8.9e7\t-\t-\n\
note\tfake note | with a pipe\n";

fn fake() -> Results {
    parse_results(FAKE).unwrap()
}

#[test]
fn parses_every_record_type() {
    let r = fake();
    assert_eq!(r.meta["date"], "2000-01-01");
    assert_eq!(r.meta_or_unknown("commit"), "fake000");
    assert_eq!(r.meta_or_unknown("nope"), "unknown");
    assert_eq!(r.ceilings, Ceilings { copy_gbps: Some(1000.0), bf16_tflops: Some(500.0), fp8_tflops: None });
    assert_eq!(r.kernels.len(), 3);
    let g = &r.kernels[0];
    assert_eq!((g.kernel.as_str(), g.shape.as_str(), g.precision), ("fp8_gemm", "m=128 n=7168 k=2048", Precision::Fp8));
    assert_eq!(g.peer, Some(Peer { name: "cublas_bf16".into(), time_us: 40.0 }));
    // 2·128·7168·2048 flops in 20 µs = 187.9 TFLOPS.
    assert!((g.tflops() - 187.904819).abs() < 1e-3, "{}", g.tflops());
    assert!((g.gbps() - 779.8784).abs() < 1e-3, "{}", g.gbps());
    assert_eq!(g.speedup_vs_peer(), Some(2.0));
    assert_eq!(r.kernels[1].peer, None);
    assert_eq!(r.kernels[2].intensity(), None);
    assert_eq!(r.notes, vec!["fake note | with a pipe".to_string()]);
    // Round trip through the writer.
    assert_eq!(parse_results(&r.to_text()).unwrap(), r);
}

#[test]
fn malformed_lines_are_errors_with_line_numbers() {
    for (text, needle) in [
        ("meta\tdate\n", "line 1"),
        ("# c\nceiling\tcopy_gbps\tfast\n", "line 2"),
        ("ceiling\twarp_speed\t3\n", "unknown ceiling"),
        ("kernel\tk\ts\tfp8\t10\t1\t1\t-\n", "8 fields"),
        ("kernel\tk\ts\tfp4\t10\t1\t1\t-\t-\n", "precision"),
        ("kernel\tk\ts\tfp8\t0\t1\t1\t-\t-\n", "time_us"),
        ("kernel\tk\ts\tfp8\t-3\t1\t1\t-\t-\n", "time_us"),
        ("kernel\tk\ts\tfp8\tNaN\t1\t1\t-\t-\n", "time_us"),
        ("kernel\tk\ts\tfp8\t1\t1\t1\tpeer\t-\n", "peer_time_us"),
        ("kernal\tk\n", "unknown record type"),
    ] {
        match parse_results(text) {
            Err(r1_kernels::Error::Io { kind: std::io::ErrorKind::InvalidData, message }) => {
                assert!(message.contains(needle), "{text:?}: {message}")
            }
            other => panic!("{text:?}: expected an error, got {other:?}"),
        }
    }
    // CRLF line endings and blank lines are fine.
    assert_eq!(parse_results("meta\tdate\tx\r\n\r\n").unwrap().meta["date"], "x");
}

#[test]
fn table_has_every_kernel_and_the_derived_columns() {
    let md = render_markdown(&fake(), "fake.tsv");
    assert!(md.contains("Measured on **FAKE DEVICE (test fixture)**, 2000-01-01, commit `fake000`"));
    assert!(!md.contains(NO_DEVICE_MEASUREMENTS));
    // Ceilings table: measured vs spec.
    assert!(md.contains("| device-to-device copy bandwidth | 1000 GB/s | 4800 GB/s | 21% |"), "{md}");
    assert!(md.contains("| cuBLAS bf16 GEMM | 500 TFLOPS | 989 TFLOPS | 51% |"), "{md}");
    assert!(md.contains("| cuBLASLt FP8 GEMM | not measured |"));
    // The FP8 GEMM row: 188 TFLOPS = 38% of the bf16 roof (flagged, no FP8 ceiling), 780 GB/s = 78% of copy, 2×.
    let row = md.lines().find(|l| l.contains("fp8_gemm")).unwrap();
    assert_eq!(
        row,
        "| 1 | fp8_gemm | m=128 n=7168 k=2048 | fp8 | 20.0 | 188 | 780 | 38% † | 78% | cublas_bf16 | 2.00× |"
    );
    assert!(md.contains("† FP8 kernel compared with the measured bf16 cuBLAS rate"));
    let row = md.lines().find(|l| l.contains("mla_decode")).unwrap();
    assert_eq!(row, "| 2 | mla_decode | b=64 ctx=4096 | bf16 | 100 | 12.0 | 3100 | 2% | 310% | — | — |");
    let row = md.lines().find(|l| l.contains("quant_act")).unwrap();
    assert_eq!(row, "| 3 | quant_act | m=4096 k=7168 | mem | 50.0 | — | 1780 | — | 178% | — | — |");
    // Pipes in free text are escaped so the table is not broken.
    assert!(md.contains("fake note \\| with a pipe") || md.contains("fake note | with a pipe"));
    assert!(md.contains("![Roofline](roofline.svg)"));
    // Every table row has the same number of cells as the header.
    let cells = |l: &str| l.replace("\\|", "").matches('|').count();
    let header = md.lines().find(|l| l.starts_with("| # |")).unwrap();
    let rows: Vec<&str> =
        md.lines().filter(|l| l.starts_with("| ") && l[2..3].chars().all(|c| c.is_ascii_digit())).collect();
    assert_eq!(rows.len(), 3);
    for l in rows {
        assert_eq!(cells(l), cells(header), "{l}");
    }
}

#[test]
fn no_gpu_rows_says_so() {
    let text = "meta\tdate\t2000-01-01\nmeta\tcommit\tfake000\nmeta\tdevice\tnone\nnote\tno CUDA driver found\n";
    let r = parse_results(text).unwrap();
    assert!(!r.has_device_measurements());
    let md = render_markdown(&r, "empty.tsv");
    assert!(md.contains("**No device measurements.**"), "{md}");
    assert!(md.contains("no CUDA driver found"));
    assert!(!md.contains("| # |"), "no kernel table without kernels");
    let svg = render_roofline_svg(&r);
    assert!(svg.contains(NO_DEVICE_MEASUREMENTS));
    check_svg(&svg, &r);
    // Measured ceilings without kernel rows: still no kernel measurements, but the ceilings are reported.
    let r = parse_results("ceiling\tcopy_gbps\t1000\n").unwrap();
    let md = render_markdown(&r, "ceil.tsv");
    assert!(md.contains("**No device measurements.**") && md.contains("copy bandwidth 1000 GB/s"), "{md}");
    check_svg(&render_roofline_svg(&r), &r);
    // An empty file too.
    let md = render_markdown(&parse_results("").unwrap(), "empty.tsv");
    assert!(md.contains("No device measurements"));
}

/// Minimal XML well-formedness: every tag closes in order, attributes are quoted, text has no raw `<` or `&`.
fn check_well_formed(svg: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut stack: Vec<String> = Vec::new();
    let mut elements = Vec::new();
    let mut rest = svg.trim_start();
    assert!(rest.starts_with("<?xml"), "XML declaration first");
    rest = &rest[rest.find("?>").unwrap() + 2..];
    let mut seen_root = false;
    while let Some(lt) = rest.find('<') {
        let text = &rest[..lt];
        assert!(!text.contains('>'), "stray '>' in text {text:?}");
        for (i, _) in text.match_indices('&') {
            let ent = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| ent.starts_with(e)),
                "bad entity in {text:?}"
            );
        }
        if stack.is_empty() && seen_root {
            panic!("content after the root element");
        }
        let gt = rest[lt..].find('>').unwrap() + lt;
        let tag = &rest[lt + 1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "mismatched </{name}>");
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name = tag.split_whitespace().next().unwrap().to_string();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':'), "tag name {name}");
        // Attributes: name="value" pairs, nothing else.
        let mut attrs = Vec::new();
        let mut a = tag[name.len()..].trim();
        while !a.is_empty() {
            let eq = a.find("=\"").unwrap_or_else(|| panic!("unquoted attribute in <{tag}>"));
            let key = a[..eq].trim().to_string();
            let end = a[eq + 2..].find('"').unwrap() + eq + 2;
            let value = a[eq + 2..end].to_string();
            assert!(!value.contains('<'), "raw '<' in attribute");
            attrs.push((key, value));
            a = a[end + 1..].trim();
        }
        if stack.is_empty() {
            assert_eq!(name, "svg", "root element");
            seen_root = true;
        }
        elements.push((name.clone(), attrs));
        if !self_closing {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert!(seen_root);
    elements
}

fn attr<'a>(e: &'a (String, Vec<(String, String)>), key: &str) -> Option<&'a str> {
    e.1.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn check_svg(svg: &str, r: &Results) {
    let elements = check_well_formed(svg);
    let area = elements.iter().find(|e| attr(e, "id") == Some("plot-area")).expect("plot-area rect");
    let f = |k| attr(area, k).unwrap().parse::<f64>().unwrap();
    let (x, y, w, h) = (f("x"), f("y"), f("width"), f("height"));
    let a = plot_area(r);
    assert_eq!((x, y, w, h), (a.x, a.y, a.width, a.height));
    // Every kernel with flops and bytes is a point inside the plot area.
    let points: Vec<_> = elements.iter().filter(|e| attr(e, "class") == Some("kernel")).collect();
    assert_eq!(points.len(), r.kernels.iter().filter(|k| k.intensity().is_some()).count());
    for p in &points {
        let cx: f64 = attr(p, "cx").unwrap().parse().unwrap();
        let cy: f64 = attr(p, "cy").unwrap().parse().unwrap();
        assert!(cx >= x && cx <= x + w && cy >= y && cy <= y + h, "point ({cx}, {cy}) outside the plot");
    }
    // One tick per decade on each axis, in increasing order.
    let ticks = |class: &str, coord: &str| -> Vec<f64> {
        elements
            .iter()
            .filter(|e| attr(e, "class") == Some(class))
            .map(|e| attr(e, coord).unwrap().parse::<f64>().unwrap())
            .collect()
    };
    let xt = ticks("tick x-tick", "x");
    let yt = ticks("tick y-tick", "y");
    assert_eq!(xt.len() as i32, a.x_decades.1 - a.x_decades.0 + 1);
    assert_eq!(yt.len() as i32, a.y_decades.1 - a.y_decades.0 + 1);
    assert!(xt.windows(2).all(|w| w[0] < w[1]) && yt.windows(2).all(|w| w[0] > w[1]));
    assert!((xt[0] - x).abs() < 0.1 && (xt[xt.len() - 1] - (x + w)).abs() < 0.1);
    // The spec roofs are always drawn, dashed.
    let roofs: Vec<_> = elements.iter().filter(|e| attr(e, "class") == Some("roof")).collect();
    assert!(roofs.iter().filter(|e| attr(e, "stroke-dasharray").is_some()).count() >= 2);
}

#[test]
fn svg_is_well_formed_with_points_in_the_plot() {
    let r = fake();
    let svg = render_roofline_svg(&r);
    check_svg(&svg, &r);
    assert!(svg.contains(">1000</text>") && svg.contains(">0.1</text>"), "decade tick labels");
    assert!(svg.contains("spec: 4.8 TB/s, FP8 1979 TFLOPS") && svg.contains("spec: 4.8 TB/s, bf16 989 TFLOPS"));
    assert!(svg.contains("measured: copy 1000 GB/s, cuBLAS bf16 500 TFLOPS"));
    // Two points (quant_act has no flops), numbered like the table.
    assert!(svg.contains("1. fp8_gemm [m=128 n=7168 k=2048] fp8"));
    assert!(!svg.contains("quant_act"));
    // Names needing escapes stay well-formed; extreme values widen the axes instead of leaving the plot.
    let mut r = fake();
    r.kernels.push(KernelResult {
        kernel: "weird <&> \"name\"".into(),
        shape: "tiny".into(),
        precision: Precision::F32,
        time_us: 1e6,
        flops: 10.0,
        bytes: 1e9,
        peer: None,
    });
    let svg = render_roofline_svg(&r);
    check_svg(&svg, &r);
    assert!(plot_area(&r).x_decades.0 < -1 && plot_area(&r).y_decades.0 < -1);
}

#[test]
fn write_report_to_a_temporary_directory() {
    let dir = std::env::temp_dir().join(format!("r1k-test-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let results = dir.join("fake-results.tsv");
    std::fs::write(&results, FAKE).unwrap();
    let (md, svg) = write_report(&results, &dir.join("out")).unwrap();
    assert!(std::fs::read_to_string(md).unwrap().contains("fake-results.tsv"));
    check_well_formed(&std::fs::read_to_string(svg).unwrap());
    std::fs::write(&results, "kernel\tbroken\n").unwrap();
    match write_report(&results, &dir.join("out")) {
        Err(r1_kernels::Error::Io { kind: std::io::ErrorKind::InvalidData, message }) => {
            assert!(message.contains("fake-results.tsv") && message.contains("line 1"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let missing = write_report(&dir.join("missing.tsv"), &dir.join("out"));
    assert!(matches!(missing, Err(r1_kernels::Error::Io { kind: std::io::ErrorKind::NotFound, .. })), "{missing:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
