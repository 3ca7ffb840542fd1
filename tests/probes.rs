//! The sm_90a primitive probes: each launches one building block of the fast kernels (TMA box loads and their
//! swizzle, wgmma descriptors and fragment layouts, the FP8 promotion step, the MLA tile loads, FP8 dequantization,
//! QKᵀ/PV and the transposed narrow products, the online-softmax merge) in isolation and checks it exactly. They run
//! first on a new device (`scripts/gpu-check` runs this suite before the others), so a broken primitive shows
//! here rather than as a wrong GEMM or attention result; their inputs and outputs can be recorded on a GPU and
//! replayed on the emulator bit for bit (`scripts/emu-replay-probes`).

use r1_kernels::probe_log::probe_io;
use r1_kernels::probes;
use r1_kernels::reference::mla::{dequantize_kv_cache_fp8, quantize_kv_cache_fp8, D_QK, D_V, FP8_TOKEN_BYTES};
use r1_kernels::rng::SplitMix64;
use r1_kernels::sm90::{swizzle_128b, Tma2d, TmaDtype};
use r1_kernels::{bf16, DeviceTensor, E4M3};

mod common;
use common::{bf16_vec, expect_launched, int_in, uniform_vec};

// ------------------------------------------------------------------------------------------------ FP8 GEMM

#[test]
fn gemm_tma_box_and_swizzle() {
    let Some(gpu) = r1_kernels::device::test_hopper("gemm_tma_box_and_swizzle") else { return };
    let (rows, cols) = (200usize, 384usize);
    let mut rng = SplitMix64::new(21);
    let src: Vec<u8> = (0..rows * cols).map(|_| int_in(&mut rng, 1..256) as u8).collect();
    let d = DeviceTensor::from_host(&gpu, &src, &[rows * cols]).unwrap();
    let tma = Tma2d {
        dtype: TmaDtype::U8,
        rows: rows as u64,
        cols: cols as u64,
        row_stride_bytes: cols as u64,
        box_rows: 128,
        box_cols: 128,
        swizzle_128b: true,
    };
    // Box rows 100..228 run past row 199: those must come back zero-filled.
    let (x0, y0) = (128usize, 100usize);
    let got = expect_launched(&gpu, &["gemm_probe_tma"], || probes::gemm_tma_box(&gpu, &d, &tma, x0 as i32, y0 as i32))
        .unwrap();
    probe_io("gemm_tma_box_and_swizzle", "box", &[("src", &src)], &[("smem", &got)]);
    for r in 0..128 {
        for c in 0..128 {
            let want = if y0 + r < rows { src[(y0 + r) * cols + x0 + c] } else { 0 };
            let at = swizzle_128b((r * 128 + c) as u32) as usize;
            assert_eq!(got[at], want, "TMA primitive: box element ({r}, {c}) at smem byte {at} (128B swizzle)");
        }
    }
}

#[test]
fn gemm_wgmma_descriptors_and_fragment_layout() {
    let Some(gpu) = r1_kernels::device::test_hopper("gemm_wgmma") else { return };
    let mut rng = SplitMix64::new(22);
    // Small integers: every product and sum is exact in fp32 and in the tensor core.
    let a: Vec<E4M3> = (0..64 * 128).map(|_| E4M3::from_f32(int_in(&mut rng, -4..5) as f32)).collect();
    let b: Vec<E4M3> = (0..128 * 128).map(|_| E4M3::from_f32(int_in(&mut rng, -4..5) as f32)).collect();
    let da = DeviceTensor::from_host(&gpu, &a, &[64, 128]).unwrap();
    let db = DeviceTensor::from_host(&gpu, &b, &[128, 128]).unwrap();
    let got = expect_launched(&gpu, &["gemm_probe_wgmma_n128"], || probes::gemm_wgmma_n128(&gpu, &da, &db)).unwrap();
    probe_io(
        "gemm_wgmma",
        "n128",
        &[("a", bytemuck::cast_slice(&a)), ("b", bytemuck::cast_slice(&b))],
        &[("d", bytemuck::cast_slice(&got))],
    );
    for r in 0..64 {
        for c in 0..128 {
            let want: f32 = (0..128).map(|kk| a[r * 128 + kk].to_f32() * b[c * 128 + kk].to_f32()).sum();
            assert_eq!(got[r * 128 + c], want, "wgmma primitive (descriptor/swizzle/fragment layout) at ({r}, {c})");
        }
    }
}

