//! Builds the emulator's execution engine and the crate's kernels as host code:
//! 1. every `kernels/*.cu` (discovered, not listed) is preprocessed by g++ with cpp/prelude.h force-included,
//!    lifted (build/lift.rs: inline PTX → interpreter calls, `__shared__` → per-CTA storage, kernel registry) and
//!    compiled;
//! 2. every inline-PTX template found is checked against the interpreter's parser (cpp/ptx_parse.cpp); an unknown
//!    template fails the build with the list of what is missing;
//! 3. the engine (cpp/*.cpp) and the kernels are archived into one static library linked into libcuda.so;
//! 4. every CUDA driver entry point that src/ does not implement gets a stub that fails loudly with its name.
//!
//! `R1K_EMU_ASAN=1` compiles kernels and engine with AddressSanitizer.

#[path = "build/lift.rs"]
mod lift;
#[path = "build/stubs.rs"]
mod stubs;

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let repo = manifest.parent().unwrap().to_path_buf();
    let kernels_dir = repo.join("kernels");
    let cpp_dir = manifest.join("cpp");
    for p in ["build.rs", "build", "cpp", "src"] {
        println!("cargo:rerun-if-changed={}", manifest.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    for list in ["mutants.txt", "../tests/kernel-mutants.txt"] {
        println!("cargo:rerun-if-changed={}", manifest.join(list).display());
    }
    for var in ["R1K_TOOLCHAIN_DIR", "R1K_EMU_ASAN", "R1K_EMU_MUTANTS", "CXX"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let toolchain = env::var_os("R1K_TOOLCHAIN_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join(".cuda-toolchain"));
    let cuda_include = toolchain.join("include");
    if !cuda_include.join("cuda.h").exists() {
        panic!(
            "r1k-emu needs the CUDA headers of the pinned toolchain ({} has no cuda.h): run scripts/setup-cuda-toolchain",
            cuda_include.display()
        );
    }
    let asan = env::var("R1K_EMU_ASAN").map(|v| v == "1").unwrap_or(false);
    let cxx = env::var("CXX").unwrap_or_else(|_| "g++".into());

    // Driver stubs for every entry point src/ does not implement.
    let implemented = stubs::implemented_names(&manifest.join("src"));
    let implemented: Vec<&str> = implemented.iter().map(String::as_str).collect();
    stubs::generate(&cuda_include.join("cuda.h"), &implemented, &out.join("driver_stubs.rs"));

    let mut common: Vec<String> = vec![
        "-std=c++17".into(),
        "-fPIC".into(),
        "-fno-strict-aliasing".into(),
        "-ffp-contract=off".into(),
        "-fwrapv".into(),
        "-g1".into(),
        format!("-I{}", cpp_dir.display()),
        format!("-I{}", cuda_include.display()),
    ];
    if asan {
        common.extend(["-fsanitize=address".into(), "-fno-omit-frame-pointer".into(), "-DR1K_EMU_ASAN=1".into()]);
    }
    // fmaf (the kernels' promotion and softmax steps) is a library call without the FMA instructions; they give the
    // same exactly-rounded result, much faster. Only used when the building machine (which runs the tests) has them.
    if fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.split_whitespace().any(|w| w == "fma")) {
        common.push("-mfma".into());
    }
    let obj_dir = out.join(if asan { "obj-asan" } else { "obj" });
    fs::create_dir_all(&obj_dir).unwrap();

    // ---- kernels ----
    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels_dir)
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("cu"))
        .collect();
    sources.sort();
    let kernels_abs = kernels_dir.canonicalize().unwrap().display().to_string();
    let mut jobs: Vec<Job> = Vec::new();
    let mut all_sites = Vec::new();
    let mut all_kernels = Vec::new();
    let mut stems = Vec::new();
    let mut preprocessed: Vec<(String, String)> = Vec::new(); // (stem, preprocessed text)
    for src in &sources {
        let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
        let mut pre = Command::new(&cxx);
        pre.args(&common)
            .arg(format!("-I{}", kernels_dir.display()))
            .arg("-include")
            .arg(cpp_dir.join("prelude.h"))
            .args(["-E", "-x", "c++"])
            .arg(src.canonicalize().unwrap());
        let pre_out = pre.output().expect("run g++ -E");
        if !pre_out.status.success() {
            panic!("preprocessing {} failed:\n{}", src.display(), String::from_utf8_lossy(&pre_out.stderr));
        }
        let text = String::from_utf8(pre_out.stdout).unwrap();
        let lifted =
            lift::lift(&text, &kernels_abs, &stem).unwrap_or_else(|e| panic!("lifting {}: {e}", src.display()));
        preprocessed.push((stem.clone(), text.clone()));
        let lifted_path = obj_dir.join(format!("{stem}.lifted.cpp"));
        write_if_changed(&lifted_path, &lifted.code);
        all_kernels.extend(lifted.kernels.iter().cloned());
        all_sites.extend(lifted.asm_sites);
        stems.push(stem.clone());
        jobs.push(Job {
            source: lifted_path,
            object: obj_dir.join(format!("{stem}.kernel.o")),
            flags: {
                let mut f = common.clone();
                f.extend(["-O2".into(), "-w".into(), "-x".into(), "c++".into()]);
                f
            },
            deps_hash: 0,
        });
    }
    if all_kernels.is_empty() {
        panic!("no extern \"C\" __global__ kernels found in {}", kernels_dir.display());
    }

    // ---- template check: every asm template must parse and be supported by the interpreter ----
    let mut tcode =
        String::from("#include \"ptx_parse.h\"\nconst r1k_emu::TemplateSite r1k_emu_template_sites[] = {\n");
    for s in &all_sites {
        let cons: Vec<String> = s.constraints.iter().map(|c| format!("\"{c}\"")).collect();
        tcode += &format!(
            "  {{\"{}\", {}, {{{}}}, {}}},\n",
            s.site,
            s.template_literals,
            if cons.is_empty() { "nullptr".to_string() } else { cons.join(", ") },
            s.constraints.len()
        );
    }
    tcode += &format!("}};\nconst int r1k_emu_template_site_count = {};\n", all_sites.len());
    tcode +=
        "int main() { return r1k_emu::check_template_sites(r1k_emu_template_sites, r1k_emu_template_site_count); }\n";
    let tpath = out.join("template_check.cpp");
    write_if_changed(&tpath, &tcode);
    let checker = out.join("template_check");
    let status = Command::new(&cxx)
        .args(["-std=c++17", "-O1"])
        .arg(format!("-I{}", cpp_dir.display()))
        .arg(&tpath)
        .arg(cpp_dir.join("ptx_parse.cpp"))
        .arg("-o")
        .arg(&checker)
        .status()
        .expect("run g++");
    assert!(status.success(), "building the template checker failed");
    let check = Command::new(&checker).output().expect("run template checker");
    if !check.status.success() {
        panic!(
            "inline-PTX templates the emulator does not support:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }

    // ---- engine ----
    let header_hash = {
        let mut h = DefaultHasher::new();
        for e in sorted_dir(&cpp_dir) {
            if e.extension().and_then(|x| x.to_str()) == Some("h") {
                fs::read(&e).unwrap().hash(&mut h);
            }
        }
        h.finish()
    };
    let mut link_all = String::new();
    for s in &stems {
        link_all += &format!("extern \"C\" void r1k_emu_tu_{}();\n", c_ident(s));
    }
    link_all += "extern \"C\" void r1k_emu_link_all_kernels() {\n";
    for s in &stems {
        link_all += &format!("  r1k_emu_tu_{}();\n", c_ident(s));
    }
    link_all += "}\n";
    let link_path = obj_dir.join("link_all_kernels.cpp");
    write_if_changed(&link_path, &link_all);
    for src in sorted_dir(&cpp_dir).into_iter().chain(std::iter::once(link_path)) {
        if src.extension().and_then(|x| x.to_str()) != Some("cpp") {
            continue;
        }
        let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
        let mut flags = common.clone();
        flags.extend(["-O2".into(), "-Wall".into(), "-Wextra".into(), "-Wno-unused-parameter".into()]);
        jobs.push(Job { source: src, object: obj_dir.join(format!("{stem}.engine.o")), flags, deps_hash: header_hash });
    }

    run_jobs(&cxx, &jobs);

    let lib = obj_dir.join("libr1kemu.a");
    let _ = fs::remove_file(&lib);
    let status = Command::new("ar").arg("crs").arg(&lib).args(jobs.iter().map(|j| &j.object)).status().expect("run ar");
    assert!(status.success(), "ar failed");
    println!("cargo:rustc-link-search=native={}", obj_dir.display());
    println!("cargo:rustc-link-lib=static:+whole-archive=r1kemu");
    if asan {
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo:rustc-env=R1K_EMU_KERNEL_COUNT={}", all_kernels.len());

    if env::var("R1K_EMU_MUTANTS").map(|v| v == "1").unwrap_or(false) {
        let engine_objects: Vec<PathBuf> = jobs
            .iter()
            .filter(|j| j.object.to_str().is_some_and(|p| p.ends_with(".engine.o")))
            .map(|j| j.object.clone())
            .collect();
        let ctx = MutantContext {
            cxx: &cxx,
            common: &common,
            cpp_dir: &cpp_dir,
            kernels_dir: &kernels_dir,
            obj_dir: &obj_dir,
            preprocessed: &preprocessed,
            engine_objects: &engine_objects,
            asan,
        };
        let profile_dir = out.ancestors().nth(3).expect("OUT_DIR is target/<profile>/build/<pkg>/out").to_path_buf();
        // The emulator's own mutants (each must be flagged by an emulator rule or a test) and the tests' kernel
        // mutants (each a plausible kernel bug a test must catch), one index.
        let lists = [manifest.join("mutants.txt"), manifest.join("../tests/kernel-mutants.txt")];
        build_mutants(&ctx, &lists, &profile_dir.join("emu-mutants"));
    }

    // ---- standalone C++ self-tests (cpp/tests/*_test.cpp, linked with the pure *_core.cpp files) ----
    let test_dir = out.join("selftests");
    fs::create_dir_all(&test_dir).unwrap();
    let cores: Vec<PathBuf> = sorted_dir(&cpp_dir)
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("_core.cpp")))
        .collect();
    let cutlass = toolchain.join("cutlass-include");
    let mut built = Vec::new();
    for t in sorted_dir(&cpp_dir.join("tests")) {
        let name = t.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        let Some(stem) = name.strip_suffix("_test.cpp") else { continue };
        let exe = test_dir.join(stem);
        // A test names the engine files it needs beyond the pure *_core.cpp ones with `// selftest-sources: a.cpp b.cpp`.
        let text = fs::read_to_string(&t).unwrap_or_default();
        let extra: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("// selftest-sources:"))
            .flat_map(|l| l.split_whitespace().map(|f| cpp_dir.join(f)).collect::<Vec<_>>())
            .collect();
        let status = Command::new(&cxx)
            .args(["-std=c++17", "-O1", "-w"])
            .arg(format!("-I{}", cpp_dir.display()))
            .arg(format!("-I{}", cuda_include.display()))
            .arg(format!("-I{}", cuda_include.join("cccl").display()))
            .arg(format!("-I{}", cutlass.display()))
            .arg(&t)
            .args(&cores)
            .args(&extra)
            .arg("-o")
            .arg(&exe)
            .status()
            .expect("run g++");
        assert!(status.success(), "building self-test {} failed", t.display());
        built.push(stem.to_string());
    }
    println!("cargo:rustc-env=R1K_EMU_SELFTEST_DIR={}", test_dir.display());
    println!("cargo:rustc-env=R1K_EMU_SELFTESTS={}", built.join(","));
}

