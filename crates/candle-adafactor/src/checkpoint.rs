//! Optimizer state checkpoints (safetensors) for exact resume.
//!
//! The format is documented on [`StateDict`].

use crate::optimizer::{core_err, err, Adafactor};
use adafactor::checkpoint::{
    checksum, config_differences, f32_from_le_bytes, f32_le_bytes, verify_checksum,
    with_sorted_metadata,
};
use adafactor::manifest::{self, Kind, Named, Part};
use adafactor::{AdafactorConfig, LearningRate, Stats};
use candle_core::{DType, Device, Result, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The `format` metadata value of an optimizer checkpoint.
pub const STATE_FORMAT: &str = "candle-adafactor.optimizer-state";

/// The checkpoint format version this library writes; it reads this version and older ones.
///
/// Version 2 writes a CRC-32 checksum (`crc32:` and eight hex digits) and its metadata in key
/// order (the same state always gives the same bytes); version 1 files (FNV-1a checksum) load
/// as before.
pub const STATE_FORMAT_VERSION: u32 = 2;

/// One stored tensor: raw little-endian bytes, as in the file.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Entry {
    fn dtype(&self) -> StDtype {
        // Only dtypes accepted by `st_dtype` are ever stored.
        st_dtype(self.dtype).unwrap_or(StDtype::U8)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// An optimizer checkpoint in memory: the state tensors, the Keras config and the format
/// version. Made by [`Adafactor::state_dict`] or read from safetensors bytes or a file; always
/// internally consistent (every tensor the config and variables call for, with the right dtype
/// and shape, and nothing else).
///
/// # Format (version 2)
/// A checkpoint is a safetensors file. Its tensors, keyed by name, are exactly the optimizer's
/// [`Adafactor::variables`] plus the skipped-step counter, all bit-exact (float32 stays float32):
///
/// | tensor | dtype, shape | what |
/// | --- | --- | --- |
/// | `iteration` | i64 `[]` | Keras `_iterations`, the raw call count |
/// | `learning_rate` | f32 `[]` | only for a constant learning rate (equal to the config's) |
/// | `{name}/average` | f32, the variable's shape | EMA average (with `use_ema`) |
/// | `{name}/accumulator` | f32, the variable's shape | gradient accumulator (with accumulation) |
/// | `{name}/r`, `{name}/c` | f32 `[..., n]`, `[..., m]` | row and column statistics (rank >= 2) |
/// | `{name}/v` | f32, the variable's shape | second moment (rank 0 and 1) |
/// | any name | its own dtype and shape | variables made by [`Adafactor::add_variable`] |
/// | `skipped_steps` | i64 `[]` | steps skipped for a non-finite gradient |
///
/// The safetensors metadata holds `format` ([`STATE_FORMAT`]), `format_version`
/// ([`STATE_FORMAT_VERSION`]), `keras_config` (the Keras `get_config()` JSON), `variables` (the
/// optimizer's variables as `[{"name", "shape"}]`, in build order), `extra_variables` (the names
/// made by `add_variable`), `checksum` (CRC-32 of every tensor's name and bytes, so that
/// corrupted data is detected; FNV-1a 64 in version 1) and `producer`, in key order.
///
/// Loading matches variables by name (not position), checks everything first and changes nothing
/// on error. The weight-decay exclusions of [`Adafactor::exclude_from_weight_decay`] are not part
/// of the state (Keras does not save them either): set them again after building.
///
/// ```
/// use candle_adafactor::{Adafactor, AdafactorConfig, StateDict};
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// let mut opt = Adafactor::new_named(vec![("w".into(), w.clone())], AdafactorConfig::default())?;
/// opt.apply_gradients(&[(Some(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu)?), &w)])?;
/// let bytes = opt.state_dict()?.to_safetensors_bytes()?;
/// let sd = StateDict::from_safetensors_bytes(&bytes)?;
/// assert_eq!(sd.raw_iterations(), 1);
/// assert_eq!(sd.names(), ["iteration", "learning_rate", "w/r", "w/c", "skipped_steps"]);
/// assert_eq!(sd.tensor("w/r")?.dims(), [2]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StateDict {
    format_version: u32,
    /// The Keras config as JSON text, kept verbatim so that a file round trip is lossless.
    keras_config: String,
    variables: Vec<(String, Vec<usize>)>,
    extras: Vec<String>,
    entries: Vec<Entry>,
}

/// A tensor the layout calls for.
struct Item {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    part: Part,
}

/// Every tensor a checkpoint of this config, these variables and these extras (with their
/// dtypes) holds: the state manifest's checkpoint list ([`manifest::checkpoint`]).
fn layout(
    cfg: &AdafactorConfig,
    vars: &[Named],
    extras: &[(String, DType, Vec<usize>)],
) -> Vec<Item> {
    let named: Vec<Named> = extras
        .iter()
        .map(|(n, _, s)| (n.clone(), s.clone()))
        .collect();
    manifest::checkpoint(cfg, vars, &named)
        .into_iter()
        .map(|e| Item {
            dtype: match e.part.kind() {
                Kind::I64 => DType::I64,
                Kind::I32 => DType::I32,
                Kind::F32 => DType::F32,
                Kind::Extra(i) => extras[i].1,
            },
            name: e.name,
            shape: e.shape,
            part: e.part,
        })
        .collect()
}

fn st_dtype(d: DType) -> Option<StDtype> {
    Some(match d {
        DType::U8 => StDtype::U8,
        DType::U32 => StDtype::U32,
        DType::I16 => StDtype::I16,
        DType::I32 => StDtype::I32,
        DType::I64 => StDtype::I64,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        _ => return None,
    })
}

fn candle_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I16 => DType::I16,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        _ => return None,
    })
}

