//! Decode-step ops (RMSNorm, RoPE, per-head bmm, cache append): GPU vs the CPU reference.

use r1_kernels::decode_ops::{self, HeadWeightStrides, RopeSlices, RopeTables};
use r1_kernels::device::test_gpu;
use r1_kernels::reference::decode_ops as reference;
use r1_kernels::reference::decode_ops::RopeConfig;
use r1_kernels::rng::SplitMix64;
use r1_kernels::{bf16, DeviceTensor, Error};

mod common;
use common::{bf16_vec, expect_launched, shuffle};

fn random(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    bf16_vec(&mut SplitMix64::new(seed), n, -scale, scale)
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Max |gpu − ref| relative to bf16 rounding of the reference (2^-8 relative) plus `abs`.
fn assert_close(gpu: &[bf16], reference: &[f32], abs: f32, what: &str) {
    assert_eq!(gpu.len(), reference.len(), "{what}: length");
    for (i, (g, r)) in gpu.iter().zip(reference).enumerate() {
        let g = g.to_f32();
        assert!(g.is_finite(), "{what}[{i}] is {g}");
        assert!((g - r).abs() <= r.abs() / 128.0 + abs, "{what}[{i}]: gpu {g} vs reference {r}");
    }
}

#[test]
fn rms_norm_matches_reference() {
    let Some(gpu) = test_gpu("rms_norm_matches_reference") else { return };
    for &(rows, d) in &[(1usize, 7168usize), (37, 1536), (256, 512), (3, 5)] {
        let x = random(rows * d, rows as u64, 3.0);
        let w = random(d, 7, 1.5);
        let reference = reference::rms_norm(&to_f32(&x), &to_f32(&w), rows, 1e-6).unwrap();
        let xd = DeviceTensor::from_host(&gpu, &x, &[rows, d]).unwrap();
        let wd = DeviceTensor::from_host(&gpu, &w, &[d]).unwrap();
        let mut y = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; rows * d], &[rows, d]).unwrap();
        expect_launched(&gpu, &["rms_norm_bf16"], || decode_ops::rms_norm(&gpu, &xd, &wd, &mut y, 1e-6)).unwrap();
        let first = y.to_host(&gpu).unwrap();
        assert_close(&first, &reference, 1e-5, "rms_norm");
        decode_ops::rms_norm(&gpu, &xd, &wd, &mut y, 1e-6).unwrap();
        assert_eq!(y.to_host(&gpu).unwrap(), first, "rms_norm is not deterministic");
    }
}

#[test]
fn rope_matches_reference() {
    let Some(gpu) = test_gpu("rope_matches_reference") else { return };
    // DeepSeek-V3's configuration (its mscale and mscale_all_dim are equal: cos/sin unscaled) and one with a
    // different mscale (cos/sin scaled by the YaRN magnitude ratio), so the kernel's scale path runs too.
    for cfg in
        [RopeConfig::deepseek_v3(), RopeConfig { mscale: 0.707, mscale_all_dim: 0.0, ..RopeConfig::deepseek_v3() }]
    {
        let tables = RopeTables::new(&gpu, cfg).unwrap();
        // q-like: [t, 16 heads × 192], rope in the last 64 of each head; kv-like: [t, 576], rope in the last 64.
        for &(t, row_len, slices) in &[
            (5usize, 16 * 192, RopeSlices { count: 16, stride: 192, offset: 128 }),
            (9, 576, RopeSlices { count: 1, stride: 0, offset: 512 }),
        ] {
            let x = random(t * row_len, t as u64, 2.0);
            let positions: Vec<i32> = (0..t as i32).map(|i| i * 9973 % 163_840).collect();
            let mut reference = to_f32(&x);
            reference::rope(
                &mut reference,
                t,
                row_len,
                slices.count,
                slices.stride.max(cfg.dim),
                slices.offset,
                &positions,
                &cfg,
            )
            .unwrap();
            let mut xd = DeviceTensor::from_host(&gpu, &x, &[t, row_len]).unwrap();
            let pd = DeviceTensor::from_host(&gpu, &positions, &[t]).unwrap();
            expect_launched(&gpu, &["rope_bf16_inplace"], || {
                decode_ops::rope_inplace(&gpu, &mut xd, &pd, &tables, slices)
            })
            .unwrap();
            // sincosf of large f32 angles agrees with f64 sin/cos of the same f32 angle to ~1e-6.
            assert_close(&xd.to_host(&gpu).unwrap(), &reference, 2e-3, "rope");
        }
    }
}

