//! The checkpoint loader on generated checkpoints in the real DeepSeek-V3 layout (reduced dimensions): bit-exact round
//! trips with and without the shard index, and a clear error (never a panic) for every kind of malformed file.

use std::fs;
use std::path::{Path, PathBuf};

use r1_kernels::checkpoint::{load_layer, write_layer_checkpoint, Checkpoint, INDEX_FILE};
use r1_kernels::model::{synthetic_layer_weights, DeepSeekV3Config, MlpWeights, TensorDtype};
use r1_kernels::Error;

/// A fresh, empty directory for one test (removed at the end of a passing test).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("r1k-test-ckpt-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn io_message(r: r1_kernels::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Io { message, .. }) => message,
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

fn cfg() -> DeepSeekV3Config {
    DeepSeekV3Config::reduced()
}

#[test]
fn round_trip_is_bit_exact_with_and_without_index() {
    let cfg = cfg();
    let dir = scratch("roundtrip");
    // A dense layer and two MoE layers in one directory: the index accumulates all three.
    let layers: Vec<_> = [0usize, 1, 3].iter().map(|&l| synthetic_layer_weights(&cfg, l, 42).unwrap()).collect();
    for w in &layers {
        let files = write_layer_checkpoint(&dir, &cfg, w).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|f| f.is_file()));
    }
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.has_index());
    for w in &layers {
        let mut shards_seen = Vec::new();
        let loaded = ckpt.load_layer_with_progress(&cfg, w.layer, |p| shards_seen.push(p.file.clone())).unwrap();
        assert_eq!(&loaded, w, "layer {}", w.layer);
        // Only this layer's two shards are read.
        assert_eq!(shards_seen.len(), 2, "{shards_seen:?}");
        assert!(shards_seen.iter().all(|f| f.to_string_lossy().contains(&format!("layer{}-", w.layer))));
    }
    assert!(matches!(layers[0].mlp, MlpWeights::Dense(_)));
    assert!(matches!(layers[1].mlp, MlpWeights::Moe(_)));

    // Bit-exact down to the bytes of the f32 and bf16 tensors.
    let loaded = load_layer(&dir, &cfg, 1).unwrap();
    let a = layers[1].named_tensors();
    let b = loaded.named_tensors();
    for ((na, sa, ta), (nb, sb, tb)) in a.iter().zip(&b) {
        assert_eq!((na, sa), (nb, sb));
        assert_eq!(ta.to_le_bytes(), tb.to_le_bytes(), "{na}");
    }

    // Without the index, every shard's header is scanned instead.
    fs::remove_file(dir.join(INDEX_FILE)).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(!ckpt.has_index());
    for w in &layers {
        assert_eq!(&ckpt.load_layer(&cfg, w.layer).unwrap(), w);
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn written_files_use_the_checkpoint_names_dtypes_and_shapes() {
    let cfg = cfg();
    let dir = scratch("layout");
    let w = synthetic_layer_weights(&cfg, 2, 7).unwrap();
    write_layer_checkpoint(&dir, &cfg, &w).unwrap();
    let index = fs::read_to_string(dir.join(INDEX_FILE)).unwrap();
    for spec in cfg.layer_tensor_specs(2) {
        assert!(index.contains(&format!("\"{}\"", spec.name)), "{} not in the index", spec.name);
    }
    for name in [
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.self_attn.q_a_proj.weight",
        "model.layers.2.self_attn.q_a_proj.weight_scale_inv",
        "model.layers.2.self_attn.q_a_layernorm.weight",
        "model.layers.2.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
        "model.layers.2.self_attn.kv_b_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.2.post_attention_layernorm.weight",
        "model.layers.2.mlp.gate.weight",
        "model.layers.2.mlp.gate.e_score_correction_bias",
        "model.layers.2.mlp.experts.7.down_proj.weight",
        "model.layers.2.mlp.shared_experts.up_proj.weight_scale_inv",
    ] {
        assert!(index.contains(name), "{name}");
    }
    let specs = cfg.layer_tensor_specs(2);
    let kv_a_scale = specs.iter().find(|s| s.name.ends_with("kv_a_proj_with_mqa.weight_scale_inv")).unwrap();
    // 576 rows → 5 row blocks (the last one partial), 256 columns → 2.
    assert_eq!((kv_a_scale.dtype, kv_a_scale.shape.clone()), (TensorDtype::F32, vec![5, 2]));
    let bias = specs.iter().find(|s| s.name.ends_with("e_score_correction_bias")).unwrap();
    assert_eq!(bias.dtype, TensorDtype::F32);
    let raw = fs::read(dir.join("model-layer2-attn.safetensors")).unwrap();
    let header =
        String::from_utf8_lossy(&raw[8..8 + u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize]).to_string();
    assert!(header.contains("\"F8_E4M3\"") && header.contains("\"BF16\"") && header.contains("\"F32\""));
    fs::remove_dir_all(&dir).unwrap();
}

/// Writes layer 1 of the reduced model, then lets `corrupt` damage the directory.
fn damaged(name: &str, corrupt: impl FnOnce(&Path)) -> (PathBuf, DeepSeekV3Config) {
    let cfg = cfg();
    let dir = scratch(name);
    write_layer_checkpoint(&dir, &cfg, &synthetic_layer_weights(&cfg, 1, 3).unwrap()).unwrap();
    corrupt(&dir);
    (dir, cfg)
}

/// Rewrites one tensor of a shard: new dtype, shape and (edited) bytes, which need not agree with each other. The
/// shard is read with the `safetensors` crate and written back by hand, so the result can be invalid on purpose.
fn rewrite_tensor(path: &Path, name: &str, dtype: &str, shape: &[usize], edit: impl FnOnce(&mut Vec<u8>)) {
    let raw = fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let mut tensors: Vec<(String, String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype().to_string(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let target = tensors.iter_mut().find(|t| t.0 == name).unwrap_or_else(|| panic!("{name} not in {}", path.display()));
    target.1 = dtype.to_string();
    target.2 = shape.to_vec();
    edit(&mut target.3);
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut data = Vec::new();
    for (tname, tdtype, tshape, bytes) in &tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.push_str(&format!(
            ",\"{tname}\":{{\"dtype\":\"{tdtype}\",\"shape\":{tshape:?},\"data_offsets\":[{start},{}]}}",
            data.len()
        ));
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    fs::write(path, out).unwrap();
}

#[test]
fn rewrite_helper_preserves_a_valid_file() {
    // Sanity check of the test helper itself: rewriting a tensor with its own dtype and shape changes nothing.
    let (dir, cfg) = damaged("helper", |dir| {
        let name = "model.layers.1.self_attn.kv_a_layernorm.weight";
        rewrite_tensor(&dir.join("model-layer1-attn.safetensors"), name, "BF16", &[512], |_| {});
    });
    assert_eq!(load_layer(&dir, &cfg, 1).unwrap(), synthetic_layer_weights(&cfg, 1, 3).unwrap());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let name = "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv";
    // Missing from the shard but still listed in the index.
    let (dir, cfg) = damaged("missing-shard", |dir| {
        let text = fs::read_to_string(dir.join(INDEX_FILE)).unwrap();
        assert!(text.contains(name));
        // Rename the tensor inside the file (same length, so offsets stay valid).
        let path = dir.join("model-layer1-mlp.safetensors");
        let raw = fs::read(&path).unwrap();
        let needle = name.as_bytes();
        let pos = raw.windows(needle.len()).position(|w| w == needle).unwrap();
        let mut raw = raw;
        raw[pos + needle.len() - 3..pos + needle.len()].copy_from_slice(b"xyz");
        fs::write(&path, raw).unwrap();
    });
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains("missing tensor") && msg.contains(name), "{msg}");
    // Missing from the index.
    let text = fs::read_to_string(dir.join(INDEX_FILE)).unwrap();
    let filtered: String = text.lines().filter(|l| !l.contains(name)).map(|l| format!("{l}\n")).collect();
    fs::write(dir.join(INDEX_FILE), filtered).unwrap();
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains("missing tensor") && msg.contains(name) && msg.contains(INDEX_FILE), "{msg}");
    // No index: found in no shard.
    fs::remove_file(dir.join(INDEX_FILE)).unwrap();
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(
        msg.contains("missing tensor") && msg.contains(name) && msg.contains("no model.safetensors.index.json"),
        "{msg}"
    );
    // A layer that is not in the checkpoint at all.
    let msg = io_message(load_layer(&dir, &cfg, 2));
    assert!(msg.contains("missing tensor `model.layers.2.") && msg.contains("more"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_dtype_is_reported_with_expected_and_actual() {
    let name = "model.layers.1.self_attn.q_a_proj.weight";
    let (dir, cfg) = damaged("dtype", |dir| {
        // Stored as BF16 [192, 256] instead of F8_E4M3.
        rewrite_tensor(&dir.join("model-layer1-attn.safetensors"), name, "BF16", &[192, 256], |b| {
            b.resize(192 * 256 * 2, 0x3c)
        });
    });
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains(name) && msg.contains("expected dtype F8_E4M3") && msg.contains("got BF16"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();

    let name = "model.layers.1.mlp.gate.e_score_correction_bias";
    let (dir, cfg) = damaged("dtype-bias", |dir| {
        rewrite_tensor(&dir.join("model-layer1-attn.safetensors"), name, "BF16", &[8], |b| b.truncate(16));
    });
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains(name) && msg.contains("expected dtype F32") && msg.contains("got BF16"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_shape_is_reported_with_expected_and_actual() {
    let name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv";
    let (dir, cfg) = damaged("shape", |dir| {
        // [4, 2] instead of [5, 2]: the partial last row block forgotten.
        rewrite_tensor(&dir.join("model-layer1-attn.safetensors"), name, "F32", &[4, 2], |b| b.truncate(4 * 2 * 4));
    });
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains(name) && msg.contains("expected shape [5, 2]") && msg.contains("got [4, 2]"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();

    // A checkpoint of another model size loaded with the wrong configuration.
    let (dir, _) = damaged("shape-config", |_| {});
    let other = DeepSeekV3Config { hidden: 384, ..DeepSeekV3Config::reduced() };
    let msg = io_message(load_layer(&dir, &other, 1));
    assert!(msg.contains("expected shape") && msg.contains("384"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_file_is_an_error() {
    for (label, keep) in [("data", 0.5f64), ("header", 0.0001), ("tiny", 0.0)] {
        let (dir, cfg) = damaged(&format!("trunc-{label}"), |dir| {
            let path = dir.join("model-layer1-mlp.safetensors");
            let raw = fs::read(&path).unwrap();
            let keep = if keep == 0.0 { 5 } else { ((raw.len() as f64 * keep) as usize).max(9) };
            fs::write(&path, &raw[..keep]).unwrap();
        });
        let msg = io_message(load_layer(&dir, &cfg, 1));
        assert!(msg.contains("model-layer1-mlp.safetensors") && msg.contains("not a valid safetensors file"), "{msg}");
        // The header scan (no index) reports it too.
        fs::remove_file(dir.join(INDEX_FILE)).unwrap();
        let msg = io_message(load_layer(&dir, &cfg, 1));
        assert!(msg.contains("model-layer1-mlp.safetensors"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn garbage_is_an_error() {
    let garbage: [(&str, Vec<u8>); 5] = [
        ("json", {
            let h = b"{\"a\": [1, 2,, }   ";
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h);
            v
        }),
        ("huge-length", u64::MAX.to_le_bytes().iter().chain(b"{}").copied().collect()),
        ("binary", (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
        ("not-utf8", {
            let mut v = 8u64.to_le_bytes().to_vec();
            v.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, b'{', b'}', b' ', b' ']);
            v
        }),
        ("bad-offsets", {
            let h = br#"{"model.layers.1.input_layernorm.weight":{"dtype":"BF16","shape":[256],"data_offsets":[0,999999]}}"#;
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h);
            v.extend_from_slice(&[0u8; 512]);
            v
        }),
    ];
    for (label, bytes) in garbage {
        let (dir, cfg) = damaged(&format!("garbage-{label}"), |dir| {
            fs::write(dir.join("model-layer1-attn.safetensors"), &bytes).unwrap();
        });
        let msg = io_message(load_layer(&dir, &cfg, 1));
        assert!(
            msg.contains("model-layer1-attn.safetensors") && msg.contains("not a valid safetensors file"),
            "{label}: {msg}"
        );
        fs::remove_file(dir.join(INDEX_FILE)).unwrap();
        let msg = io_message(load_layer(&dir, &cfg, 1));
        assert!(msg.contains("model-layer1-attn.safetensors"), "{label} (no index): {msg}");
        fs::remove_dir_all(&dir).unwrap();
    }
    // A broken index.
    let (dir, cfg) = damaged("garbage-index", |dir| fs::write(dir.join(INDEX_FILE), "{\"weight_map\": [").unwrap());
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains(INDEX_FILE) && msg.contains("not valid JSON"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();
    // No such directory; layer out of range.
    assert!(matches!(
        load_layer("/nonexistent/r1k", &cfg, 1),
        Err(Error::Io { kind: std::io::ErrorKind::NotFound, .. })
    ));
    assert!(matches!(load_layer(std::env::temp_dir(), &cfg, 99), Err(Error::InvalidConfig(_))));
}

#[test]
fn corrupt_values_are_errors() {
    // A NaN FP8 code and a negative scale: the files are well-formed, the numbers are not.
    let (dir, cfg) = damaged("nan", |dir| {
        let path = dir.join("model-layer1-attn.safetensors");
        let name = "model.layers.1.self_attn.o_proj.weight";
        let raw = fs::read(&path).unwrap();
        let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&raw[8..8 + n]).unwrap();
        let at = header.find(&format!("\"{name}\"")).unwrap();
        let offs = &header[at..];
        let offs = &offs[offs.find("data_offsets\":[").unwrap() + 15..];
        let start: usize = offs[..offs.find(',').unwrap()].parse().unwrap();
        let mut raw = raw.clone();
        raw[8 + n + start + 17] = 0x7f;
        fs::write(&path, raw).unwrap();
    });
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains("o_proj.weight") && msg.contains("NaN"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();

    let (dir, cfg) = damaged("neg-scale", |dir| {
        let name = "model.layers.1.self_attn.q_b_proj.weight_scale_inv";
        // q_b_proj is [384, 192] → scales [3, 2]; make the fourth one negative.
        rewrite_tensor(&dir.join("model-layer1-attn.safetensors"), name, "F32", &[3, 2], |b| {
            b[12..16].copy_from_slice(&(-0.5f32).to_le_bytes())
        });
    });
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains("q_b_proj.weight_scale_inv") && msg.contains("-0.5") && msg.contains("block 3"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();

    // Data whose length disagrees with the declared shape is an invalid file.
    let (dir, cfg) = damaged("short-data", |dir| {
        let name = "model.layers.1.self_attn.q_b_proj.weight_scale_inv";
        rewrite_tensor(&dir.join("model-layer1-attn.safetensors"), name, "F32", &[3, 2], |b| b.truncate(8));
    });
    let msg = io_message(load_layer(&dir, &cfg, 1));
    assert!(msg.contains("model-layer1-attn.safetensors") && msg.contains("not a valid safetensors file"), "{msg}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn index_entries_outside_the_directory_are_refused() {
    let cfg = cfg();
    let root = scratch("index-escape");
    let dir = root.join("ckpt");
    fs::create_dir_all(&dir).unwrap();
    let w = synthetic_layer_weights(&cfg, 0, 5).unwrap();
    let files = write_layer_checkpoint(&dir, &cfg, &w).unwrap();
    // A valid shard one level up: an index pointing at `../` must not reach it (it once loaded from there).
    let outside = root.join("outside.safetensors");
    fs::copy(&files[0], &outside).unwrap();
    let index = fs::read_to_string(dir.join(INDEX_FILE)).unwrap();
    let first = files[0].file_name().unwrap().to_string_lossy().to_string();
    for target in ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors", "..", ""] {
        fs::write(dir.join(INDEX_FILE), index.replace(&format!("\"{first}\""), &format!("{target:?}"))).unwrap();
        let msg = io_message(Checkpoint::open(&dir).and_then(|c| c.load_layer(&cfg, 0)));
        assert!(msg.contains("not a file name in the checkpoint directory"), "{target}: {msg}");
    }
    fs::remove_dir_all(&root).unwrap();
}