#[test]
fn gemm_promotion_step() {
    let Some(gpu) = r1_kernels::device::test_hopper("gemm_promotion_step") else { return };
    let mut rng = SplitMix64::new(23);
    let acc = uniform_vec(&mut rng, 64 * 160, -100.0, 100.0);
    let fin = uniform_vec(&mut rng, 64 * 160, -0.5, 0.5);
    let sa = uniform_vec(&mut rng, 64, 1e-4, 0.01 + 1e-4);
    let sb2 = [0.003f32, 0.25];
    let up = |v: &[f32], s: &[usize]| DeviceTensor::from_host(&gpu, v, s).unwrap();
    let (dacc, dfin, dsa, dsb) = (up(&acc, &[64, 160]), up(&fin, &[64, 160]), up(&sa, &[64]), up(&sb2, &[2]));
    for n0 in [0i32, 160, 480, 96 * 5] {
        let got = expect_launched(&gpu, &["gemm_probe_promote_n160"], || {
            probes::gemm_promote_n160(&gpu, &dacc, &dfin, &dsa, &dsb, n0)
        })
        .unwrap();
        let inputs: [(&str, &[u8]); 4] = [
            ("acc", bytemuck::cast_slice(&acc)),
            ("fin", bytemuck::cast_slice(&fin)),
            ("sa", bytemuck::cast_slice(&sa)),
            ("sb", bytemuck::cast_slice(&sb2)),
        ];
        probe_io("gemm_promotion_step", &format!("n0-{n0}"), &inputs, &[("out", bytemuck::cast_slice(&got))]);
        for (r, &sar) in sa.iter().enumerate() {
            for c in 0..160 {
                let slot = r1_kernels::fp8_gemm::plan::b_scale_slot(n0 as u32, c as u32) as usize;
                let s = sar * sb2[slot];
                let i = r * 160 + c;
                let want = acc[i].mul_add(s, acc[i].mul_add(s, fin[i]));
                assert_eq!(got[i], want, "promotion primitive at n0={n0} ({r}, {c}), scale slot {slot}");
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------ MLA decode

fn random_bf16_bits(n: usize, rng: &mut SplitMix64, scale: f32) -> Vec<bf16> {
    bf16_vec(rng, n, -scale, scale)
}

#[test]
fn mla_tma_tile_load() {
    let Some(gpu) = r1_kernels::device::test_hopper("mla sm90 primitive: TMA tile load (128B swizzle)") else { return };
    let mut rng = SplitMix64::new(200);
    for &(page, ref table, t0, tok_end) in &[
        (64usize, vec![3i32, 1], 0usize, 64usize),
        (64, vec![3, 1], 64, 100), // tail rows past the piece are zeroed
        (32, vec![2, 0, 5], 0, 64),
        (16, vec![4, 1, i32::MAX, 0, 2], 0, 70), // a bad page in the middle of the tile
        (128, vec![1, 2], 64, 128),              // second half of a 128-token page
    ] {
        let num_blocks = 6usize;
        let cache = random_bf16_bits(num_blocks * page * D_QK, &mut rng, 4.0);
        let dc = DeviceTensor::from_host(&gpu, &cache, &[num_blocks, page, D_QK]).unwrap();
        let dt = DeviceTensor::from_host(&gpu, table, &[table.len()]).unwrap();
        let got =
            expect_launched(&gpu, &["mla_sm90_probe_tile_load"], || probes::mla_tile_load(&gpu, &dc, &dt, t0, tok_end))
                .unwrap();
        let case = format!("page{page}-t0-{t0}-end-{tok_end}");
        let inputs: [(&str, &[u8]); 2] =
            [("cache", bytemuck::cast_slice(&cache)), ("table", bytemuck::cast_slice(table))];
        probe_io("mla_tma_tile_load", &case, &inputs, &[("stage", &got)]);
        let bits: Vec<u16> = cache.iter().map(|x| x.to_bits()).collect();
        let want = r1_kernels::mla::sm90::tile_image(&bits, table, page, t0, tok_end);
        assert!(got == want, "page {page} t0 {t0} tok_end {tok_end}: stage image differs");
    }
}

#[test]
fn mla_fp8_tile_load_and_dequant() {
    let Some(gpu) = r1_kernels::device::test_hopper("mla sm90 primitive: FP8 TMA maps + dequantization") else {
        return;
    };
    let mut rng = SplitMix64::new(203);
    for &(page, ref table, t0, tok_end) in &[
        (64usize, vec![3i32, 1], 0usize, 64usize),
        (16, vec![4, 1, i32::MAX, 0, 2], 0, 70),
        (128, vec![1, 2], 64, 100),
    ] {
        let num_blocks = 6usize;
        let vals = uniform_vec(&mut rng, num_blocks * page * D_QK, -3.0, 3.0);
        let bytes = quantize_kv_cache_fp8(&vals).unwrap();
        let deq: Vec<u16> =
            dequantize_kv_cache_fp8(&bytes).unwrap().iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let dc = DeviceTensor::from_host(&gpu, &bytes, &[num_blocks, page, FP8_TOKEN_BYTES]).unwrap();
        let dt = DeviceTensor::from_host(&gpu, table, &[table.len()]).unwrap();
        let got = expect_launched(&gpu, &["mla_sm90_probe_fp8_tile_load"], || {
            probes::mla_fp8_tile_load(&gpu, &dc, &dt, t0, tok_end)
        })
        .unwrap();
        let case = format!("page{page}-t0-{t0}-end-{tok_end}");
        let inputs: [(&str, &[u8]); 2] = [("cache", &bytes), ("table", bytemuck::cast_slice(table))];
        probe_io("mla_fp8_tile_load_and_dequant", &case, &inputs, &[("stage", &got)]);
        let want = r1_kernels::mla::sm90::tile_image(&deq, table, page, t0, tok_end);
        assert!(got == want, "page {page} t0 {t0} tok_end {tok_end}: dequantized stage image differs");
    }
}

#[test]
fn mla_wgmma_qk_and_pv() {
    let Some(gpu) = r1_kernels::device::test_hopper("mla sm90 primitive: bf16 wgmma QK^T (K-major) and PV (MN-major)")
    else {
        return;
    };
    let mut rng = SplitMix64::new(201);
    for page in [64usize, 16] {
        let num_blocks = 64 / page + 2;
        let q = random_bf16_bits(64 * D_QK, &mut rng, 1.0);
        let cache = random_bf16_bits(num_blocks * page * D_QK, &mut rng, 1.0);
        let table: Vec<i32> = (0..(64 / page) as i32).rev().collect();
        let dq = DeviceTensor::from_host(&gpu, &q, &[64, D_QK]).unwrap();
        let dc = DeviceTensor::from_host(&gpu, &cache, &[num_blocks, page, D_QK]).unwrap();
        let dt = DeviceTensor::from_host(&gpu, &table, &[table.len()]).unwrap();
        let (s, o) =
            expect_launched(&gpu, &["mla_sm90_probe_wgmma"], || probes::mla_wgmma(&gpu, &dq, &dc, &dt)).unwrap();
        let inputs: [(&str, &[u8]); 3] = [
            ("q", bytemuck::cast_slice(&q)),
            ("cache", bytemuck::cast_slice(&cache)),
            ("table", bytemuck::cast_slice(&table)),
        ];
        let outputs: [(&str, &[u8]); 2] = [("s", bytemuck::cast_slice(&s)), ("o", bytemuck::cast_slice(&o))];
        probe_io("mla_wgmma_qk_and_pv", &format!("page{page}"), &inputs, &outputs);
        let key = |t: usize| {
            let off = (table[t / page] as usize * page + t % page) * D_QK;
            &cache[off..off + D_QK]
        };
        for r in 0..64 {
            for t in 0..64 {
                let want: f64 = (0..D_QK).map(|d| q[r * D_QK + d].to_f64() * key(t)[d].to_f64()).sum();
                let got = s[r * 64 + t] as f64;
                assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "S[{r},{t}] page {page}: {got} vs {want}");
            }
            for n in 0..D_V {
                let want: f64 = (0..64).map(|t| bf16::from_f32(s[r * 64 + t]).to_f64() * key(t)[n].to_f64()).sum();
                let got = o[r * D_V + n] as f64;
                assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "O[{r},{n}] page {page}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn mla_narrow_wgmma_transposed() {
    let Some(gpu) = r1_kernels::device::test_hopper("mla sm90 primitive: narrow wgmma (S^T = K Q^T, O^T = V^T P^T)")
    else {
        return;
    };
    let mut rng = SplitMix64::new(204);
    for page in [64usize, 16] {
        let num_blocks = 64 / page + 2;
        let q = random_bf16_bits(16 * D_QK, &mut rng, 1.0);
        let cache = random_bf16_bits(num_blocks * page * D_QK, &mut rng, 1.0);
        let table: Vec<i32> = (0..(64 / page) as i32).rev().collect();
        let dq = DeviceTensor::from_host(&gpu, &q, &[16, D_QK]).unwrap();
        let dc = DeviceTensor::from_host(&gpu, &cache, &[num_blocks, page, D_QK]).unwrap();
        let dt = DeviceTensor::from_host(&gpu, &table, &[table.len()]).unwrap();
        let (s, o) =
            expect_launched(&gpu, &["mla_sm90_probe_narrow_wgmma"], || probes::mla_narrow_wgmma(&gpu, &dq, &dc, &dt))
                .unwrap();
        let inputs: [(&str, &[u8]); 3] = [
            ("q", bytemuck::cast_slice(&q)),
            ("cache", bytemuck::cast_slice(&cache)),
            ("table", bytemuck::cast_slice(&table)),
        ];
        let outputs: [(&str, &[u8]); 2] = [("s", bytemuck::cast_slice(&s)), ("o", bytemuck::cast_slice(&o))];
        probe_io("mla_narrow_wgmma_transposed", &format!("page{page}"), &inputs, &outputs);
        let key = |t: usize| {
            let off = (table[t / page] as usize * page + t % page) * D_QK;
            &cache[off..off + D_QK]
        };
        for r in 0..16 {
            for t in 0..64 {
                let want: f64 = (0..D_QK).map(|d| q[r * D_QK + d].to_f64() * key(t)[d].to_f64()).sum();
                let got = s[r * 64 + t] as f64;
                assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "S[{r},{t}] page {page}: {got} vs {want}");
            }
            for n in 0..D_V {
                let want: f64 = (0..64).map(|t| bf16::from_f32(s[r * 64 + t]).to_f64() * key(t)[n].to_f64()).sum();
                let got = o[r * D_V + n] as f64;
                assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "O[{r},{n}] page {page}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn mla_online_softmax_merge() {
    let Some(gpu) = r1_kernels::device::test_hopper("mla sm90 primitive: online softmax merge") else { return };
    let mut rng = SplitMix64::new(202);
    let mut s = uniform_vec(&mut rng, 64 * 128, -8.0, 8.0);
    for r in 0..64 {
        if r % 7 == 0 {
            s[r * 128 + 64..(r + 1) * 128].fill(f32::NEG_INFINITY); // second tile fully masked
        }
        if r % 11 == 5 {
            s[r * 128..r * 128 + 64].fill(f32::NEG_INFINITY); // first tile fully masked
        }
        if r == 63 {
            s[r * 128..(r + 1) * 128].fill(f32::NEG_INFINITY); // nothing visible
        }
    }
    let (m, l, alpha, p) =
        expect_launched(&gpu, &["mla_sm90_probe_softmax"], || probes::mla_softmax(&gpu, &s)).unwrap();
    for r in 0..64 {
        let row = &s[r * 128..(r + 1) * 128];
        let m1 = row[..64].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mt = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(m[r], mt, "row {r} max");
        if mt == f32::NEG_INFINITY {
            assert_eq!(l[r], 0.0);
            assert!(p[r * 64..(r + 1) * 64].iter().all(|&x| x == 0.0));
            continue;
        }
        let lt: f64 = row.iter().map(|&x| ((x - mt) as f64).exp2()).sum();
        assert!(((l[r] as f64) - lt).abs() < 1e-5 * lt, "row {r}: l {} vs {lt}", l[r]);
        let want_alpha = if m1 == f32::NEG_INFINITY { 0.0 } else { ((m1 - mt) as f64).exp2() };
        assert!((alpha[r] as f64 - want_alpha).abs() < 1e-6, "row {r}: alpha {} vs {want_alpha}", alpha[r]);
        for c in 0..64 {
            let want = bf16::from_f32(((row[64 + c] - mt) as f64).exp2() as f32).to_f32();
            assert!((p[r * 64 + c] - want).abs() <= want * 2f32.powi(-7), "P[{r},{c}]");
        }
    }
}