#[test]
fn head_bmm_absorbs_w_uk_and_applies_w_uv() {
    let Some(gpu) = test_gpu("head_bmm_absorbs_w_uk_and_applies_w_uv") else { return };
    let (heads, nope, latent, v) = (16usize, 128usize, 512usize, 128usize);
    // kv_b_proj weight [heads·(nope + v), latent], row-major.
    let w = random(heads * (nope + v) * latent, 3, 0.05);
    let wd = DeviceTensor::from_host(&gpu, &w, &[heads * (nope + v), latent]).unwrap();
    for &t in &[1usize, 17, 64] {
        let q_nope = random(t * heads * nope, 10 + t as u64, 1.0);
        // Absorb: q_lat[t,h,c] = Σ_d q_nope[t,h,d] · W_UK_h[d, c]
        let uk = HeadWeightStrides { offset: 0, head: (nope + v) * latent, i: latent, j: 1 };
        let reference =
            reference::head_bmm(&to_f32(&q_nope), &to_f32(&w), t, heads, nope, latent, uk.head, uk.i, uk.j).unwrap();
        let xd = DeviceTensor::from_host(&gpu, &q_nope, &[t, heads, nope]).unwrap();
        let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; t * heads * latent], &[t, heads, latent]).unwrap();
        expect_launched(&gpu, &["head_bmm_bf16"], || decode_ops::head_bmm(&gpu, &xd, &wd, uk, &mut out)).unwrap();
        assert_close(&out.to_host(&gpu).unwrap(), &reference, 1e-3, "absorb W_UK");

        // W_UV: o[t,h,d] = Σ_c o_lat[t,h,c] · W_UV_h[d, c], W_UV_h starting at row h·256 + 128.
        let o_lat = random(t * heads * latent, 20 + t as u64, 1.0);
        let w_uv = &w[nope * latent..];
        let uv = HeadWeightStrides { offset: 0, head: (nope + v) * latent, i: 1, j: latent };
        let reference =
            reference::head_bmm(&to_f32(&o_lat), &to_f32(w_uv), t, heads, latent, v, uv.head, uv.i, uv.j).unwrap();
        let wuv = DeviceTensor::from_host(&gpu, w_uv, &[w_uv.len()]).unwrap();
        let xd = DeviceTensor::from_host(&gpu, &o_lat, &[t, heads, latent]).unwrap();
        let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; t * heads * v], &[t, heads, v]).unwrap();
        decode_ops::head_bmm(&gpu, &xd, &wuv, uv, &mut out).unwrap();
        assert_close(&out.to_host(&gpu).unwrap(), &reference, 1e-3, "apply W_UV");
        // The same through a window offset into the whole kv_b weight (what the layer does).
        let uv_in_place = HeadWeightStrides { offset: nope * latent, ..uv };
        let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; t * heads * v], &[t, heads, v]).unwrap();
        decode_ops::head_bmm(&gpu, &xd, &wd, uv_in_place, &mut out).unwrap();
        assert_close(&out.to_host(&gpu).unwrap(), &reference, 1e-3, "apply W_UV through a weight offset");
    }
    // A reduction length that is not a multiple of the kernel's chunk (600 = 512 + 88) with an offset window.
    let (t, hs, k, n) = (5usize, 3usize, 600usize, 40usize);
    let x = random(t * hs * k, 61, 1.0);
    let wbig = random(7 + hs * k * n, 62, 0.05);
    let st = HeadWeightStrides { offset: 7, head: k * n, i: n, j: 1 };
    let reference = reference::head_bmm(&to_f32(&x), &to_f32(&wbig[7..]), t, hs, k, n, st.head, st.i, st.j).unwrap();
    let (xd, wd) = (
        DeviceTensor::from_host(&gpu, &x, &[t, hs, k]).unwrap(),
        DeviceTensor::from_host(&gpu, &wbig, &[wbig.len()]).unwrap(),
    );
    let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; t * hs * n], &[t, hs, n]).unwrap();
    decode_ops::head_bmm(&gpu, &xd, &wd, st, &mut out).unwrap();
    assert_close(&out.to_host(&gpu).unwrap(), &reference, 1e-3, "k = 600 with a weight offset");
    // A stride that would read past the weight is rejected before launch. (W_UK uses the first `nope` of each
    // head's nope + v rows, so the last head must move by more than v rows to leave the weight.)
    let xd = DeviceTensor::from_host(&gpu, &random(2 * heads * nope, 1, 1.0), &[2, heads, nope]).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&gpu, &[2, heads, latent]).unwrap();
    let too_far = HeadWeightStrides { offset: 0, head: (nope + v) * latent + 16 * latent, i: latent, j: 1 };
    let last = (heads - 1) * too_far.head + (nope - 1) * latent + latent - 1;
    assert!(last >= w.len(), "the rejected case must really reach past the weight");
    assert!(matches!(decode_ops::head_bmm(&gpu, &xd, &wd, too_far, &mut out), Err(Error::Shape { .. })));
}