struct Job {
    source: PathBuf,
    object: PathBuf,
    flags: Vec<String>,
    deps_hash: u64,
}

fn c_ident(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

fn sorted_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap();
    }
}

/// Compiles the jobs on all cores, skipping objects whose source, flags and headers are unchanged.
fn run_jobs(cxx: &str, jobs: &[Job]) {
    let parallel = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(job) = jobs.get(i) else { break };
                let mut h = DefaultHasher::new();
                fs::read(&job.source).unwrap().hash(&mut h);
                job.flags.hash(&mut h);
                job.deps_hash.hash(&mut h);
                let stamp = job.object.with_extension("o.hash");
                let key = format!("{:016x}", h.finish());
                if job.object.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
                    continue;
                }
                let output = Command::new(cxx)
                    .args(&job.flags)
                    .arg("-c")
                    .arg(&job.source)
                    .arg("-o")
                    .arg(&job.object)
                    .output()
                    .expect("run g++");
                if output.status.success() {
                    fs::write(&stamp, key).unwrap();
                } else {
                    failures.lock().unwrap().push(format!(
                        "{}:\n{}",
                        job.source.display(),
                        String::from_utf8_lossy(&output.stderr)
                    ));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        panic!("compiling for the emulator failed:\n{}", failures.join("\n"));
    }
}

