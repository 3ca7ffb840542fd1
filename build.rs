//! Compiles every `kernels/*.cu` with nvcc into an sm_90a cubin (plus portable compute_80 PTX for kernels marked
//! `// r1k: portable`), saves each ptxas report next to its cubin, checks the reports for register spills, and
//! generates `kernels.rs` in OUT_DIR that embeds the results.
//!
//! Without nvcc the crate builds CPU-only (GPU entry points return `Error::KernelsNotBuilt`) with a warning, unless
//! the `require-kernels` feature or `R1K_REQUIRE_KERNELS=1` makes that an error. A spill is a warning, so a different
//! nvcc cannot break a dependent's build; `R1K_REQUIRE_KERNELS=1` (set by the repository's CI) makes it an error.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCH_FLAGS: &[&str] = &["-gencode=arch=compute_90a,code=sm_90a"];
const PORTABLE_FLAGS: &[&str] = &["-gencode=arch=compute_80,code=compute_80"];
const COMMON_FLAGS: &[&str] = &["-O3", "-std=c++17", "-Xptxas", "-v", "--expt-relaxed-constexpr"];

struct Kernel {
    stem: String,
    source: PathBuf,
    portable: bool,
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels_dir = manifest_dir.join("kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUTLASS_DIR", "R1K_REQUIRE_KERNELS", "R1K_TOOLCHAIN_DIR"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rustc-check-cfg=cfg(r1k_kernels_built)");

    // R1K_REQUIRE_KERNELS=1 is the repository's CI switch: nvcc must be found and no kernel may spill. The
    // `require-kernels` feature is a dependent's: nvcc must be found.
    let ci_switch = env::var("R1K_REQUIRE_KERNELS").map(|v| v == "1").unwrap_or(false);
    let require = ci_switch || env::var_os("CARGO_FEATURE_REQUIRE_KERNELS").is_some();
    let toolchain_dir =
        env::var_os("R1K_TOOLCHAIN_DIR").map(PathBuf::from).unwrap_or_else(|| manifest_dir.join(".cuda-toolchain"));
    let stamp = toolchain_dir.join(".installed");
    if stamp.exists() {
        println!("cargo:rerun-if-changed={}", stamp.display());
    }

    let kernels = discover_kernels(&kernels_dir);
    let Some(nvcc) = find_nvcc(&toolchain_dir) else {
        if require {
            let why = if ci_switch { "R1K_REQUIRE_KERNELS=1" } else { "the `require-kernels` feature is on" };
            panic!(
                "r1-kernels: {why} but nvcc was not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, {}, \
                 $PATH). Install the CUDA toolkit's nvcc or point NVCC or CUDA_HOME at one; in a \
                 checkout of the r1-kernels repository, scripts/setup-cuda-toolchain installs the pinned toolchain.",
                toolchain_dir.join("bin").display()
            );
        }
        println!(
            "cargo:warning=r1-kernels: nvcc not found, building CPU-only (GPU entry points return \
             Error::KernelsNotBuilt). Install the CUDA toolkit's nvcc or set NVCC or CUDA_HOME, then `cargo clean -p \
             r1-kernels` and rebuild; enable the `require-kernels` feature to make this an error."
        );
        write_registry(&out_dir, &[], false);
        return;
    };

    let mut include_flags = vec![format!("-I{}", kernels_dir.display())];
    if let Some(cutlass) = find_cutlass(&toolchain_dir) {
        include_flags.push(format!("-I{}", cutlass.display()));
    }
    let common_hash = hash_common_headers(&kernels_dir, &nvcc, &include_flags);

    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = kernels
            .iter()
            .map(|kernel| {
                let (nvcc, out_dir, include_flags) = (&nvcc, &out_dir, &include_flags);
                scope.spawn(move || compile_kernel(nvcc, kernel, out_dir, include_flags, common_hash))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("compile thread panicked".into()))).collect()
    });
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if !failures.is_empty() {
        panic!("r1-kernels: kernel build failed:\n{}", failures.join("\n\n"));
    }
    // Checked on every run from the saved reports (not only when a kernel was recompiled), so turning the CI switch
    // on after a build that only warned still fails.
    let spills = spill_report(&kernels, &out_dir);
    if !spills.is_empty() {
        if ci_switch {
            panic!("r1-kernels: register spills are not allowed (R1K_REQUIRE_KERNELS=1):\n{}", spills.join("\n"));
        }
        for spill in &spills {
            println!("cargo:warning=r1-kernels: register spill (the kernel still works, slower): {spill}");
        }
    }
    write_registry(&out_dir, &kernels, true);
    println!("cargo:rustc-cfg=r1k_kernels_built");
}