/// A tensor's elements as little-endian bytes, row-major.
fn tensor_bytes(t: &Tensor, what: &str) -> Result<Vec<u8>> {
    fn le<T, const N: usize>(v: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => le(t.to_vec1::<u32>()?, u32::to_le_bytes),
        DType::I16 => le(t.to_vec1::<i16>()?, i16::to_le_bytes),
        DType::I32 => le(t.to_vec1::<i32>()?, i32::to_le_bytes),
        DType::I64 => le(t.to_vec1::<i64>()?, i64::to_le_bytes),
        DType::BF16 => le(t.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        DType::F16 => le(t.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        DType::F32 => le(t.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::F64 => le(t.to_vec1::<f64>()?, f64::to_le_bytes),
        other => {
            return Err(err(format!(
                "{what} has dtype {other:?}, which an optimizer checkpoint cannot store"
            )))
        }
    })
}

fn counter_bytes(what: &str, n: u64) -> Result<Vec<u8>> {
    let n = i64::try_from(n).map_err(|_| err(format!("`{what}` = {n} does not fit in an i64")))?;
    Ok(n.to_le_bytes().to_vec())
}

/// The checksum of the entries (see [`adafactor::checkpoint::checksum`]).
fn entries_checksum(entries: &[Entry]) -> String {
    checksum(entries.iter().map(|e| (e.name.as_str(), e.data.as_slice())))
}

fn corrupt(msg: impl std::fmt::Display) -> candle_core::Error {
    err(format!("corrupt optimizer checkpoint: {msg}"))
}

impl StateDict {
    /// The format version the checkpoint was written with.
    pub fn format_version(&self) -> u32 {
        self.format_version
    }

    /// The optimizer's Keras `get_config()` at save time.
    pub fn keras_config(&self) -> Value {
        // Checked to be a valid config when the dict was made.
        serde_json::from_str(&self.keras_config).unwrap_or(Value::Null)
    }

    /// The saved configuration, to build a matching optimizer (`jit_compile` is not part of the
    /// Keras config: it is `true`, the default; set it as needed).
    ///
    /// # Errors
    /// None in practice: the config was validated when the dict was made.
    pub fn config(&self) -> Result<AdafactorConfig> {
        AdafactorConfig::from_keras_config(&self.keras_config()).map_err(core_err)
    }

    /// The optimizer's variables at save time: names and shapes, in build order.
    pub fn variables(&self) -> &[(String, Vec<usize>)] {
        &self.variables
    }

    /// Names of the variables made by [`Adafactor::add_variable`].
    pub fn extra_variables(&self) -> &[String] {
        &self.extras
    }

    /// Every tensor name, in [`Adafactor::variables`] order, then `skipped_steps`.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// The raw call count (Keras `_iterations`) at save time.
    pub fn raw_iterations(&self) -> u64 {
        self.counter("iteration")
    }

    /// Steps skipped for a non-finite gradient, at save time.
    pub fn skipped_steps(&self) -> u64 {
        self.counter("skipped_steps")
    }

    fn counter(&self, name: &str) -> u64 {
        // Both counters exist and were checked to be non-negative i64 when the dict was made.
        self.entry(name)
            .ok()
            .and_then(|e| <[u8; 8]>::try_from(e.data.as_slice()).ok())
            .map_or(0, |b| i64::from_le_bytes(b).max(0) as u64)
    }

    /// The data of entry `index` (in file order), to share with the other ranks.
    pub(crate) fn entry_data(&self, index: usize) -> Result<&[u8]> {
        self.entries
            .get(index)
            .map(|e| e.data.as_slice())
            .ok_or_else(|| err(format!("internal: no checkpoint entry {index}")))
    }

    /// Fills entry `index` (left empty by a sharded rank) with the owner's data.
    ///
    /// # Errors
    /// No such entry, or the data does not have the entry's size.
    pub(crate) fn fill(&mut self, index: usize, data: Vec<u8>) -> Result<()> {
        let e = self.entries.get_mut(index).ok_or_else(|| {
            err(format!(
                "a rank sent checkpoint entry {index}, which is not one"
            ))
        })?;
        let want = e.shape.iter().product::<usize>() * e.dtype.size_in_bytes();
        if data.len() != want {
            return Err(err(format!(
                "a rank sent {} bytes for checkpoint entry `{}`, which has {want}",
                data.len(),
                e.name
            )));
        }
        e.data = data;
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| err(format!("the optimizer checkpoint has no tensor `{name}`")))
    }

    /// One stored tensor, as a new CPU tensor.
    ///
    /// # Errors
    /// No tensor of that name.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        Tensor::from_raw_buffer(&e.data, e.dtype, &e.shape, &Device::Cpu)
    }

    /// The checkpoint as safetensors bytes (layout: [`StateDict`]).
    ///
    /// # Errors
    /// The safetensors writer fails (it does not for a consistent dict).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let variables: Vec<Value> = self
            .variables
            .iter()
            .map(|(n, s)| serde_json::json!({"name": n, "shape": s}))
            .collect();
        let metadata: HashMap<String, String> = [
            ("format", STATE_FORMAT.to_string()),
            ("format_version", self.format_version.to_string()),
            ("keras_config", self.keras_config.clone()),
            ("variables", Value::from(variables).to_string()),
            (
                "extra_variables",
                serde_json::json!(self.extras).to_string(),
            ),
            ("checksum", entries_checksum(&self.entries)),
            (
                "producer",
                format!("candle-adafactor {}", env!("CARGO_PKG_VERSION")),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(
            self.entries.iter().map(|e| (e.name.as_str(), e)),
            Some(metadata),
        )
        .map_err(|e| e.to_string())
        .and_then(with_sorted_metadata)
        .map_err(|e| err(format!("writing the optimizer checkpoint failed: {e}")))
    }

    /// Reads a checkpoint from safetensors bytes, checking that it is complete and consistent.
    ///
    /// # Errors
    /// Truncated or corrupt bytes (bad header, data shorter or longer than the header says,
    /// checksum mismatch); not an optimizer checkpoint (no `format` metadata); a newer format
    /// version; an invalid Keras config; a missing, unexpected or misshapen tensor; a
    /// `learning_rate` tensor that disagrees with the config; a negative counter.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<StateDict> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            err(format!(
                "not a readable safetensors file (truncated or corrupt): {e}"
            ))
        })?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| corrupt(format!("unreadable header: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| {
            meta.get(key)
                .ok_or_else(|| corrupt(format!("the metadata lacks `{key}`")))
        };
        match meta.get("format") {
            Some(f) if f == STATE_FORMAT => {}
            other => {
                return Err(err(format!(
                    "not a candle-adafactor optimizer checkpoint: its safetensors metadata \
                     `format` is {:?}, expected {STATE_FORMAT:?}",
                    other.map(String::as_str).unwrap_or("(absent)")
                )))
            }
        }
        let version: u32 = get("format_version")?
            .parse()
            .map_err(|_| corrupt("`format_version` is not a number"))?;
        if version == 0 {
            return Err(corrupt("`format_version` is 0"));
        }
        if version > STATE_FORMAT_VERSION {
            return Err(err(format!(
                "the optimizer checkpoint has format version {version}, written by a newer \
                 candle-adafactor; this version reads format versions up to \
                 {STATE_FORMAT_VERSION}"
            )));
        }
        let keras_config = get("keras_config")?.clone();
        let config = serde_json::from_str(&keras_config)
            .map_err(|e| corrupt(format!("`keras_config` is not JSON: {e}")))
            .and_then(|v: Value| {
                AdafactorConfig::from_keras_config(&v)
                    .map_err(|e| corrupt(format!("`keras_config` is not a valid config: {e}")))
            })?;
        let variables: Vec<(String, Vec<usize>)> = {
            let list: Value = serde_json::from_str(get("variables")?)
                .map_err(|e| corrupt(format!("`variables` is not JSON: {e}")))?;
            let bad = || corrupt("`variables` must be a list of {\"name\", \"shape\"}");
            let mut out = Vec::new();
            for v in list.as_array().ok_or_else(bad)? {
                let name = v["name"].as_str().ok_or_else(bad)?.to_string();
                let shape = v["shape"]
                    .as_array()
                    .ok_or_else(bad)?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
                    .collect::<Result<Vec<_>>>()?;
                out.push((name, shape));
            }
            out
        };
        let extras: Vec<String> = serde_json::from_str(get("extra_variables")?)
            .map_err(|e| corrupt(format!("`extra_variables` is not a list of names: {e}")))?;
        let extra_specs = extras
            .iter()
            .map(|n| {
                let t = st
                    .tensor(n)
                    .map_err(|_| corrupt(format!("extra variable `{n}` has no tensor")))?;
                let dtype = candle_dtype(t.dtype()).ok_or_else(|| {
                    corrupt(format!("extra variable `{n}` has dtype {:?}", t.dtype()))
                })?;
                Ok((n.clone(), dtype, t.shape().to_vec()))
            })
            .collect::<Result<Vec<_>>>()?;

        let items = layout(&config, &variables, &extra_specs);
        let mut names = HashSet::new();
        let mut entries = Vec::with_capacity(items.len());
        for it in &items {
            if !names.insert(it.name.as_str()) {
                return Err(corrupt(format!("tensor `{}` is listed twice", it.name)));
            }
            let t = st.tensor(&it.name).map_err(|_| {
                corrupt(format!(
                    "tensor `{}` is missing (its config and variables call for it)",
                    it.name
                ))
            })?;
            let dtype = candle_dtype(t.dtype());
            if dtype != Some(it.dtype) || t.shape() != it.shape.as_slice() {
                return Err(corrupt(format!(
                    "tensor `{}` is {:?} {:?}, expected {:?} {:?}",
                    it.name,
                    t.dtype(),
                    t.shape(),
                    it.dtype,
                    it.shape
                )));
            }
            entries.push(Entry {
                name: it.name.clone(),
                dtype: it.dtype,
                shape: it.shape.clone(),
                data: t.data().to_vec(),
            });
        }
        let mut unexpected: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| !names.contains(n))
            .collect();
        if !unexpected.is_empty() {
            unexpected.sort_unstable();
            return Err(corrupt(format!(
                "unexpected tensors {unexpected:?} (not called for by its config and variables)"
            )));
        }
        let want = get("checksum")?;
        let named = entries.iter().map(|e| (e.name.as_str(), e.data.as_slice()));
        if let Err(got) = verify_checksum(want, named) {
            return Err(corrupt(format!(
                "checksum mismatch (stored {want}, computed {got}): the data is damaged"
            )));
        }
        let sd = StateDict {
            format_version: version,
            keras_config,
            variables,
            extras,
            entries,
        };
        for name in ["iteration", "skipped_steps"] {
            let e = sd.entry(name)?;
            let b: [u8; 8] = e
                .data
                .as_slice()
                .try_into()
                .map_err(|_| corrupt(format!("`{name}` is not one i64")))?;
            if i64::from_le_bytes(b) < 0 {
                return Err(corrupt(format!("`{name}` is negative")));
            }
        }
        if let LearningRate::Constant(lr) = config.learning_rate {
            let stored = f32_from_le_bytes(&sd.entry("learning_rate")?.data);
            if stored.first().map(|x| x.to_bits()) != Some((lr as f32).to_bits()) {
                return Err(corrupt(format!(
                    "tensor `learning_rate` ({stored:?}) disagrees with the config's \
                     learning_rate ({})",
                    lr as f32
                )));
            }
        }
        Ok(sd)
    }

    /// Writes the checkpoint to a safetensors file, through a temporary file in the same folder
    /// that is flushed to disk and renamed over `path` (then the folder is flushed), so an
    /// interrupted save leaves any previous file intact and a finished one survives a crash.
    ///
    /// # Errors
    /// The file cannot be written (the message names the path).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors_bytes()?;
        adafactor::checkpoint::write_durably(path, &bytes).map_err(|e| {
            err(format!(
                "cannot write the optimizer checkpoint {}: {e}",
                path.display()
            ))
        })
    }

    /// Reads a checkpoint file (see [`StateDict::from_safetensors_bytes`]).
    ///
    /// # Errors
    /// The file cannot be read (the message names the path), or its contents are rejected.
    pub fn load(path: impl AsRef<Path>) -> Result<StateDict> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            err(format!(
                "cannot read the optimizer checkpoint {}: {e}",
                path.display()
            ))
        })?;
        Self::from_safetensors_bytes(&bytes).map_err(|e| err(format!("{}: {e}", path.display())))
    }
}