#[test]
fn cache_append_matches_reference_and_never_writes_out_of_bounds() {
    let Some(gpu) = test_gpu("cache_append_matches_reference_and_never_writes_out_of_bounds") else { return };
    let (num_blocks, page, width, batch, max_blocks) = (12usize, 64usize, 576usize, 3usize, 4usize);
    let mut rng = SplitMix64::new(5);
    let mut table: Vec<i32> = (0..num_blocks as i32).collect();
    shuffle(&mut rng, &mut table);
    let cache0 = random(num_blocks * page * width, 8, 1.0);
    let rows = random(3 * width, 9, 1.0);
    let (seqs, pos) = (vec![0, 1, 2], vec![0, 130, 255]);
    let mut reference = to_f32(&cache0);
    reference::cache_append(&mut reference, &to_f32(&rows), width, page, &table, max_blocks, &seqs, &pos).unwrap();
    let mut cache = DeviceTensor::from_host(&gpu, &cache0, &[num_blocks, page, width]).unwrap();
    let rd = DeviceTensor::from_host(&gpu, &rows, &[3, width]).unwrap();
    let td = DeviceTensor::from_host(&gpu, &table, &[batch, max_blocks]).unwrap();
    let sd = DeviceTensor::from_host(&gpu, &seqs, &[3]).unwrap();
    let pd = DeviceTensor::from_host(&gpu, &pos, &[3]).unwrap();
    expect_launched(&gpu, &["cache_append_bf16"], || {
        decode_ops::cache_append(&gpu, &rd, &mut cache, &td, &sd, &pd, Some((&table, &seqs, &pos)))
    })
    .unwrap();
    assert_eq!(to_f32(&cache.to_host(&gpu).unwrap()), reference);

    // A garbage device table with no host copy: rows with bad slots are skipped on the device, nothing else changes.
    let bad_table = vec![i32::MAX; batch * max_blocks];
    let bd = DeviceTensor::from_host(&gpu, &bad_table, &[batch, max_blocks]).unwrap();
    decode_ops::cache_append(&gpu, &rd, &mut cache, &bd, &sd, &pd, None).unwrap();
    assert_eq!(to_f32(&cache.to_host(&gpu).unwrap()), reference);
    // With the host copy the same table is an error before launch.
    assert!(matches!(
        decode_ops::cache_append(&gpu, &rd, &mut cache, &bd, &sd, &pd, Some((&bad_table, &seqs, &pos))),
        Err(Error::IndexOutOfRange { .. })
    ));
}

