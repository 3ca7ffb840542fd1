//! CPU check that the GPU tests cover every kernel: the list of `extern "C"` entry points is derived from
//! kernels/*.cu (macro-generated instantiations expanded), and each must be named (as a string literal) by some test
//! file. The tests pass those names to `expect_launched` (tests/common/mod.rs), which on the emulated device fails
//! unless the test really launched the kernel. Names in a literal `expect_launched` list that are no kernel are
//! errors too (a typo would cover nothing).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

const ENTRY: &str = "extern \"C\" __global__ void";

/// Skips `__launch_bounds__(…)` (balanced parentheses) and whitespace after an entry-point prefix; returns the rest.
fn skip_launch_bounds(s: &str) -> &str {
    let s = s.trim_start();
    let Some(rest) = s.strip_prefix("__launch_bounds__") else { return s };
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return rest[i + 1..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced __launch_bounds__");
}

/// The name token after the prefix: identifier characters and `##` pastes.
fn name_token(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '#')).unwrap_or(s.len());
    &s[..end]
}

/// Entry points of one source: plain ones as written; a pasted name (`a##P##b`) inside `#define M(P, …)` is
/// expanded for every top-level invocation `M(args)` in the file.
fn kernels_in(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in src.match_indices(ENTRY) {
        let token = name_token(skip_launch_bounds(&src[at + ENTRY.len()..]));
        assert!(!token.is_empty(), "no kernel name after `{ENTRY}` at byte {at}");
        if !token.contains("##") {
            out.push(token.to_string());
            continue;
        }
        let define_at = src[..at].rfind("#define ").expect("a pasted kernel name outside a macro");
        let header = &src[define_at + 8..];
        let (macro_name, params) = header.split_once('(').expect("a function-like macro");
        let params: Vec<&str> = params[..params.find(')').unwrap()].split(',').map(str::trim).collect();
        let parts: Vec<&str> = token.split("##").collect();
        for line in src.lines() {
            let Some(args) = line.strip_prefix(macro_name).and_then(|r| r.strip_prefix('(')) else { continue };
            let Some(args) = args.trim_end().strip_suffix(')') else { continue };
            let args: Vec<&str> = args.split(',').map(str::trim).collect();
            assert_eq!(args.len(), params.len(), "{macro_name} invocation `{line}`");
            let name: String =
                parts.iter().map(|p| params.iter().position(|q| q == p).map_or(*p, |i| args[i])).collect();
            out.push(name);
        }
    }
    out
}

/// Every string literal of each `expect_launched(gpu, &[…], …)` call whose list is written out in a test source
/// (calls with a computed list are skipped: their names are literals elsewhere in the file).
fn named_in_tests(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in src.match_indices("expect_launched(") {
        let rest = &src[at + "expect_launched(".len()..];
        let Some(comma) = rest.find(',') else { continue };
        let list = rest[comma + 1..].trim_start();
        if !list.starts_with("&[") || list.starts_with("&[]") {
            continue;
        }
        let close = list.find(']').expect("closing ]");
        out.extend(list[2..close].split('"').skip(1).step_by(2).map(str::to_string));
    }
    out
}

fn read_dir_sources(dir: &Path, ext: &str) -> Vec<(String, String)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read_to_string(&p).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn cpu_every_kernel_is_named_by_a_test_that_launches_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels: BTreeSet<String> =
        read_dir_sources(&root.join("kernels"), "cu").iter().flat_map(|(_, s)| kernels_in(s)).collect();
    // The macro expansion found the instantiations (a parser regression would shrink the list silently).
    for expected in ["fp8_gemm_sm90_m128n160", "fp8_gemm_sm90_mc2_m128n128", "mla_decode_sm90_narrow32_fp8"] {
        assert!(kernels.contains(expected), "kernel list lacks {expected}: {kernels:?}");
    }
    let tests: Vec<(String, String)> =
        read_dir_sources(&root.join("tests"), "rs").into_iter().filter(|(f, _)| f != "coverage.rs").collect();
    let named_by = |k: &str| tests.iter().find(|(_, src)| src.contains(&format!("\"{k}\""))).map(|(f, _)| f.clone());
    let missing: Vec<_> = kernels.iter().filter(|k| named_by(k).is_none()).collect();
    let listed: BTreeSet<String> = tests.iter().flat_map(|(_, src)| named_in_tests(src)).collect();
    let unknown: Vec<_> = listed.difference(&kernels).collect();
    for k in &kernels {
        eprintln!("{k}: {}", named_by(k).unwrap_or_else(|| "NOT NAMED".into()));
    }
    assert!(missing.is_empty(), "kernels no test names: {missing:?}");
    assert!(unknown.is_empty(), "expect_launched names that are no kernel: {unknown:?}");
}

#[test]
fn cpu_kernel_list_parser_hand_cases() {
    let src = "extern \"C\" __global__ void __launch_bounds__((BM / 64 + 1) * 128, 1) plain_one(int a) {}\n\
               #define ENTRY(BM, BN) \\\n    extern \"C\" __global__ void k_m##BM##n##BN(int x) {}\n\
               ENTRY(64, 112)\nENTRY(128, 64)\n\
               extern \"C\" __global__ void\n    two_lines(int a) {}\n";
    assert_eq!(kernels_in(src), ["plain_one", "k_m64n112", "k_m128n64", "two_lines"]);
    let test = "expect_launched(&gpu, &[\"a\", \"b_c\"], || run());\nexpect_launched(\n  &gpu,\n  &[\"d\"],\n  f)\n\
                expect_launched(gpu, &kernels, || f(&[\"x\"]))";
    assert_eq!(named_in_tests(test), ["a", "b_c", "d"]);
}