impl Adafactor {
    /// A snapshot of the whole optimizer state (layout: [`StateDict`]), to save with
    /// [`StateDict::save`] or restore with [`Adafactor::load_state_dict`].
    ///
    /// # Errors
    /// The optimizer is not built (it has no state yet); two pieces of state would be stored
    /// under the same name (an `add_variable` name that a later build also produced); an
    /// `add_variable` variable of a dtype safetensors cannot hold.
    pub fn state_dict(&self) -> Result<StateDict> {
        Ok(self.state_dict_of_owned(&|_| true)?.0)
    }

    /// [`Adafactor::state_dict`] on one rank of a sharded group: the entries of the variables
    /// `i` without `owns(i)` (their statistics, average and accumulator) are left empty, for
    /// [`StateDict::fill`] with the owners' entries. Also returns every per-variable entry as
    /// `(entry index, variable)`.
    pub(crate) fn state_dict_of_owned(
        &self,
        owns: &dyn Fn(usize) -> bool,
    ) -> Result<(StateDict, Vec<(usize, usize)>)> {
        self.require_built("save its state")?;
        let mut per_var = Vec::new();
        let vars = self.var_list();
        let extras: Vec<(String, DType, Vec<usize>)> = self
            .extra
            .iter()
            .map(|(n, v)| (n.clone(), v.dtype(), v.dims().to_vec()))
            .collect();
        let items = layout(&self.config, &vars, &extras);
        let mut names = HashSet::new();
        let mut entries = Vec::with_capacity(items.len());
        for it in items {
            if !names.insert(it.name.clone()) {
                return Err(err(format!(
                    "two pieces of optimizer state would both be saved as `{}`; rename the \
                     variable made by add_variable",
                    it.name
                )));
            }
            let state_tensor = |t: Option<&Tensor>, what: &str| -> Result<Vec<u8>> {
                let t = t.ok_or_else(|| err(format!("internal: {what} `{}` missing", it.name)))?;
                tensor_bytes(&t.to_dtype(DType::F32)?, &it.name)
            };
            if let Part::Average(i) | Part::Accumulator(i) | Part::Stat(i, _) = it.part {
                per_var.push((entries.len(), i));
                if !owns(i) {
                    entries.push(Entry {
                        name: it.name,
                        dtype: it.dtype,
                        shape: it.shape,
                        data: Vec::new(),
                    });
                    continue;
                }
            }
            let data = match it.part {
                Part::Iteration => counter_bytes("iteration", self.counters.raw_iterations)?,
                Part::SkippedSteps => counter_bytes("skipped_steps", self.counters.skipped_steps)?,
                Part::LearningRate => f32_le_bytes(&[self
                    .config
                    .learning_rate
                    .value(self.counters.raw_iterations)]),
                Part::Average(i) => state_tensor(self.slots[i].ema(), "EMA average")?,
                Part::Accumulator(i) => state_tensor(self.slots[i].accumulator(), "accumulator")?,
                Part::Stat(i, k) => {
                    let s = &self.slots[i];
                    let stats = s.stats.slots(s.var.dims());
                    let (_, _, values) = stats
                        .get(k)
                        .ok_or_else(|| err(format!("internal: statistic `{}`", it.name)))?;
                    f32_le_bytes(values)
                }
                Part::Extra(i) => tensor_bytes(self.extra[i].1.as_tensor(), &it.name)?,
                Part::Dummy | Part::Velocity(_) => {
                    return Err(err("internal: a Keras-only entry in a checkpoint"))
                }
            };
            if st_dtype(it.dtype).is_none() {
                return Err(err(format!(
                    "variable `{}` has dtype {:?}, which an optimizer checkpoint cannot store",
                    it.name, it.dtype
                )));
            }
            let elems: usize = it.shape.iter().product();
            if data.len() != elems * it.dtype.size_in_bytes() {
                return Err(err(format!(
                    "internal: `{}` has {} bytes for shape {:?}",
                    it.name,
                    data.len(),
                    it.shape
                )));
            }
            entries.push(Entry {
                name: it.name,
                dtype: it.dtype,
                shape: it.shape,
                data,
            });
        }
        let sd = StateDict {
            format_version: STATE_FORMAT_VERSION,
            keras_config: self.get_config().to_string(),
            variables: vars,
            extras: self.extra.iter().map(|(n, _)| n.clone()).collect(),
            entries,
        };
        Ok((sd, per_var))
    }