#[test]
fn fused_add_norm_prefix_norm_and_column_copies() {
    let Some(gpu) = test_gpu("fused_add_norm_prefix_norm_and_column_copies") else { return };
    let (rows, d) = (9usize, 7168usize);
    let x = random(rows * d, 31, 2.0);
    let r = random(rows * d, 32, 2.0);
    let w = random(d, 33, 1.0);
    let h: Vec<bf16> = x.iter().zip(&r).map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32())).collect();
    let reference = reference::rms_norm(&to_f32(&h), &to_f32(&w), rows, 1e-6).unwrap();
    let (xd, rd, wd) = (
        DeviceTensor::from_host(&gpu, &x, &[rows, d]).unwrap(),
        DeviceTensor::from_host(&gpu, &r, &[rows, d]).unwrap(),
        DeviceTensor::from_host(&gpu, &w, &[d]).unwrap(),
    );
    let mut hd = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; rows * d], &[rows, d]).unwrap();
    let mut yd = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; rows * d], &[rows, d]).unwrap();
    decode_ops::add_rms_norm(&gpu, &xd, &rd, &mut hd, &wd, &mut yd, 1e-6).unwrap();
    assert_eq!(hd.to_host(&gpu).unwrap(), h, "residual sum");
    assert_close(&yd.to_host(&gpu).unwrap(), &reference, 1e-5, "add_rms_norm");

    // Prefix norm of a [rows, 576] kv row: first 512 normalized, last 64 untouched.
    let kv = random(rows * 576, 34, 3.0);
    let wl = random(512, 35, 1.0);
    let kv32 = to_f32(&kv);
    let prefix: Vec<f32> = (0..rows).flat_map(|i| kv32[i * 576..i * 576 + 512].to_vec()).collect();
    let normed = reference::rms_norm(&prefix, &to_f32(&wl), rows, 1e-6).unwrap();
    let mut kvd = DeviceTensor::from_host(&gpu, &kv, &[rows, 576]).unwrap();
    let wld = DeviceTensor::from_host(&gpu, &wl, &[512]).unwrap();
    decode_ops::rms_norm_prefix_inplace(&gpu, &mut kvd, &wld, 1e-6).unwrap();
    let got = kvd.to_host(&gpu).unwrap();
    for i in 0..rows {
        assert_close(&got[i * 576..i * 576 + 512], &normed[i * 512..(i + 1) * 512], 1e-5, "prefix norm");
        assert_eq!(&got[i * 576 + 512..(i + 1) * 576], &kv[i * 576 + 512..(i + 1) * 576], "rope columns changed");
    }

    // Column copy: q_pe (last 64 of each 192-wide head) into the last 64 of a 576-wide MLA query row.
    let (t, heads) = (3usize, 4usize);
    let q = random(t * heads * 192, 36, 1.0);
    let qd = DeviceTensor::from_host(&gpu, &q, &[t, heads, 192]).unwrap();
    let mut mla_q = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; t * heads * 576], &[t, heads, 576]).unwrap();
    expect_launched(&gpu, &["copy_columns_bf16"], || decode_ops::copy_columns(&gpu, &qd, 128, &mut mla_q, 512, 64))
        .unwrap();
    let got = mla_q.to_host(&gpu).unwrap();
    for row in 0..t * heads {
        assert_eq!(&got[row * 576 + 512..(row + 1) * 576], &q[row * 192 + 128..(row + 1) * 192]);
        assert!(got[row * 576..row * 576 + 512].iter().all(|v| v.is_nan()), "copy wrote outside its window");
    }
    assert!(decode_ops::copy_columns(&gpu, &qd, 129, &mut mla_q, 512, 64).is_err());
    assert!(decode_ops::copy_columns(&gpu, &qd, 128, &mut mla_q, 513, 64).is_err());

    // Windowed bmm: absorb q_nope (first 128 of each 192) into the first 512 of the 576-wide query.
    let w = random(heads * 256 * 512, 37, 0.05);
    let wdev = DeviceTensor::from_host(&gpu, &w, &[heads * 256, 512]).unwrap();
    let uk = HeadWeightStrides { offset: 0, head: 256 * 512, i: 512, j: 1 };
    let q_nope: Vec<f32> = (0..t * heads).flat_map(|row| to_f32(&q[row * 192..row * 192 + 128])).collect();
    let reference = reference::head_bmm(&q_nope, &to_f32(&w), t, heads, 128, 512, uk.head, uk.i, uk.j).unwrap();
    decode_ops::head_bmm_windows(
        &gpu,
        &qd,
        decode_ops::Columns { col: 0, len: 128 },
        &wdev,
        uk,
        &mut mla_q,
        decode_ops::Columns { col: 0, len: 512 },
    )
    .unwrap();
    let got = mla_q.to_host(&gpu).unwrap();
    for row in 0..t * heads {
        assert_close(&got[row * 576..row * 576 + 512], &reference[row * 512..(row + 1) * 512], 1e-3, "windowed bmm");
        assert_eq!(
            &got[row * 576 + 512..(row + 1) * 576],
            &q[row * 192 + 128..(row + 1) * 192],
            "window overwrote q_pe"
        );
    }
}

