//! Loading (and writing) one decoder layer of a DeepSeek-V3/R1 FP8 checkpoint in safetensors format.
//!
//! A checkpoint is a directory of `*.safetensors` shards, normally with a `model.safetensors.index.json` whose
//! `weight_map` names the shard of every tensor. With an index, only the shards holding the requested layer are opened;
//! without one, every shard's header (a few hundred KB) is parsed to find them. Shards are memory-mapped and parsed by
//! the `safetensors` crate, which validates the header, the offsets and the file length; only the requested tensors'
//! bytes are then read, copied out and checked against the expected dtype and shape (from
//! [`DeepSeekV3Config::layer_tensor_specs`]). Every problem is an [`Error::Io`] naming the tensor and the file, never a
//! panic.
//!
//! A V3 MoE layer is ≈ 11.4 GB, the memory a load allocates; the mapped shards (≈ 4.3 GB each in the released
//! checkpoints) are page cache, not allocations.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};

use half::bf16;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, View};

use crate::error::{Error, Result};
use crate::fp8::E4M3;
pub use crate::model::synthetic_layer_weights;
use crate::model::{
    layer_prefix, DeepSeekV3Config, FfnWeights, Fp8Linear, LayerWeights, MlaWeights, MlpWeights, MoeWeights,
    TensorDtype, TensorRef,
};

/// File name of the shard index in Hugging Face checkpoints.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Malformed or missing contents: an [`Error::Io`] of kind `InvalidData`.
fn io_err(msg: impl Into<String>) -> Error {
    Error::invalid_data(msg)
}

fn dtype_of(d: TensorDtype) -> Dtype {
    match d {
        TensorDtype::F8E4M3 => Dtype::F8_E4M3,
        TensorDtype::Bf16 => Dtype::BF16,
        TensorDtype::F32 => Dtype::F32,
    }
}

/// One tensor as read from a shard: dtype, shape, little-endian bytes, and where it came from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Storage type as written in the file.
    pub dtype: Dtype,
    /// Shape as written in the file.
    pub shape: Vec<usize>,
    /// The raw little-endian bytes.
    pub data: Vec<u8>,
    /// The shard it was read from.
    pub file: PathBuf,
}

/// Progress of a load, reported before each shard is read.
#[derive(Debug, Clone)]
pub struct LoadProgress {
    /// The shard about to be read.
    pub file: PathBuf,
    /// Its size in bytes.
    pub file_bytes: u64,
    /// Shards already read.
    pub files_done: usize,
    /// Shards to read in all.
    pub files_total: usize,
}

/// A checkpoint directory, with its index when it has one.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    /// Tensor name → shard file name, from the index.
    index: Option<HashMap<String, String>>,
}

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
struct HeaderEntry {
    name: String,
    /// Bytes of data (the span of its `data_offsets`).
    data_bytes: u64,
}

/// Maps `path` read-only.
fn map_file(path: &Path) -> Result<Mmap> {
    let file = fs::File::open(path).map_err(|e| Error::io(format_args!("{}", path.display()), &e))?;
    // SAFETY: the map is only read, and only during the load. A process truncating or rewriting the shard while it
    // is loaded would change the mapped bytes or fault on them (SIGBUS); checkpoint files are not written while they
    // are loaded, the contract every memory-mapping safetensors loader relies on.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(format_args!("mapping {}", path.display()), &e))
}

fn not_safetensors(path: &Path, e: impl Display) -> Error {
    io_err(format!("{}: not a valid safetensors file (truncated or corrupt?): {e}", path.display()))
}

/// The tensors listed in a safetensors file's header, in data order. The `safetensors` crate validates the header,
/// the offsets and the file length; only the header's pages of the mapped file are read.
fn read_header(path: &Path) -> Result<Vec<HeaderEntry>> {
    let map = map_file(path)?;
    let (_, metadata) = SafeTensors::read_metadata(&map[..]).map_err(|e| not_safetensors(path, e))?;
    let mut entries = Vec::new();
    for name in metadata.offset_keys() {
        if let Some(info) = metadata.info(&name) {
            let (begin, end) = info.data_offsets;
            entries.push(HeaderEntry { name, data_bytes: (end - begin) as u64 });
        }
    }
    Ok(entries)
}

fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(format_args!("{}", path.display()), &e))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| io_err(format!("{}: not valid JSON: {e}", path.display())))?;
    let Some(map) = doc.get("weight_map").and_then(serde_json::Value::as_object) else {
        return Err(io_err(format!("{}: no `weight_map` object", path.display())));
    };
    let mut out = HashMap::with_capacity(map.len());
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| io_err(format!("{}: weight_map entry for `{name}` is not a string", path.display())))?;
        // Shards live in the checkpoint's directory: an entry is a plain file name, never a path that could lead
        // out of it (`../x`, `/abs`, `sub/x`).
        let mut parts = Path::new(file).components();
        if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) {
            return Err(io_err(format!(
                "{}: weight_map entry for `{name}` is `{file}`, not a file name in the checkpoint directory",
                path.display()
            )));
        }
        out.insert(name.clone(), file.to_string());
    }
    Ok(out)
}

fn list_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        fs::read_dir(dir).map_err(|e| Error::io(format_args!("checkpoint directory {}", dir.display()), &e))?;
    let mut shards = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(format_args!("{}", dir.display()), &e))?.path();
        if path.extension().is_some_and(|x| x == "safetensors") && path.is_file() {
            shards.push(path);
        }
    }
    shards.sort();
    Ok(shards)
}

impl Checkpoint {
    /// Opens a checkpoint directory, reading `model.safetensors.index.json` when present.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::Io {
                kind: std::io::ErrorKind::NotFound,
                message: format!("checkpoint directory {} does not exist or is not a directory", dir.display()),
            });
        }
        let index_path = dir.join(INDEX_FILE);
        let index = if index_path.is_file() { Some(read_index(&index_path)?) } else { None };
        Ok(Checkpoint { dir, index })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the directory has a shard index.
    pub fn has_index(&self) -> bool {
        self.index.is_some()
    }

    /// Which shard holds each of `names`: from the index, or by reading every shard's header.
    fn locate(&self, names: &[String]) -> Result<BTreeMap<PathBuf, Vec<String>>> {
        let mut by_file: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
        let mut missing = Vec::new();
        if let Some(index) = &self.index {
            for name in names {
                match index.get(name) {
                    Some(file) => by_file.entry(self.dir.join(file)).or_default().push(name.clone()),
                    None => missing.push(name.clone()),
                }
            }
            if !missing.is_empty() {
                return Err(missing_error(&missing, &format!("not listed in {}", self.dir.join(INDEX_FILE).display())));
            }
        } else {
            let shards = list_shards(&self.dir)?;
            let mut wanted: HashMap<&str, bool> = names.iter().map(|n| (n.as_str(), false)).collect();
            for shard in &shards {
                for entry in read_header(shard)? {
                    if let Some(found) = wanted.get_mut(entry.name.as_str()) {
                        if !*found {
                            *found = true;
                            by_file.entry(shard.clone()).or_default().push(entry.name);
                        }
                    }
                }
            }
            missing.extend(names.iter().filter(|n| !wanted[n.as_str()]).cloned());
            if !missing.is_empty() {
                return Err(missing_error(
                    &missing,
                    &format!(
                        "not found in any of the {} safetensors files in {} (which has no {INDEX_FILE})",
                        shards.len(),
                        self.dir.display()
                    ),
                ));
            }
        }
        Ok(by_file)
    }

    /// Reads the named tensors, each shard once, calling `progress` before each shard.
    pub fn read_tensors(&self, names: &[String], mut progress: impl FnMut(&LoadProgress)) -> Result<TensorSet> {
        let by_file = self.locate(names)?;
        let mut tensors = HashMap::with_capacity(names.len());
        let files_total = by_file.len();
        for (files_done, (file, wanted)) in by_file.into_iter().enumerate() {
            let map = map_file(&file)?;
            progress(&LoadProgress { file: file.clone(), file_bytes: map.len() as u64, files_done, files_total });
            let st = SafeTensors::deserialize(&map[..]).map_err(|e| not_safetensors(&file, e))?;
            for name in wanted {
                let view = st.tensor(&name).map_err(|_| {
                    io_err(format!(
                        "missing tensor `{name}`: the index places it in {}, which does not contain it",
                        file.display()
                    ))
                })?;
                let raw = RawTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                    file: file.clone(),
                };
                tensors.insert(name, raw);
            }
        }
        Ok(TensorSet { tensors })
    }

    /// Loads every tensor of decoder layer `layer`, checked against `cfg`.
    pub fn load_layer(&self, cfg: &DeepSeekV3Config, layer: usize) -> Result<LayerWeights> {
        self.load_layer_with_progress(cfg, layer, |_| {})
    }

    /// [`Self::load_layer`] with a callback before each shard is read (for a progress indicator).
    pub fn load_layer_with_progress(
        &self,
        cfg: &DeepSeekV3Config,
        layer: usize,
        progress: impl FnMut(&LoadProgress),
    ) -> Result<LayerWeights> {
        cfg.validate()?;
        if layer >= cfg.num_layers {
            return Err(Error::InvalidConfig(format!(
                "layer {layer} does not exist: the model has {} decoder layers",
                cfg.num_layers
            )));
        }
        let names: Vec<String> = cfg.layer_tensor_specs(layer).into_iter().map(|s| s.name).collect();
        let mut set = self.read_tensors(&names, progress)?;
        set.take_layer(cfg, layer)
    }
}