    /// Restores the state saved by [`Adafactor::state_dict`] into this optimizer, which must be
    /// built on variables of the same names and shapes (in any order) with the same config.
    /// Only the optimizer's state changes; the model weights are saved and restored separately.
    ///
    /// The configs are compared as Keras config JSON (`get_config()`), except the instance
    /// `name`; `jit_compile` is not part of it and may differ.
    ///
    /// # Errors
    /// Each names what is wrong, and on any error nothing changes: the optimizer is not built
    /// (build it on the model's variables first, e.g. with [`Adafactor::new_named`]); the
    /// configs differ (every differing key is listed); variables missing from the checkpoint or
    /// absent from the optimizer; a variable whose shape differs; `add_variable` variables that
    /// differ in name, dtype or shape.
    pub fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        self.require_built("load a state")?;
        adafactor::axes::check_checkpoint_axes(&sd.keras_config(), &self.config)
            .map_err(core_err)?;
        let diffs = config_differences(&sd.keras_config(), &self.get_config());
        if !diffs.is_empty() {
            return Err(err(format!(
                "cannot load the optimizer state: the checkpoint's config differs from the \
                 optimizer's: {}",
                diffs.join("; ")
            )));
        }
        let saved: HashMap<&str, &[usize]> = sd
            .variables
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let ours: HashSet<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        let missing: Vec<&str> = self
            .slots
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !saved.contains_key(n))
            .collect();
        let unknown: Vec<&str> = sd
            .variables
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !ours.contains(n))
            .collect();
        if !missing.is_empty() || !unknown.is_empty() {
            return Err(err(format!(
                "cannot load the optimizer state: variables of the optimizer missing from the \
                 checkpoint: {missing:?}; variables in the checkpoint the optimizer was not built \
                 with: {unknown:?}"
            )));
        }
        for s in &self.slots {
            let want = saved.get(s.name.as_str()).copied().unwrap_or_default();
            if s.var.dims() != want {
                return Err(err(format!(
                    "cannot load the optimizer state: variable `{}` has shape {:?} in the \
                     checkpoint but {:?} in the optimizer",
                    s.name,
                    want,
                    s.var.dims()
                )));
            }
        }
        let our_extras: Vec<&str> = self.extra.iter().map(|(n, _)| n.as_str()).collect();
        if our_extras != sd.extras.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(err(format!(
                "cannot load the optimizer state: the checkpoint has add_variable variables \
                 {:?}, the optimizer {our_extras:?}",
                sd.extras
            )));
        }

        // Everything is consistent: convert, then commit.
        let cpu = Device::Cpu;
        let mut extras = Vec::with_capacity(self.extra.len());
        for (name, var) in &self.extra {
            let e = sd.entry(name)?;
            if e.dtype != var.dtype() || e.shape != var.dims() {
                return Err(err(format!(
                    "cannot load the optimizer state: add_variable variable `{name}` is {:?} \
                     {:?} in the checkpoint but {:?} {:?} in the optimizer",
                    e.dtype,
                    e.shape,
                    var.dtype(),
                    var.dims()
                )));
            }
            extras.push(
                Tensor::from_raw_buffer(&e.data, e.dtype, &e.shape, &cpu)?
                    .to_device(var.device())?,
            );
        }
        let mut new_slots = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let full = |suffix: &str| -> Result<Tensor> {
                let values = f32_from_le_bytes(&sd.entry(&format!("{}/{suffix}", s.name))?.data);
                Tensor::from_vec(values, s.var.dims(), s.var.device())
            };
            let ema = s.ema().map(|_| full("average")).transpose()?;
            let acc = s.accumulator().map(|_| full("accumulator")).transpose()?;
            let values = Stats::slot_shapes_with(s.var.dims(), s.stats.axes())
                .iter()
                .map(|(suffix, _)| {
                    Ok(f32_from_le_bytes(
                        &sd.entry(&format!("{}/{suffix}", s.name))?.data,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut stats = s.stats.clone();
            if s.full_state {
                stats.set_from(&s.name, &values).map_err(core_err)?;
            }
            new_slots.push((stats, ema, acc));
        }
        let raw = sd.raw_iterations();
        let skipped = sd.skipped_steps();
        // Commit. `Var::set` of a fresh tensor of the variable's own dtype, shape and device
        // cannot fail; it runs first so that nothing else has changed if it ever did.
        for ((_, var), value) in self.extra.iter().zip(extras) {
            var.set(&value)?;
        }
        for (s, (stats, ema, acc)) in self.slots.iter_mut().zip(new_slots) {
            s.stats = stats;
            s.set_full_state(ema, acc);
        }
        self.counters.raw_iterations = raw;
        self.counters.skipped_steps = skipped;
        Ok(())
    }

    /// The optimizer state as safetensors bytes ([`Adafactor::state_dict`] then
    /// [`StateDict::to_safetensors_bytes`]).
    ///
    /// # Errors
    /// As [`Adafactor::state_dict`].
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        self.state_dict()?.to_safetensors_bytes()
    }

    /// Restores the state from safetensors bytes made by [`Adafactor::to_safetensors_bytes`].
    ///
    /// # Errors
    /// As [`StateDict::from_safetensors_bytes`] and [`Adafactor::load_state_dict`]; nothing
    /// changes on error.
    pub fn load_safetensors_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_state_dict(&StateDict::from_safetensors_bytes(bytes)?)
    }

    /// Saves the optimizer state to a safetensors file (written to a temporary file first, then
    /// renamed). The model weights are not included: save them too, e.g. with
    /// `candle_nn::VarMap::save`.
    ///
    /// ```
    /// use candle_adafactor::{Adafactor, AdafactorConfig};
    /// use candle_core::{Device, Tensor, Var};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let w = Var::new(&[1f32, -2.0, 3.0], &dev)?;
    /// let mut opt = Adafactor::new_named(vec![("w".into(), w.clone())], AdafactorConfig::default())?;
    /// opt.apply_gradients(&[(Some(&Tensor::new(&[0.1f32, 0.2, -0.3], &dev)?), &w)])?;
    /// let path = std::env::temp_dir().join(format!("adafactor-doc-{}.safetensors", std::process::id()));
    /// opt.save_state(&path)?;
    ///
    /// // Later: the same variables, a fresh optimizer with the same config, then the state.
    /// let mut resumed = Adafactor::new_named(vec![("w".into(), w.clone())], AdafactorConfig::default())?;
    /// resumed.load_state(&path)?;
    /// assert_eq!(resumed.raw_iterations(), 1);
    /// assert_eq!(resumed.variables()?[2].1.to_vec1::<f32>()?, opt.variables()?[2].1.to_vec1::<f32>()?);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Adafactor::state_dict`] and [`StateDict::save`].
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        self.state_dict()?.save(path)
    }

    /// Restores the optimizer state from a file written by [`Adafactor::save_state`].
    ///
    /// # Errors
    /// As [`StateDict::load`] and [`Adafactor::load_state_dict`]; nothing changes on error.
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.load_state_dict(&StateDict::load(path)?)
    }

    fn require_built(&self, what: &str) -> Result<()> {
        if self.built {
            Ok(())
        } else {
            Err(err(format!(
                "cannot {what}: optimizer `{}` is not built. Build it on the model's variables \
                 first (Adafactor::new_named, from_varmap or build_named)",
                self.config.name
            )))
        }
    }
}
