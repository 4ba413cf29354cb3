//! Optimizer state checkpoints for exact resume: the state manifest's checkpoint layout
//! ([`adafactor::manifest::checkpoint`]) in a safetensors file, keyed by parameter path, with the
//! core's container pieces (metadata in key order, CRC-32 checksum, durable writes).
//!
//! # Format (version 2)
//! The same layout and metadata keys as `candle-adafactor`'s checkpoints, with `format` =
//! [`STATE_FORMAT`]. Tensors: `iteration` (i64 `[]`, Keras `_iterations`), `learning_rate`
//! (f32 `[]`, a constant learning rate only), `{path}/average` (EMA, with `use_ema`),
//! `{path}/accumulator` (with gradient accumulation), `{path}/r` and `{path}/c` (rank >= 2) or
//! `{path}/v` (rank 1), `skipped_steps` (i64 `[]`), all float32 state bit-exact. Metadata:
//! `format`, `format_version`, `keras_config`, `variables` (`[{"name", "shape"}]`, build order),
//! `extra_variables` (`[]`), `checksum`, `producer`.
//!
//! The model's weights are not in it: save them beside it with burn's own record
//! (`model.save_file(path)`, burnpack), which keeps parameter paths and ids.

use crate::error::{Error, Result, invalid};
use crate::optimizer::Adafactor;
use crate::slot::{f32_tensor, host_f32};
use adafactor::checkpoint::{
    checksum, config_differences, f32_from_le_bytes, f32_le_bytes, verify_checksum,
    with_sorted_metadata,
};
use adafactor::manifest::{self, Named, Part};
use adafactor::{AdafactorConfig, LearningRate};
use burn::module::Module;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The `format` metadata value of a burn-adafactor optimizer checkpoint.
pub const STATE_FORMAT: &str = "burn-adafactor.optimizer-state";

/// The checkpoint format version this library writes (and the newest it reads).
pub const STATE_FORMAT_VERSION: u32 = 2;

struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
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

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::Io(format!("corrupt optimizer checkpoint: {msg}"))
}

impl Adafactor {
    fn named(&self) -> Vec<Named> {
        self.slots
            .iter()
            .map(|s| (s.path.clone(), s.shape.clone()))
            .collect()
    }