fn missing_error(missing: &[String], why: &str) -> Error {
    let more = if missing.len() > 1 { format!(" (and {} more)", missing.len() - 1) } else { String::new() };
    io_err(format!("missing tensor `{}`{more}: {why}", missing[0]))
}

/// Loads decoder layer `layer` from the checkpoint in `dir` (see [`Checkpoint`]).
pub fn load_layer(dir: impl AsRef<Path>, cfg: &DeepSeekV3Config, layer: usize) -> Result<LayerWeights> {
    Checkpoint::open(dir)?.load_layer(cfg, layer)
}

/// Tensors read from a checkpoint, with typed, checked accessors that move the data out.
#[derive(Debug, Default)]
pub struct TensorSet {
    tensors: HashMap<String, RawTensor>,
}

impl TensorSet {
    /// The raw tensor `name`, if it was read.
    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.get(name)
    }

    /// Number of tensors held.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when no tensor is held.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn take(&mut self, name: &str, dtype: TensorDtype, shape: &[usize]) -> Result<RawTensor> {
        let t = self.tensors.remove(name).ok_or_else(|| io_err(format!("missing tensor `{name}`")))?;
        let want = dtype_of(dtype);
        if t.dtype != want {
            return Err(io_err(format!(
                "tensor `{name}` in {}: expected dtype {want}, got {}",
                t.file.display(),
                t.dtype
            )));
        }
        if t.shape != shape {
            return Err(io_err(format!(
                "tensor `{name}` in {}: expected shape {shape:?}, got {:?}",
                t.file.display(),
                t.shape
            )));
        }
        // The safetensors crate checked that the byte length matches dtype × shape.
        debug_assert_eq!(t.data.len(), shape.iter().product::<usize>() * dtype.size());
        Ok(t)
    }

    /// Takes a bf16 tensor of exactly `shape`.
    pub fn take_bf16(&mut self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
        let t = self.take(name, TensorDtype::Bf16, shape)?;
        Ok(t.data.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect())
    }

    /// Takes an f32 tensor of exactly `shape`.
    pub fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.take(name, TensorDtype::F32, shape)?;
        Ok(t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Takes an FP8 E4M3 tensor of exactly `shape`; NaN codes (never produced by quantization) are an error.
    pub fn take_e4m3(&mut self, name: &str, shape: &[usize]) -> Result<Vec<E4M3>> {
        let t = self.take(name, TensorDtype::F8E4M3, shape)?;
        if let Some(i) = t.data.iter().position(|&b| b & 0x7f == 0x7f) {
            return Err(io_err(format!(
                "tensor `{name}` in {}: NaN code {:#04x} at element {i}: corrupt weights",
                t.file.display(),
                t.data[i]
            )));
        }
        // Same size and alignment: this collect reuses the allocation.
        Ok(t.data.into_iter().map(E4M3).collect())
    }

    /// Takes `{prefix}.weight` (`[n, k]` FP8) and `{prefix}.weight_scale_inv` (`[ceil(n/128), ceil(k/128)]` f32,
    /// finite and non-negative).
    pub fn take_fp8_linear(&mut self, prefix: &str, n: usize, k: usize) -> Result<Fp8Linear> {
        let weight = self.take_e4m3(&format!("{prefix}.weight"), &[n, k])?;
        let scale_name = format!("{prefix}.weight_scale_inv");
        let file = self.tensors.get(&scale_name).map(|t| t.file.clone());
        let scales = self
            .take_f32(&scale_name, &[n.div_ceil(crate::model::WEIGHT_BLOCK), k.div_ceil(crate::model::WEIGHT_BLOCK)])?;
        if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
            return Err(io_err(format!(
                "tensor `{scale_name}` in {}: scale {} at block {i} is not a finite non-negative number",
                file.unwrap_or_default().display(),
                scales[i]
            )));
        }
        Fp8Linear::new(n, k, weight, scales)
    }

    fn take_ffn(&mut self, base: &str, inter: usize, hidden: usize) -> Result<FfnWeights> {
        Ok(FfnWeights {
            gate_proj: self.take_fp8_linear(&format!("{base}.gate_proj"), inter, hidden)?,
            up_proj: self.take_fp8_linear(&format!("{base}.up_proj"), inter, hidden)?,
            down_proj: self.take_fp8_linear(&format!("{base}.down_proj"), hidden, inter)?,
        })
    }

    /// Assembles decoder layer `layer` from the tensors held, checking every dtype and shape against `cfg`.
    pub fn take_layer(&mut self, cfg: &DeepSeekV3Config, layer: usize) -> Result<LayerWeights> {
        let p = layer_prefix(layer);
        let h = cfg.num_heads;
        let d = cfg.hidden;
        let self_attn = MlaWeights {
            q_a_proj: self.take_fp8_linear(&format!("{p}self_attn.q_a_proj"), cfg.q_lora_rank, d)?,
            q_a_layernorm: self.take_bf16(&format!("{p}self_attn.q_a_layernorm.weight"), &[cfg.q_lora_rank])?,
            q_b_proj: self.take_fp8_linear(
                &format!("{p}self_attn.q_b_proj"),
                h * cfg.qk_head_dim(),
                cfg.q_lora_rank,
            )?,
            kv_a_proj_with_mqa: self.take_fp8_linear(
                &format!("{p}self_attn.kv_a_proj_with_mqa"),
                cfg.kv_cache_dim(),
                d,
            )?,
            kv_a_layernorm: self.take_bf16(&format!("{p}self_attn.kv_a_layernorm.weight"), &[cfg.kv_lora_rank])?,
            kv_b_proj: self.take_fp8_linear(
                &format!("{p}self_attn.kv_b_proj"),
                h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                cfg.kv_lora_rank,
            )?,
            o_proj: self.take_fp8_linear(&format!("{p}self_attn.o_proj"), d, h * cfg.v_head_dim)?,
        };
        let mlp = if cfg.is_moe_layer(layer) {
            let e = cfg.n_routed_experts;
            let gate_weight = self.take_bf16(&format!("{p}mlp.gate.weight"), &[e, d])?;
            let e_score_correction_bias = self.take_f32(&format!("{p}mlp.gate.e_score_correction_bias"), &[e])?;
            let experts = (0..e)
                .map(|i| self.take_ffn(&format!("{p}mlp.experts.{i}"), cfg.moe_intermediate, d))
                .collect::<Result<Vec<_>>>()?;
            let shared_experts = self.take_ffn(&format!("{p}mlp.shared_experts"), cfg.shared_intermediate(), d)?;
            MlpWeights::Moe(MoeWeights { gate_weight, e_score_correction_bias, experts, shared_experts })
        } else {
            MlpWeights::Dense(self.take_ffn(&format!("{p}mlp"), cfg.dense_intermediate, d)?)
        };
        Ok(LayerWeights {
            layer,
            input_layernorm: self.take_bf16(&format!("{p}input_layernorm.weight"), &[d])?,
            self_attn,
            post_attention_layernorm: self.take_bf16(&format!("{p}post_attention_layernorm.weight"), &[d])?,
            mlp,
        })
    }
}

