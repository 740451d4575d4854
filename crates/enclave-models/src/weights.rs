//! Safetensors weights, memory-mapped, behind candle's `VarBuilder`.
//!
//! We keep our own backend rather than candle's `MmapedSafetensors` for two reasons: errors must
//! name the file and tensor (a corrupt header, a wrong shape), and each tensor's mapped pages are
//! released right after it is copied into the compute dtype, so loading never holds the weights
//! twice (mapped + copied) in RAM.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

struct TensorEntry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint (one file or several shards), memory-mapped.
pub struct SafetensorsWeights {
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
    fp8_block: [usize; 2],
}

/// DeepSeek-V3's FP8 block: one `weight_scale_inv` per 128 × 128 tile of a weight.
pub const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

impl SafetensorsWeights {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(ModelError::Config {
            path: dir.to_path_buf(),
            message: format!("no {SINGLE_FILE} or {INDEX_FILE} in the model folder"),
        })
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.to_path_buf(),
            source,
        })?;
        let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
        let paths: Vec<PathBuf> = shards.iter().map(|name| dir.join(name)).collect();
        let weights = Self::open_files(&paths)?;
        for (name, shard) in &parsed.weight_map {
            let found = weights
                .tensors
                .get(name)
                .map(|entry| weights.files[entry.file].path == dir.join(shard));
            if found != Some(true) {
                return Err(ModelError::Config {
                    path: index.to_path_buf(),
                    message: format!(
                        "tensor `{name}` is mapped to {shard}, which does not hold it"
                    ),
                });
            }
        }
        Ok(weights)
    }

    /// Maps and validates the given safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for path in paths {
            let io_err = |source| ModelError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(path).map_err(io_err)?;
            // SAFETY: the file is opened read-only and model files are not modified while
            // served; that is the same contract every mmap-based loader (candle, llama.cpp) has.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
            let header_err = |message: String| ModelError::Safetensors {
                path: path.clone(),
                message,
            };
            let parsed = SafeTensors::deserialize(&mmap).map_err(|e| header_err(e.to_string()))?;
            for (name, view) in parsed.iter() {
                let dtype = candle_dtype(view.dtype()).ok_or_else(|| {
                    header_err(format!(
                        "tensor `{name}` has unsupported dtype {:?}",
                        view.dtype()
                    ))
                })?;
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let entry = TensorEntry {
                    file: files.len(),
                    dtype,
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                };
                if tensors.insert(name.to_string(), entry).is_some() {
                    return Err(header_err(format!("tensor `{name}` appears in two files")));
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
            });
        }
        Ok(Self {
            files,
            tensors,
            fp8_block: DEFAULT_FP8_BLOCK,
        })
    }

    /// The `[rows, cols]` tile that each `weight_scale_inv` entry of an FP8 weight covers
    /// (`quantization_config.weight_block_size`).
    pub fn set_fp8_block(&mut self, block: [usize; 2]) {
        self.fp8_block = block;
    }

    /// Names of every tensor in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A `VarBuilder` that loads tensors on demand, converted to `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` is missing from {}",
                self.file_list()
            ))
        })?;
        let file = &self.files[entry.file];
        let bytes = &file.mmap[entry.start..entry.end];
        let raw = Tensor::from_raw_buffer(bytes, entry.dtype, &entry.shape, &Device::Cpu)?;
        let raw = if entry.dtype == DType::F8E4M3 {
            self.dequantize_fp8(name, &raw)?
        } else {
            raw
        };
        let tensor = raw.to_dtype(dtype)?.to_device(device)?;
        // SAFETY: the bytes were copied into `tensor` above and no reference into the range
        // outlives this point; MADV_DONTNEED on a read-only file mapping only drops the pages,
        // which a later access would fault back in from the file.
        let _ = unsafe {
            file.mmap.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                entry.start,
                entry.end - entry.start,
            )
        };
        Ok(tensor)
    }

    /// Widens an FP8 (e4m3) weight to f32 and multiplies each tile by its `weight_scale_inv`,
    /// as DeepSeek's reference `weight_dequant` does: the scale grid is the weight's shape
    /// ceil-divided by the block, so edge tiles are partial.
    fn dequantize_fp8(&self, name: &str, weight: &Tensor) -> candle_core::Result<Tensor> {
        let scale_name = match name.strip_suffix(".weight") {
            Some(stem) => format!("{stem}.weight_scale_inv"),
            None => format!("{name}_scale_inv"),
        };
        if !self.tensors.contains_key(&scale_name) {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` is float8_e4m3 but its block scales `{scale_name}` are missing from {}",
                self.file_list()
            )));
        }
        let (rows, cols) = weight.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` is float8_e4m3 but has shape {:?}; FP8 weights must be matrices",
                weight.dims()
            ))
        })?;
        let [block_rows, block_cols] = self.fp8_block;
        let grid = (rows.div_ceil(block_rows), cols.div_ceil(block_cols));
        let scale = self.load(&scale_name, DType::F32, &Device::Cpu)?;
        if scale.dims() != [grid.0, grid.1] {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{scale_name}` has shape {:?}, but `{name}` {:?} in {block_rows}x{block_cols} blocks needs [{}, {}]",
                scale.dims(),
                [rows, cols],
                grid.0,
                grid.1
            )));
        }
        let index = |n: usize, block: usize| {
            let ids: Vec<u32> = (0..n).map(|i| (i / block) as u32).collect();
            Tensor::new(ids, &Device::Cpu)
        };
        let scale = scale
            .index_select(&index(rows, block_rows)?, 0)?
            .index_select(&index(cols, block_cols)?, 1)?;
        weight.to_dtype(DType::F32)? * scale
    }

    fn file_list(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        names.join(", ")
    }
}

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(entry) = self.tensors.get(name) {
            if entry.shape.as_slice() != shape.dims() {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor `{name}` has shape {:?}, but the config implies {:?}",
                    self.files[entry.file].path.display(),
                    entry.shape,
                    shape.dims()
                )));
            }
        }
        self.load(name, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        S::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}