fn discover_kernels(kernels_dir: &Path) -> Vec<Kernel> {
    let mut kernels = Vec::new();
    let Ok(entries) = fs::read_dir(kernels_dir) else { return kernels };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("cu") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap_or_default();
        let portable = text.lines().any(|l| l.trim() == "// r1k: portable");
        kernels.push(Kernel { stem: path.file_stem().unwrap().to_string_lossy().into_owned(), source: path, portable });
    }
    kernels.sort_by(|a, b| a.stem.cmp(&b.stem));
    kernels
}

fn executable(path: PathBuf) -> Option<PathBuf> {
    path.is_file().then_some(path)
}

fn find_nvcc(toolchain_dir: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return executable(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            if let Some(p) = executable(PathBuf::from(home).join("bin/nvcc")) {
                return Some(p);
            }
        }
    }
    if let Some(p) = executable(toolchain_dir.join("bin/nvcc")) {
        return Some(p);
    }
    env::var_os("PATH").and_then(|paths| env::split_paths(&paths).find_map(|dir| executable(dir.join("nvcc"))))
}

fn find_cutlass(toolchain_dir: &Path) -> Option<PathBuf> {
    if let Some(dir) = env::var_os("CUTLASS_DIR") {
        let dir = PathBuf::from(dir);
        for candidate in [dir.join("include"), dir.clone()] {
            if candidate.join("cute").is_dir() {
                return Some(candidate);
            }
        }
    }
    let pinned = toolchain_dir.join("cutlass-include");
    pinned.join("cute").is_dir().then_some(pinned)
}

fn hash_common_headers(kernels_dir: &Path, nvcc: &Path, include_flags: &[String]) -> u64 {
    let mut hasher = DefaultHasher::new();
    nvcc.hash(&mut hasher);
    include_flags.hash(&mut hasher);
    (ARCH_FLAGS, PORTABLE_FLAGS, COMMON_FLAGS).hash(&mut hasher);
    let mut headers = Vec::new();
    collect_files(&kernels_dir.join("common"), &mut headers);
    headers.sort();
    for h in headers {
        h.hash(&mut hasher);
        fs::read(&h).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

/// Every file under `dir`, recursively (the shared headers live in subfolders such as `common/sm90/`).
fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn run_nvcc(nvcc: &Path, args: &[String]) -> Result<String, String> {
    let output =
        Command::new(nvcc).args(args).output().map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("nvcc {} failed:\n{text}", args.join(" ")))
    }
}

/// Returns the kernels (function names) whose ptxas lines report non-zero spill bytes.
fn spilling_functions(report: &str) -> Vec<String> {
    let mut current = String::from("?");
    let mut spills = Vec::new();
    for line in report.lines() {
        if let Some(pos) = line.find("Compiling entry function '") {
            let rest = &line[pos + "Compiling entry function '".len()..];
            current = rest.split('\'').next().unwrap_or("?").to_string();
        } else if let Some(pos) = line.find("Function properties for ") {
            current = line[pos + "Function properties for ".len()..].trim().to_string();
        }
        if line.contains("bytes spill stores") {
            let numbers: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            // "N bytes stack frame, S bytes spill stores, L bytes spill loads"
            if numbers.len() >= 3 && (numbers[1] > 0 || numbers[2] > 0) {
                spills.push(format!("{current}: {}", line.trim()));
            }
        }
    }
    spills
}