#[test]
fn head_bmm_with_f32_output_computes_router_logits() {
    let Some(gpu) = test_gpu("head_bmm_with_f32_output_computes_router_logits") else { return };
    let (t, hidden, experts) = (5usize, 7168usize, 256usize);
    let x = random(t * hidden, 41, 1.0);
    let w = random(experts * hidden, 42, 0.02);
    let strides = HeadWeightStrides { offset: 0, head: 0, i: 1, j: hidden };
    let reference = reference::head_bmm(&to_f32(&x), &to_f32(&w), t, 1, hidden, experts, 0, 1, hidden).unwrap();
    let xd = DeviceTensor::from_host(&gpu, &x, &[t, 1, hidden]).unwrap();
    let wd = DeviceTensor::from_host(&gpu, &w, &[experts, hidden]).unwrap();
    let mut logits = DeviceTensor::from_host(&gpu, &vec![f32::NAN; t * experts], &[t, 1, experts]).unwrap();
    decode_ops::head_bmm(&gpu, &xd, &wd, strides, &mut logits).unwrap();
    for (g, r) in logits.to_host(&gpu).unwrap().iter().zip(&reference) {
        assert!((g - r).abs() <= 1e-5 * r.abs() + 1e-5, "logit {g} vs {r}");
    }
}

#[test]
fn add_matches_reference_bitwise() {
    let Some(gpu) = test_gpu("add_matches_reference_bitwise") else { return };
    // Odd lengths (a scalar tail after any vector width) and one large enough for several blocks.
    for &(rows, d) in &[(1usize, 7168usize), (3, 5), (37, 1536)] {
        let (a, b) = (random(rows * d, 91 + rows as u64, 3.0), random(rows * d, 92 + rows as u64, 3.0));
        let want: Vec<u16> = a.iter().zip(&b).map(|(x, y)| bf16::from_f32(x.to_f32() + y.to_f32()).to_bits()).collect();
        let (ad, bd) = (
            DeviceTensor::from_host(&gpu, &a, &[rows, d]).unwrap(),
            DeviceTensor::from_host(&gpu, &b, &[rows, d]).unwrap(),
        );
        let mut out = DeviceTensor::from_host(&gpu, &vec![bf16::NAN; rows * d], &[rows, d]).unwrap();
        expect_launched(&gpu, &["add_bf16"], || decode_ops::add(&gpu, &ad, &bd, &mut out)).unwrap();
        let got: Vec<u16> = out.to_host(&gpu).unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "add {rows}×{d}: bf16(a + b) elementwise");
    }
    let short = DeviceTensor::<bf16>::zeros(&gpu, &[3, 4]).unwrap();
    let mut out = DeviceTensor::from_host(&gpu, &[bf16::NAN; 15], &[3, 5]).unwrap();
    let b = DeviceTensor::<bf16>::zeros(&gpu, &[3, 5]).unwrap();
    assert!(decode_ops::add(&gpu, &short, &b, &mut out).is_err());
    assert!(out.to_host(&gpu).unwrap().iter().all(|v| v.is_nan()), "a rejected add wrote its output");
}