    /// The optimizer state as safetensors bytes (see the module docs for the format). Saving
    /// one state twice gives the same bytes.
    ///
    /// # Errors
    /// The optimizer is not built yet.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        if !self.built() {
            return Err(invalid(
                "the optimizer is not built yet: step or build it before saving",
            ));
        }
        let vars = self.named();
        let mut entries = Vec::new();
        for e in manifest::checkpoint(&self.config, &vars, &[]) {
            let f32_entry = |data: Vec<u8>| (Dtype::F32, data);
            let (dtype, data) = match e.part {
                Part::Iteration => (
                    Dtype::I64,
                    (self.counters.raw_iterations as i64).to_le_bytes().to_vec(),
                ),
                Part::SkippedSteps => (
                    Dtype::I64,
                    (self.counters.skipped_steps as i64).to_le_bytes().to_vec(),
                ),
                Part::LearningRate => {
                    f32_entry(self.current_learning_rate().to_le_bytes().to_vec())
                }
                Part::Average(i) => f32_entry(
                    self.slots[i]
                        .ema
                        .as_ref()
                        .map(|t| f32_le_bytes(&host_f32(t)))
                        .unwrap_or_default(),
                ),
                Part::Accumulator(i) => f32_entry(
                    self.slots[i]
                        .accumulator
                        .as_ref()
                        .map(|t| f32_le_bytes(&host_f32(t)))
                        .unwrap_or_default(),
                ),
                Part::Stat(i, k) => {
                    let s = &self.slots[i];
                    let slots = s.stats.slots(&s.shape);
                    f32_entry(
                        slots
                            .get(k)
                            .map(|(_, _, v)| f32_le_bytes(v))
                            .unwrap_or_default(),
                    )
                }
                Part::Dummy | Part::Velocity(_) | Part::Extra(_) => continue,
            };
            entries.push(Entry {
                name: e.name,
                dtype,
                shape: e.shape,
                data,
            });
        }
        let variables: Vec<Value> = vars
            .iter()
            .map(|(n, s)| serde_json::json!({"name": n, "shape": s}))
            .collect();
        let sum = checksum(entries.iter().map(|e| (e.name.as_str(), e.data.as_slice())));
        let metadata: HashMap<String, String> = [
            ("format", STATE_FORMAT.to_string()),
            ("format_version", STATE_FORMAT_VERSION.to_string()),
            ("keras_config", self.get_config().to_string()),
            ("variables", Value::from(variables).to_string()),
            ("extra_variables", "[]".to_string()),
            ("checksum", sum),
            (
                "producer",
                format!("burn-adafactor {}", env!("CARGO_PKG_VERSION")),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(entries.iter().map(|e| (e.name.as_str(), e)), Some(metadata))
            .map_err(|e| e.to_string())
            .and_then(with_sorted_metadata)
            .map_err(|e| Error::Io(format!("writing the optimizer checkpoint failed: {e}")))
    }

    /// Loads a state saved by [`Adafactor::to_safetensors_bytes`] for `model` (an unbuilt
    /// optimizer builds on it first). Parameters are matched by module path, so a freshly
    /// built model with new parameter ids resumes exactly.
    ///
    /// # Errors
    /// Corrupt or truncated bytes (checksum, header, missing or misshapen tensors); another
    /// format or a newer version; a Keras config that differs from this optimizer's (each
    /// difference named); parameter paths or shapes that differ from the model's. Nothing
    /// changes on error.
    pub fn load_safetensors_bytes<M: Module>(&mut self, model: &M, bytes: &[u8]) -> Result<()> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            Error::Io(format!(
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
        if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
            return Err(invalid(format!(
                "not a burn-adafactor optimizer checkpoint: its `format` is {:?}, expected {STATE_FORMAT:?}",
                meta.get("format").map(String::as_str).unwrap_or("(absent)")
            )));
        }
        let version: u32 = get("format_version")?
            .parse()
            .map_err(|_| corrupt("`format_version` is not a number"))?;
        if version == 0 || version > STATE_FORMAT_VERSION {
            return Err(invalid(format!(
                "the optimizer checkpoint has format version {version}; this version reads 1 to {STATE_FORMAT_VERSION}"
            )));
        }
        let stored_config: Value = serde_json::from_str(get("keras_config")?)
            .map_err(|e| corrupt(format!("`keras_config` is not JSON: {e}")))?;
        AdafactorConfig::from_keras_config(&stored_config)
            .map_err(|e| corrupt(format!("`keras_config` is not a valid config: {e}")))?;
        adafactor::axes::check_checkpoint_axes(&stored_config, &self.config)?;
        let diffs = config_differences(&stored_config, &self.get_config());
        if !diffs.is_empty() {
            return Err(invalid(format!(
                "the checkpoint was saved with another optimizer config: {}",
                diffs.join("; ")
            )));
        }
        let listed: Value = serde_json::from_str(get("variables")?)
            .map_err(|e| corrupt(format!("`variables` is not JSON: {e}")))?;
        let bad = || corrupt("`variables` must be a list of {\"name\", \"shape\"}");
        let mut vars: Vec<Named> = Vec::new();
        for v in listed.as_array().ok_or_else(bad)? {
            let name = v["name"].as_str().ok_or_else(bad)?.to_string();
            let shape = v["shape"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
                .collect::<Result<Vec<_>>>()?;
            vars.push((name, shape));
        }
        // The optimizer to load into: this one, or one built on the model.
        let mut next = self.clone();
        if !next.built() {
            next.build(model)?;
        }
        next.check_module(&crate::params::list(model))?;
        let by_path: HashMap<&str, usize> = next
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.path.as_str(), i))
            .collect();
        if vars.len() != next.slots.len() {
            return Err(invalid(format!(
                "the checkpoint holds {} parameters, the model {}",
                vars.len(),
                next.slots.len()
            )));
        }
        let mut slot_of = Vec::with_capacity(vars.len());
        for (path, shape) in &vars {
            let i = *by_path.get(path.as_str()).ok_or_else(|| {
                invalid(format!(
                    "the checkpoint's parameter `{path}` is not in the model"
                ))
            })?;
            if &next.slots[i].shape != shape {
                return Err(invalid(format!(
                    "parameter `{path}` has shape {:?} in the checkpoint but {:?} in the model",
                    shape, next.slots[i].shape
                )));
            }
            slot_of.push(i);
        }
        let layout = manifest::checkpoint(&next.config, &vars, &[]);
        let mut data: Vec<(String, Vec<u8>)> = Vec::with_capacity(layout.len());
        for e in &layout {
            let t = st
                .tensor(&e.name)
                .map_err(|_| corrupt(format!("tensor `{}` is missing", e.name)))?;
            let want = if matches!(e.part, Part::Iteration | Part::SkippedSteps) {
                Dtype::I64
            } else {
                Dtype::F32
            };
            if t.dtype() != want || t.shape() != e.shape.as_slice() {
                return Err(corrupt(format!(
                    "tensor `{}` is {:?} {:?}, expected {want:?} {:?}",
                    e.name,
                    t.dtype(),
                    t.shape(),
                    e.shape
                )));
            }
            data.push((e.name.clone(), t.data().to_vec()));
        }
        if st.len() != layout.len() {
            return Err(corrupt(format!(
                "{} tensors, expected {}",
                st.len(),
                layout.len()
            )));
        }
        if let Err(got) = verify_checksum(
            get("checksum")?,
            data.iter().map(|(n, d)| (n.as_str(), d.as_slice())),
        ) {
            return Err(corrupt(format!(
                "checksum mismatch (computed {got}): the data is damaged"
            )));
        }
        let counter = |bytes: &[u8], what: &str| -> Result<u64> {
            let b: [u8; 8] = bytes
                .try_into()
                .map_err(|_| corrupt(format!("`{what}` is not one i64")))?;
            u64::try_from(i64::from_le_bytes(b))
                .map_err(|_| corrupt(format!("`{what}` is negative")))
        };
        let mut stat_values: Vec<Vec<Vec<f32>>> = vec![Vec::new(); next.slots.len()];
        for (e, (_, bytes)) in layout.iter().zip(&data) {
            match e.part {
                Part::Iteration => next.counters.raw_iterations = counter(bytes, "iteration")?,
                Part::SkippedSteps => {
                    next.counters.skipped_steps = counter(bytes, "skipped_steps")?
                }
                Part::LearningRate => {
                    if let LearningRate::Constant(lr) = next.config.learning_rate
                        && f32_from_le_bytes(bytes).first().map(|x| x.to_bits())
                            != Some((lr as f32).to_bits())
                    {
                        return Err(corrupt(
                            "tensor `learning_rate` disagrees with the config's learning_rate",
                        ));
                    }
                }
                Part::Average(k) => {
                    let s = &mut next.slots[slot_of[k]];
                    s.ema = Some(f32_tensor(f32_from_le_bytes(bytes), &s.device));
                }
                Part::Accumulator(k) => {
                    let s = &mut next.slots[slot_of[k]];
                    s.accumulator = Some(f32_tensor(f32_from_le_bytes(bytes), &s.device));
                }
                Part::Stat(k, _) => stat_values[slot_of[k]].push(f32_from_le_bytes(bytes)),
                Part::Dummy | Part::Velocity(_) | Part::Extra(_) => {}
            }
        }
        for (s, values) in next.slots.iter_mut().zip(stat_values) {
            let path = s.path.clone();
            s.stats.set_from(&path, &values)?;
        }
        *self = next;
        Ok(())
    }

    /// Writes the state to a safetensors file, durably (through a temporary file renamed over
    /// `path`, see [`adafactor::checkpoint::write_durably`]).
    ///
    /// # Errors
    /// As [`Adafactor::to_safetensors_bytes`]; the file cannot be written (named).
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors_bytes()?;
        adafactor::checkpoint::write_durably(path, &bytes).map_err(|e| {
            Error::Io(format!(
                "cannot write the optimizer checkpoint {}: {e}",
                path.display()
            ))
        })
    }

    /// Reads a state written by [`Adafactor::save_state`] for `model`.
    ///
    /// # Errors
    /// The file cannot be read (named); as [`Adafactor::load_safetensors_bytes`].
    pub fn load_state<M: Module>(&mut self, model: &M, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Io(format!(
                "cannot read the optimizer checkpoint {}: {e}",
                path.display()
            ))
        })?;
        self.load_safetensors_bytes(model, &bytes)
    }
}
