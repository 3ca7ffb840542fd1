//! Runs the engine's standalone C++ self-tests (emu/cpp/tests/*_test.cpp, built by build.rs): the TMA and wgmma
//! models against host-compiled CuTe layouts and swizzles, the hopper numerics against hand-computed cases, and the
//! TMA engine glue against a stand-in engine.

use std::process::Command;

#[test]
fn cpp_self_tests_pass() {
    let dir = std::path::Path::new(env!("R1K_EMU_SELFTEST_DIR"));
    let tests: Vec<&str> = env!("R1K_EMU_SELFTESTS").split(',').filter(|s| !s.is_empty()).collect();
    assert!(tests.len() >= 4, "expected the tma, tma_runtime, wgmma and numerics self-tests, found {tests:?}");
    let mut failed = Vec::new();
    for name in &tests {
        let out = Command::new(dir.join(name)).output().unwrap_or_else(|e| panic!("running self-test {name}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        eprintln!("{name}: {summary}");
        if !out.status.success() {
            eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
            failed.push(*name);
        }
    }
    assert!(failed.is_empty(), "self-tests failed: {failed:?}");
}