/// A [`TensorRef`] with its shape, viewed as a safetensors tensor for writing (FP8 data is not copied).
struct WriteView<'a> {
    t: TensorRef<'a>,
    shape: Vec<usize>,
}

impl View for WriteView<'_> {
    fn dtype(&self) -> Dtype {
        dtype_of(self.t.dtype())
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.t {
            TensorRef::F8(x) => Cow::Borrowed(bytemuck::cast_slice(x)),
            other => Cow::Owned(other.to_le_bytes()),
        }
    }
    fn data_len(&self) -> usize {
        self.t.len() * self.t.dtype().size()
    }
}

fn write_shard(path: &Path, tensors: Vec<(String, WriteView<'_>)>) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io(format_args!("writing {}", path.display()), &io),
        other => io_err(format!("writing {}: {other}", path.display())),
    })
}

/// Writes `weights` as a small checkpoint in the real layout: the checkpoint's tensor names, dtypes and shapes, in two
/// shards (`model-layer{N}-attn.safetensors` with the norms, router and attention, `model-layer{N}-mlp.safetensors`
/// with the MLP linears), and adds their tensors to `model.safetensors.index.json` in `dir` (created or updated, so
/// several layers can share a directory). Returns the two shard paths.
pub fn write_layer_checkpoint(
    dir: impl AsRef<Path>,
    cfg: &DeepSeekV3Config,
    weights: &LayerWeights,
) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    weights.check_against(cfg)?;
    fs::create_dir_all(dir).map_err(|e| Error::io(format_args!("creating {}", dir.display()), &e))?;
    let layer = weights.layer;
    let attn_file = format!("model-layer{layer}-attn.safetensors");
    let mlp_file = format!("model-layer{layer}-mlp.safetensors");
    let mlp_prefix = format!("{}mlp.", layer_prefix(layer));
    let (mut attn, mut mlp) = (Vec::new(), Vec::new());
    for (name, shape, t) in weights.named_tensors() {
        // The router lives with the attention tensors, as the gate is small and read with them.
        let is_mlp_linear = name.starts_with(&mlp_prefix) && !name.starts_with(&format!("{mlp_prefix}gate."));
        let entry = (name, WriteView { t, shape });
        if is_mlp_linear {
            mlp.push(entry)
        } else {
            attn.push(entry)
        }
    }
    let index_path = dir.join(INDEX_FILE);
    let mut map: BTreeMap<String, String> =
        if index_path.is_file() { read_index(&index_path)?.into_iter().collect() } else { BTreeMap::new() };
    map.retain(|_, f| *f != attn_file && *f != mlp_file);
    for (file, tensors) in [(&attn_file, &attn), (&mlp_file, &mlp)] {
        for (name, _) in tensors {
            map.insert(name.clone(), file.clone());
        }
    }
    let paths = vec![dir.join(&attn_file), dir.join(&mlp_file)];
    write_shard(&paths[0], attn)?;
    write_shard(&paths[1], mlp)?;
    write_index(&index_path, dir, &map)?;
    Ok(paths)
}