/// One line per spilling function of every kernel, read from the ptxas reports saved next to the cubins.
fn spill_report(kernels: &[Kernel], out_dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for kernel in kernels {
        let report_path = out_dir.join(format!("{}.ptxas.txt", kernel.stem));
        let report = fs::read_to_string(&report_path).unwrap_or_default();
        for spill in spilling_functions(&report) {
            lines.push(format!("{} ({}): {spill}", kernel.source.display(), report_path.display()));
        }
    }
    lines
}

fn compile_kernel(
    nvcc: &Path,
    kernel: &Kernel,
    out_dir: &Path,
    include_flags: &[String],
    common_hash: u64,
) -> Result<(), String> {
    let source = fs::read(&kernel.source).map_err(|e| format!("{}: {e}", kernel.source.display()))?;
    let mut hasher = DefaultHasher::new();
    common_hash.hash(&mut hasher);
    source.hash(&mut hasher);
    kernel.portable.hash(&mut hasher);
    let hash = format!("{:016x}", hasher.finish());

    let cubin = out_dir.join(format!("{}.sm_90a.cubin", kernel.stem));
    let report_path = out_dir.join(format!("{}.ptxas.txt", kernel.stem));
    let ptx = out_dir.join(format!("{}.compute_80.ptx", kernel.stem));
    let hash_path = out_dir.join(format!("{}.hash", kernel.stem));
    let up_to_date = fs::read_to_string(&hash_path).map(|h| h == hash).unwrap_or(false)
        && cubin.exists()
        && report_path.exists()
        && (!kernel.portable || ptx.exists());
    if up_to_date {
        return Ok(());
    }
    let _ = fs::remove_file(&hash_path);

    let src = kernel.source.display().to_string();
    let mut args: Vec<String> = ARCH_FLAGS.iter().chain(COMMON_FLAGS).map(|s| s.to_string()).collect();
    args.extend(include_flags.iter().cloned());
    args.extend(["-cubin".into(), "-o".into(), cubin.display().to_string(), src.clone()]);
    let report = run_nvcc(nvcc, &args)?;
    fs::write(&report_path, &report).map_err(|e| e.to_string())?;

    if kernel.portable {
        let mut args: Vec<String> = PORTABLE_FLAGS.iter().map(|s| s.to_string()).collect();
        args.extend(["-O3", "-std=c++17", "--expt-relaxed-constexpr"].iter().map(|s| s.to_string()));
        args.extend(include_flags.iter().cloned());
        args.extend(["-ptx".into(), "-o".into(), ptx.display().to_string(), src]);
        run_nvcc(nvcc, &args)?;
    }
    fs::write(&hash_path, &hash).map_err(|e| e.to_string())?;
    Ok(())
}

fn write_registry(out_dir: &Path, kernels: &[Kernel], built: bool) {
    let mut code = String::from("// @generated by build.rs\n");
    code.push_str(&format!("pub const KERNELS_BUILT: bool = {built};\n"));
    code.push_str("pub static CUBINS: &[(&str, &[u8])] = &[\n");
    for k in kernels {
        let path = out_dir.join(format!("{}.sm_90a.cubin", k.stem));
        code.push_str(&format!("    ({:?}, include_bytes!({:?})),\n", k.stem, path.display().to_string()));
    }
    code.push_str("];\npub static PTX: &[(&str, &str)] = &[\n");
    for k in kernels.iter().filter(|k| k.portable) {
        let path = out_dir.join(format!("{}.compute_80.ptx", k.stem));
        code.push_str(&format!("    ({:?}, include_str!({:?})),\n", k.stem, path.display().to_string()));
    }
    code.push_str("];\npub static PTXAS_REPORTS: &[(&str, &str)] = &[\n");
    for k in kernels {
        let path = out_dir.join(format!("{}.ptxas.txt", k.stem));
        code.push_str(&format!("    ({:?}, include_str!({:?})),\n", k.stem, path.display().to_string()));
    }
    code.push_str("];\n");
    fs::write(out_dir.join("kernels.rs"), code).expect("write kernels.rs");
}
