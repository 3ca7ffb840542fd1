//! One DeepSeek-V3/R1 transformer layer's decode step for a batch: FP8 projections, MLA decode over a paged latent
//! cache with varied context lengths, W_UV + o_proj, and the MoE block (router with bias, 256 experts top-8 + the
//! shared expert), with the real dimensions.
//!
//! On a GPU: runs the whole step on the device, prints per-stage time, TFLOPS / GB/s and share of the layer, then
//! checks a few sequences against the CPU reference. Without a GPU: says so and runs the CPU reference on a reduced
//! batch. `--short` uses small dimensions (for CI). Run with `--help` for the flags.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r1_kernels::checkpoint::Checkpoint;
use r1_kernels::layer::{DecodeBatch, DecodeLayer, StepIntermediates};
use r1_kernels::mla::Backend;
use r1_kernels::model::{synthetic_layer_weights, DeepSeekV3Config, LayerWeights};
use r1_kernels::reference::fp8_gemm::calc_diff;
use r1_kernels::reference::layer::{decode_layer, moe_branch, DecodeStep, LayerTrace, PreparedLayer};
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor, Gpu};

const HELP: &str = "\
decode_layer: one DeepSeek-V3/R1 layer's decode step (FP8 projections, MLA over a paged cache, MoE top-8 + shared)

USAGE: cargo run --release --example decode_layer -- [FLAGS]

FLAGS:
  --batch N          sequences in the batch, 1..=256 (default: 64 on a GPU, 2 on the CPU reference path)
  --context N        mean context length; lengths vary from N/8 to 2N (default: 4096 on a GPU, 512 on the CPU)
  --page-size N      tokens per KV-cache page (default 64)
  --seed N           seed of the synthetic weights, inputs and cache (default 0)
  --check N          sequences checked against the CPU reference after a GPU run, stage by stage (default 2)
  --mla KERNEL       MLA decode kernel: portable, hopper or hopper-wide (default: the layer's default)
  --checkpoint DIR   load the layer from a DeepSeek-V3/R1 FP8 safetensors checkpoint instead of synthetic weights
  --layer N          layer index to load or synthesize (default 3, the first MoE layer)
  --short            small dimensions (hidden 512, 16 heads, 16 experts) for a quick run, e.g. in CI
  --cpu              use the CPU reference path even when a GPU is present
  -h, --help         this text
";

struct Args {
    batch: Option<usize>,
    context: Option<usize>,
    page: usize,
    seed: u64,
    check: usize,
    checkpoint: Option<String>,
    layer: Option<usize>,
    short: bool,
    cpu: bool,
    mla: Option<Backend>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        batch: None,
        context: None,
        page: 64,
        seed: 0,
        check: 2,
        checkpoint: None,
        layer: None,
        short: false,
        cpu: false,
        mla: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |s: String, name: &str| s.parse::<usize>().map_err(|_| format!("{name}: not a number: {s}"));
        match flag.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--batch" => a.batch = Some(num(value("--batch")?, "--batch")?),
            "--context" => a.context = Some(num(value("--context")?, "--context")?),
            "--page-size" => a.page = num(value("--page-size")?, "--page-size")?,
            "--seed" => a.seed = num(value("--seed")?, "--seed")? as u64,
            "--check" => a.check = num(value("--check")?, "--check")?,
            "--checkpoint" => a.checkpoint = Some(value("--checkpoint")?),
            "--layer" => a.layer = Some(num(value("--layer")?, "--layer")?),
            "--short" => a.short = true,
            "--cpu" => a.cpu = true,
            "--mla" => {
                a.mla = Some(match value("--mla")?.as_str() {
                    "portable" => Backend::Portable,
                    "hopper" => Backend::Hopper,
                    "hopper-wide" => Backend::HopperWide,
                    other => return Err(format!("--mla: unknown kernel {other} (portable, hopper, hopper-wide)")),
                })
            }
            other => return Err(format!("unknown flag {other} (see --help)")),
        }
    }
    if let Some(b) = a.batch {
        if !(1..=256).contains(&b) {
            return Err(format!("--batch must be in 1..=256, got {b}"));
        }
    }
    if a.page == 0 {
        return Err("--page-size must be positive".into());
    }
    Ok(a)
}