fn write_index(path: &Path, dir: &Path, map: &BTreeMap<String, String>) -> Result<()> {
    // total_size is the sum of the listed tensors' bytes, read back from the shards' headers.
    let mut sizes: HashMap<String, u64> = HashMap::new();
    let files: std::collections::BTreeSet<&String> = map.values().collect();
    for file in files {
        let full = dir.join(file);
        if full.is_file() {
            for e in read_header(&full)? {
                sizes.insert(e.name, e.data_bytes);
            }
        }
    }
    let total: u64 = map.keys().filter_map(|k| sizes.get(k)).sum();
    let doc = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map });
    let mut text =
        serde_json::to_string_pretty(&doc).map_err(|e| io_err(format!("writing {}: {e}", path.display())))?;
    text.push('\n');
    fs::write(path, text).map_err(|e| Error::io(format_args!("writing {}", path.display()), &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_index_list_every_tensor_with_its_size_and_shard() {
        let dir = std::env::temp_dir().join(format!("r1k-ckpt-hdr-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let cfg = DeepSeekV3Config::reduced();
        let w = synthetic_layer_weights(&cfg, 0, 1).unwrap();
        let paths = write_layer_checkpoint(&dir, &cfg, &w).unwrap();
        let index = read_index(&dir.join(INDEX_FILE)).unwrap();
        assert_eq!(index.len(), cfg.layer_tensor_specs(0).len());
        let mut total = 0u64;
        for p in &paths {
            let bytes = fs::read(p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let entries = read_header(p).unwrap();
            assert_eq!(entries.len(), st.len());
            let file = p.file_name().unwrap().to_str().unwrap();
            for e in entries {
                assert_eq!(st.tensor(&e.name).unwrap().data().len() as u64, e.data_bytes, "{}", e.name);
                assert_eq!(index.get(&e.name).map(String::as_str), Some(file), "{}", e.name);
                total += e.data_bytes;
            }
        }
        // The index's total_size is the sum of the tensors' bytes, as Hugging Face writes it.
        let doc: serde_json::Value = serde_json::from_str(&fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(doc["metadata"]["total_size"].as_u64(), Some(total));
        fs::remove_dir_all(&dir).unwrap();
    }
}