struct MutantContext<'a> {
    cxx: &'a str,
    common: &'a [String],
    cpp_dir: &'a Path,
    kernels_dir: &'a Path,
    obj_dir: &'a Path,
    preprocessed: &'a [(String, String)],
    engine_objects: &'a [PathBuf],
    asan: bool,
}

struct Mutant {
    id: String,
    what: String,
    file: String,
    test: String,
    /// Which occurrence of each text to replace (1-based); without it the text must occur exactly once.
    nth: Option<usize>,
    /// Built and run only in the AddressSanitizer build (`mode: asan`), or only in the plain one.
    asan_only: bool,
    hunks: Vec<(String, String)>,
}

/// Parses mutants.txt (format described at its top).
fn parse_mutants(text: &str) -> Vec<Mutant> {
    let mut out: Vec<Mutant> = Vec::new();
    let mut find: Vec<String> = Vec::new();
    let mut replace: Vec<String> = Vec::new();
    let flush = |m: Option<&mut Mutant>, find: &mut Vec<String>, replace: &mut Vec<String>| {
        if let Some(m) = m {
            if !find.is_empty() {
                m.hunks.push((find.join("\n"), replace.join("\n")));
            }
        }
        find.clear();
        replace.clear();
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("## ") {
            if let Some((id, what)) = rest.split_once(':') {
                if !id.contains(' ') {
                    flush(out.last_mut(), &mut find, &mut replace);
                    out.push(Mutant {
                        id: id.trim().into(),
                        what: what.trim().into(),
                        file: String::new(),
                        test: String::new(),
                        nth: None,
                        asan_only: false,
                        hunks: Vec::new(),
                    });
                    continue;
                }
            }
            if let Some(m) = out.last_mut() {
                m.what = format!("{} {}", m.what, rest.trim());
            }
        } else if let Some(f) = line.strip_prefix("file: ") {
            out.last_mut().expect("file: before a mutant").file = f.trim().into();
        } else if let Some(mode) = line.strip_prefix("mode: ") {
            assert_eq!(mode.trim(), "asan", "mode: asan is the only mode");
            out.last_mut().expect("mode: before a mutant").asan_only = true;
        } else if let Some(n) = line.strip_prefix("nth: ") {
            out.last_mut().expect("nth: before a mutant").nth = Some(n.trim().parse().expect("nth: a number"));
        } else if let Some(t) = line.strip_prefix("test: ") {
            out.last_mut().expect("test: before a mutant").test = t.trim().into();
        } else if line == "@@" {
            flush(out.last_mut(), &mut find, &mut replace);
        } else if let Some(f) = line.strip_prefix("- ").or(if line == "-" { Some("") } else { None }) {
            if !replace.is_empty() {
                flush(out.last_mut(), &mut find, &mut replace);
            }
            find.push(f.to_string());
        } else if let Some(r) = line.strip_prefix("+ ").or(if line == "+" { Some("") } else { None }) {
            replace.push(r.to_string());
        }
    }
    flush(out.last_mut(), &mut find, &mut replace);
    out
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Builds one standalone engine shared library per mutant (the patched kernel sources, everything else shared
/// with the normal build) into `dest`, with an index of (id, test, description, library).
fn build_mutants(ctx: &MutantContext, lists: &[PathBuf], dest: &Path) {
    let mut mutants = Vec::new();
    for list in lists {
        let text = fs::read_to_string(list).unwrap_or_else(|e| panic!("{}: {e}", list.display()));
        mutants.extend(parse_mutants(&text));
    }
    let mut ids: Vec<&str> = mutants.iter().map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    assert!(ids.windows(2).all(|w| w[0] != w[1]), "mutant ids must be unique across {lists:?}");
    fs::create_dir_all(dest).unwrap();
    let exports = ctx.obj_dir.join("engine-exports.map");
    write_if_changed(&exports, "{ global: r1k_emu_*; local: *; };\n");
    let mut index = String::new();
    for m in mutants.iter().filter(|m| m.asan_only == ctx.asan) {
        assert!(!m.file.is_empty() && !m.test.is_empty() && !m.hunks.is_empty(), "mutant {} is incomplete", m.id);
        let work = ctx.obj_dir.join("mutants").join(&m.id);
        let kdir = work.join("kernels");
        let _ = fs::remove_dir_all(&kdir);
        copy_dir(ctx.kernels_dir, &kdir);
        let target = kdir.join(&m.file);
        let mut text = fs::read_to_string(&target).unwrap_or_else(|_| panic!("mutant {}: no kernels/{}", m.id, m.file));
        for (find, replace) in &m.hunks {
            let at: Vec<usize> = text.match_indices(find.as_str()).map(|(i, _)| i).collect();
            let pick = match m.nth {
                None => {
                    assert!(
                        at.len() == 1,
                        "mutant {}: the text to replace occurs {} times in kernels/{}",
                        m.id,
                        at.len(),
                        m.file
                    );
                    at[0]
                }
                Some(n) => {
                    *at.get(n - 1).unwrap_or_else(|| panic!("mutant {}: no occurrence {n} in kernels/{}", m.id, m.file))
                }
            };
            text = format!("{}{}{}", &text[..pick], replace, &text[pick + find.len()..]);
        }
        fs::write(&target, text).unwrap();
        let kabs = kdir.canonicalize().unwrap().display().to_string();
        let mut objects: Vec<PathBuf> = ctx.engine_objects.to_vec();
        let mut jobs = Vec::new();
        let needle = format!("/{}\"", m.file);
        for (stem, original) in ctx.preprocessed {
            if !original.contains(&needle) {
                objects.push(ctx.obj_dir.join(format!("{stem}.kernel.o")));
                continue;
            }
            let src = kdir.join(format!("{stem}.cu"));
            let pre = Command::new(ctx.cxx)
                .args(ctx.common)
                .arg(format!("-I{}", kdir.display()))
                .arg("-include")
                .arg(ctx.cpp_dir.join("prelude.h"))
                .args(["-E", "-x", "c++"])
                .arg(src.canonicalize().unwrap())
                .output()
                .expect("run g++ -E");
            assert!(pre.status.success(), "mutant {}: preprocessing {stem} failed", m.id);
            let lifted = lift::lift(&String::from_utf8(pre.stdout).unwrap(), &kabs, stem)
                .unwrap_or_else(|e| panic!("mutant {}: lifting {stem}: {e}", m.id));
            let path = work.join(format!("{stem}.lifted.cpp"));
            write_if_changed(&path, &lifted.code);
            let mut flags = ctx.common.to_vec();
            flags.extend(["-O2".into(), "-w".into(), "-x".into(), "c++".into()]);
            let object = work.join(format!("{stem}.kernel.o"));
            objects.push(object.clone());
            jobs.push(Job { source: path, object, flags, deps_hash: 0 });
        }
        assert!(!jobs.is_empty(), "mutant {}: no kernel translation unit includes kernels/{}", m.id, m.file);
        run_jobs(ctx.cxx, &jobs);
        let lib = dest.join(format!("{}.so", m.id));
        let mut link = Command::new(ctx.cxx);
        link.arg("-shared").arg("-o").arg(&lib).args(&objects);
        link.arg(format!("-Wl,--version-script={}", exports.display()));
        if ctx.asan {
            link.arg("-fsanitize=address");
        }
        let status = link.status().expect("link mutant engine");
        assert!(status.success(), "linking mutant {} failed", m.id);
        index += &format!("{}\t{}\t{}\t{}\n", m.id, m.test, lib.display(), m.what);
    }
    fs::write(dest.join("index.tsv"), index).unwrap();
}