/// Prints `label … Ns` on stderr every half second until dropped, for anything that may take more than a second.
struct Progress {
    done: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    start: Instant,
    label: String,
}

impl Progress {
    fn start(label: &str) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let (flag, text, start) = (done.clone(), label.to_string(), Instant::now());
        let handle = std::thread::spawn(move || {
            let spinner = ['|', '/', '-', '\\'];
            let mut i = 0;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if start.elapsed() > Duration::from_millis(800) && i % 5 == 0 {
                    eprint!("\r{} {} {:.0}s ", spinner[(i / 5) % 4], text, start.elapsed().as_secs_f64());
                    let _ = std::io::stderr().flush();
                }
                i += 1;
            }
        });
        Progress { done, handle: Some(handle), start, label: label.to_string() }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        eprintln!("\r  {} ({:.1}s)          ", self.label, self.start.elapsed().as_secs_f64());
    }
}

/// A batch of sequences with varied context lengths and a paged cache holding their earlier tokens.
struct Problem {
    x: Vec<f32>,
    cache: Vec<f32>,
    table: Vec<i32>,
    max_blocks: usize,
    page: usize,
    seqlens: Vec<i32>,
}

fn make_problem(hidden: usize, batch: usize, context: usize, page: usize, seed: u64) -> Problem {
    let mut rng = SplitMix64::new(seed ^ 0x5eed_cafe);
    // Lengths log-uniform between context/8 and 2·context (at least 1: the new token).
    let seqlens: Vec<i32> = (0..batch)
        .map(|_| {
            let lo = (context as f64 / 8.0).max(1.0).ln();
            let hi = (2.0 * context as f64).max(1.0).ln();
            (lo + (hi - lo) * rng.next_f32() as f64).exp().round().max(1.0) as i32
        })
        .collect();
    let max_blocks = seqlens.iter().map(|&s| (s as usize).div_ceil(page)).max().unwrap_or(1);
    let total_pages: usize = seqlens.iter().map(|&s| (s as usize).div_ceil(page)).sum();
    let mut pages: Vec<i32> = (0..total_pages as i32).collect();
    for i in (1..pages.len()).rev() {
        pages.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut table = vec![-1i32; batch * max_blocks];
    let mut next = 0;
    for (s, &len) in seqlens.iter().enumerate() {
        for blk in 0..(len as usize).div_ceil(page) {
            table[s * max_blocks + blk] = pages[next];
            next += 1;
        }
    }
    let mut cache = vec![0f32; total_pages * page * 576];
    for (s, &len) in seqlens.iter().enumerate() {
        for pos in 0..len as usize - 1 {
            let slot = (table[s * max_blocks + pos / page] as usize * page + pos % page) * 576;
            for v in &mut cache[slot..slot + 576] {
                *v = bf16::from_f32(rng.normal()).to_f32();
            }
        }
    }
    let x = (0..batch * hidden).map(|_| bf16::from_f32(rng.normal()).to_f32()).collect();
    Problem { x, cache, table, max_blocks, page, seqlens }
}

/// The sub-problem of sequence `s` alone, with its pages copied into a compact cache.
fn single_sequence(p: &Problem, hidden: usize, s: usize) -> Problem {
    let len = p.seqlens[s] as usize;
    let blocks = len.div_ceil(p.page);
    let mut cache = vec![0f32; blocks * p.page * 576];
    for blk in 0..blocks {
        let src = p.table[s * p.max_blocks + blk] as usize * p.page * 576;
        cache[blk * p.page * 576..(blk + 1) * p.page * 576].copy_from_slice(&p.cache[src..src + p.page * 576]);
    }
    Problem {
        x: p.x[s * hidden..(s + 1) * hidden].to_vec(),
        cache,
        table: (0..blocks as i32).collect(),
        max_blocks: blocks,
        page: p.page,
        seqlens: vec![p.seqlens[s]],
    }
}

fn load_weights(args: &Args, cfg: &DeepSeekV3Config, layer: usize) -> Result<LayerWeights, String> {
    if let Some(dir) = &args.checkpoint {
        let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
        let _p = Progress::start(&format!("loading layer {layer} from {dir}"));
        ckpt.load_layer_with_progress(cfg, layer, |p| {
            eprint!(
                "\r  shard {}/{}: {} ({:.1} GB)   ",
                p.files_done + 1,
                p.files_total,
                p.file.display(),
                p.file_bytes as f64 / 1e9
            );
        })
        .map_err(|e| e.to_string())
    } else {
        let gb = cfg.layer_bytes(layer) as f64 / 1e9;
        let _p = Progress::start(&format!("synthesizing layer {layer} weights ({gb:.2} GB, seed {})", args.seed));
        synthetic_layer_weights(cfg, layer, args.seed).map_err(|e| e.to_string())
    }
}

fn run_reference(layer: &PreparedLayer, p: &Problem) -> Result<LayerTrace, String> {
    let step = DecodeStep { block_table: &p.table, max_blocks: p.max_blocks, seqlens: &p.seqlens, page_size: p.page };
    let mut cache = p.cache.clone();
    decode_layer(layer, &p.x, &mut cache, &step).map_err(|e| e.to_string())
}

/// Worst calc_diff over the `rows` rows of `got` against `want`.
fn worst_row_diff(got: &[f32], want: &[f32], rows: usize) -> f64 {
    let width = want.len() / rows.max(1);
    got.chunks(width.max(1)).zip(want.chunks(width.max(1))).map(|(g, w)| calc_diff(g, w)).fold(0f64, f64::max)
}

/// Checks sequence `s` of the GPU step stage by stage against the CPU reference `want` (the sequence run alone), so
/// a failure names the stage. The MoE branch is also recomputed on the CPU from the GPU's own residual `h`: a token
/// whose top-k set differs only because its k-th and next experts nearly tie then routes the same way on both sides,
/// and its MoE output is still checked. Returns the failed checks.
#[allow(clippy::too_many_arguments)]
fn check_sequence(
    layer: &PreparedLayer,
    cfg: &DeepSeekV3Config,
    s: usize,
    got_out: &[f32],
    got: &StepIntermediates,
    got_ids: &[i32],
    want: &LayerTrace,
) -> Result<Vec<String>, String> {
    let (hidden, heads, k) = (cfg.hidden, cfg.num_heads, cfg.top_k);
    let rows = |v: &[f32], width: usize| v[s * width..(s + 1) * width].to_vec();
    let mut failed = Vec::new();
    let stage = |failed: &mut Vec<String>, name: &str, got: &[f32], want: &[f32], rows: usize, bound: f64| {
        let worst = worst_row_diff(got, want, rows);
        let finite = got.iter().all(|v| v.is_finite());
        let ok = finite && worst < bound;
        println!(
            "    {name:<34} worst row calc_diff {worst:.2e} (bound {bound:.0e}){}",
            if ok { "" } else { "  FAIL" }
        );
        if !ok {
            failed.push(format!("sequence {s}: {name}"));
        }
    };
    // Bounds as in tests/layer.rs: Hopper's FP8 accumulation gives row calc_diff up to ~1e-4 on q and ~6e-4 on the
    // MoE branch; a wrong window, head, page or expert gives 1e-2 and beyond.
    stage(&mut failed, "q_mla (per head)", &rows(&got.q_mla, heads * 576), &want.q_mla, heads, 1e-3);
    stage(&mut failed, "kv row", &rows(&got.kv_row, 576), &want.kv_row, 1, 1e-3);
    stage(&mut failed, "o_latent (per head)", &rows(&got.o_latent, heads * 512), &want.o_latent, heads, 1e-3);
    stage(&mut failed, "attention branch (o_proj out)", &rows(&got.attn, hidden), &want.attn, 1, 1e-3);
    stage(&mut failed, "h = x + attention", &rows(&got.h, hidden), &want.h, 1, 1e-3);
    let lse_err = rows(&got.lse, heads)
        .iter()
        .zip(&want.lse)
        .map(|(g, w)| if g.is_finite() { (g - w).abs() / w.abs().max(1.0) } else { f32::INFINITY })
        .fold(0f32, f32::max);
    let lse_ok = lse_err <= 1e-3;
    println!(
        "    {:<34} worst error {lse_err:.2e} (relative above 1, bound 1e-3){}",
        "lse",
        if lse_ok { "" } else { "  FAIL" }
    );
    if !lse_ok {
        failed.push(format!("sequence {s}: lse"));
    }
    let gpu_h = rows(&got.h, hidden);
    let on_gpu_h = moe_branch(layer, &gpu_h, 1).map_err(|e| e.to_string())?;
    let sorted = |v: &[i32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    let (gpu_set, ref_set, ref_on_gpu_h) =
        (sorted(&got_ids[s * k..(s + 1) * k]), sorted(&want.topk_ids), sorted(&on_gpu_h.topk_ids));
    let routing = if gpu_set == ref_set {
        "same experts as the reference"
    } else if gpu_set == ref_on_gpu_h {
        "differs from the reference's, equal to the reference router's on the GPU's h (a near-tie)"
    } else {
        failed.push(format!("sequence {s}: routing"));
        "FAIL: differs from the reference router's even on the GPU's h"
    };
    println!("    {:<34} {routing}: GPU {gpu_set:?}, reference {ref_set:?}", "routing (top-k set)");
    stage(&mut failed, "MoE branch on the GPU's h", &rows(&got.moe_out, hidden), &on_gpu_h.moe_out, 1, 3e-3);
    // The layer output: against the reference when both route alike, else against h + the MoE branch on the GPU's h.
    let want_out: Vec<f32> = if gpu_set == ref_set {
        want.out.clone()
    } else {
        gpu_h.iter().zip(&on_gpu_h.moe_out).map(|(a, b)| bf16::from_f32(a + b).to_f32()).collect()
    };
    stage(&mut failed, "layer output", &got_out[s * hidden..(s + 1) * hidden], &want_out, 1, 2e-3);
    Ok(failed)
}

/// (flops, bytes) of each stage, from the shapes (bytes: weights and cache read at least once, activations ignored).
fn stage_costs(cfg: &DeepSeekV3Config, p: &Problem, experts_hit: usize) -> Vec<(f64, f64)> {
    let b = p.seqlens.len() as f64;
    let (h, heads) = (cfg.hidden as f64, cfg.num_heads as f64);
    let (ql, kvl, qk) = (cfg.q_lora_rank as f64, cfg.kv_lora_rank as f64, cfg.qk_head_dim() as f64);
    let (nope, v, rope) = (cfg.qk_nope_head_dim as f64, cfg.v_head_dim as f64, cfg.qk_rope_head_dim as f64);
    let proj_w = h * ql + ql * heads * qk + h * (kvl + rope);
    let keys: f64 = p.seqlens.iter().map(|&s| s as f64).sum();
    let inter = cfg.moe_intermediate as f64;
    let moe_w = (experts_hit as f64 + cfg.n_shared_experts as f64) * 3.0 * inter * h;
    vec![
        (2.0 * b * proj_w, proj_w),
        (2.0 * b * heads * nope * kvl, heads * nope * kvl * 2.0),
        (2.0 * heads * keys * (kvl + rope + kvl), keys * (kvl + rope) * 2.0),
        (2.0 * b * heads * (kvl * v + v * h), heads * kvl * v * 2.0 + heads * v * h),
        (
            2.0 * b * (cfg.top_k as f64 + cfg.n_shared_experts as f64) * 3.0 * inter * h,
            moe_w + cfg.n_routed_experts as f64 * h * 2.0,
        ),
    ]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let cfg = if args.short { DeepSeekV3Config::small() } else { DeepSeekV3Config::deepseek_v3() };
    let layer_idx = args.layer.unwrap_or(cfg.first_k_dense);
    let gpu = if args.cpu {
        None
    } else {
        match Gpu::new(0) {
            Ok(g) => Some(g),
            Err(e) => {
                println!("No GPU found ({e}).");
                println!("Running the CPU reference on a reduced batch instead; nothing below is a GPU measurement.");
                None
            }
        }
    };
    // The emulated device (r1k-emu) runs the kernels on the CPU, thread by thread: give it a CPU-sized problem.
    let real_gpu = gpu.as_ref().is_some_and(|g| !g.is_emulated());
    let batch = args.batch.unwrap_or(if real_gpu { 64 } else { 2 });
    let context = args.context.unwrap_or(if real_gpu {
        4096
    } else if gpu.is_some() {
        256
    } else {
        512
    });
    println!(
        "DeepSeek-V3 layer {layer_idx} decode step: batch {batch}, mean context ~{context}, page {}, hidden {}, {} heads, \
         {} experts top-{} + {} shared{}",
        args.page,
        cfg.hidden,
        cfg.num_heads,
        cfg.n_routed_experts,
        cfg.top_k,
        cfg.n_shared_experts,
        if args.short { " (--short dims)" } else { "" }
    );
    let weights = load_weights(&args, &cfg, layer_idx)?;
    let prepared = {
        let _p = Progress::start("fusing expert weights");
        PreparedLayer::new(&cfg, weights).map_err(|e| e.to_string())?
    };
    let problem = {
        let _p = Progress::start("building inputs and the paged KV cache");
        make_problem(cfg.hidden, batch, context, args.page, args.seed)
    };
    let lens = &problem.seqlens;
    println!(
        "context lengths: min {} / mean {:.0} / max {} tokens ({} cached tokens)",
        lens.iter().min().unwrap_or(&0),
        lens.iter().map(|&s| s as f64).sum::<f64>() / lens.len() as f64,
        lens.iter().max().unwrap_or(&0),
        lens.iter().map(|&s| s as i64 - 1).sum::<i64>()
    );

    let Some(gpu) = gpu else {
        let out = {
            let _p = Progress::start(&format!("CPU reference for {batch} sequences"));
            run_reference(&prepared, &problem)?.out
        };
        let norm = (out.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / out.len() as f64).sqrt();
        println!(
            "CPU reference done: output [{batch}, {}], rms {norm:.4}, all finite: {}",
            cfg.hidden,
            out.iter().all(|v| v.is_finite())
        );
        return Ok(());
    };

    println!("GPU: {} ({:?})", gpu.device_name(), gpu.info());
    if gpu.is_emulated() {
        println!("Emulated device: the kernels run on the CPU; results are checked, no timing below is a measurement.");
    }
    let mut layer = {
        let _p = Progress::start("uploading weights");
        DecodeLayer::upload(&gpu, &prepared).map_err(|e| e.to_string())?
    };
    if let Some(mla) = args.mla {
        layer.options.mla_backend = mla;
    }
    println!("MLA decode kernel: {:?}", layer.options.mla_backend);
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let e = |e: r1_kernels::Error| e.to_string();
    let b = batch;
    let x = DeviceTensor::from_host(&gpu, &to_bf16(&problem.x), &[b, cfg.hidden]).map_err(e)?;
    let num_blocks = problem.cache.len() / (problem.page * 576);
    let mut cache =
        DeviceTensor::from_host(&gpu, &to_bf16(&problem.cache), &[num_blocks.max(1), problem.page, 576]).map_err(e)?;
    let table = DeviceTensor::from_host(&gpu, &problem.table, &[b, problem.max_blocks]).map_err(e)?;
    let seqlens = DeviceTensor::from_host(&gpu, &problem.seqlens, &[b]).map_err(e)?;
    let positions: Vec<i32> = problem.seqlens.iter().map(|&s| s - 1).collect();
    let positions = DeviceTensor::from_host(&gpu, &positions, &[b]).map_err(e)?;
    let batch_state = DecodeBatch {
        block_table: table.as_tensor_ref(),
        block_table_host: &problem.table,
        seqlens: seqlens.as_tensor_ref(),
        seqlens_host: &problem.seqlens,
        positions: positions.as_tensor_ref(),
    };
    let mut ws = layer.workspace(&gpu, b).map_err(e)?;
    let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[b, cfg.hidden]).map_err(e)?;
    // Warm-up (module loading), then the timed median of a few steps (one untimed step on the emulator).
    layer.forward(&gpu, &mut ws, &x, &mut cache, &batch_state, &mut out, true).map_err(e)?;
    let mut runs = Vec::new();
    for _ in 0..if gpu.is_emulated() { 0 } else { 5 } {
        runs.push(
            layer.forward(&gpu, &mut ws, &x, &mut cache, &batch_state, &mut out, true).map_err(e)?.unwrap_or_default(),
        );
    }
    let (ids, _) = layer.last_routing(&gpu, &ws).map_err(e)?;
    let mut hit: Vec<i32> = ids.iter().copied().filter(|&i| i >= 0).collect();
    hit.sort_unstable();
    hit.dedup();
    let costs = stage_costs(&cfg, &problem, hit.len());
    if runs.is_empty() {
        println!("\n(per-stage timings skipped: emulated device; {} distinct experts hit)", hit.len());
    }
    let stages = runs.first().map_or(0, |r| r.stages.len());
    let median = |i: usize| {
        let mut v: Vec<f64> = runs.iter().map(|r| r.stages[i].1).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let times: Vec<f64> = (0..stages).map(median).collect();
    let total: f64 = times.iter().sum();
    if !runs.is_empty() {
        println!("\n{:<48} {:>10} {:>7} {:>9} {:>9}", "stage", "time (us)", "share", "TFLOPS", "GB/s");
    }
    for (i, (name, _)) in runs.first().map_or(&[][..], |r| &r.stages[..]).iter().enumerate() {
        let (flops, bytes) = costs.get(i).copied().unwrap_or((0.0, 0.0));
        let s = times[i] / 1e3;
        println!(
            "{:<48} {:>10.1} {:>6.1}% {:>9.1} {:>9.0}",
            name,
            times[i] * 1e3,
            100.0 * times[i] / total,
            flops / s / 1e12,
            bytes / s / 1e9
        );
    }
    if !runs.is_empty() {
        println!("{:<48} {:>10.1}   ({} distinct experts hit)", "layer", total * 1e3, hit.len());
    }

    // Check a few sequences against the CPU reference (on the cache as it was before the step), stage by stage.
    let got: Vec<f32> = out.to_host(&gpu).map_err(e)?.iter().map(|v| v.to_f32()).collect();
    let inter = layer.last_intermediates(&gpu, &ws).map_err(e)?;
    let mut failed = Vec::new();
    let mut worst = 0f64;
    for s in (0..b).step_by((b / args.check.max(1)).max(1)).take(args.check) {
        let sub = single_sequence(&problem, cfg.hidden, s);
        let reference = {
            let _p = Progress::start(&format!("CPU reference for sequence {s} (context {})", sub.seqlens[0]));
            run_reference(&prepared, &sub)?
        };
        let diff = calc_diff(&got[s * cfg.hidden..(s + 1) * cfg.hidden], &reference.out);
        worst = worst.max(diff);
        println!("sequence {s:>3}: context {:>6}, layer output calc_diff vs CPU reference {diff:.2e}", sub.seqlens[0]);
        failed.extend(check_sequence(&prepared, &cfg, s, &got, &inter, &ids, &reference)?);
    }
    if args.check > 0 {
        println!(
            "reference check: {} (worst layer output calc_diff {worst:.2e}; {} stage checks failed)",
            if failed.is_empty() { "PASS" } else { "FAIL" },
            failed.len()
        );
        if !failed.is_empty() {
            return Err(format!("the GPU layer disagrees with the CPU reference: {}", failed.join(", ")));
        }
    }
    Ok(())
}
