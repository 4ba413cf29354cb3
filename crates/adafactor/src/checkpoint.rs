//! The framework-free half of optimizer checkpoints: the safetensors container with its
//! metadata in a fixed order (so that saving one state twice gives the same bytes), the
//! checksum, the config comparison on load, and durable writes.
//!
//! Which tensors a checkpoint holds is the state manifest's ([`crate::manifest::checkpoint`]).

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The checksum of new files: CRC-32 (IEEE) over every tensor's name, a zero byte and its
/// bytes, in layout order, written as `crc32:` and eight hex digits.
///
/// ```
/// let a = adafactor::checkpoint::checksum([("w", &[1u8, 2][..])]);
/// assert!(a.starts_with("crc32:"));
/// assert_ne!(a, adafactor::checkpoint::checksum([("w", &[1u8, 3][..])]));
/// ```
pub fn checksum<'a>(entries: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut h = crc32fast::Hasher::new();
    for (name, data) in entries {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(data);
    }
    format!("crc32:{:08x}", h.finalize())
}

/// The checksum of the first version-1 files: FNV-1a 64 over the same bytes, 16 hex digits.
/// Still verified on load; never written.
fn fnv1a<'a>(entries: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, data) in entries {
        for &b in name.as_bytes().iter().chain([0u8].iter()).chain(data) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Checks a stored checksum against the entries, whichever kind it is.
///
/// # Errors
/// The checksum computed the stored checksum's way, when it differs.
pub fn verify_checksum<'a>(
    stored: &str,
    entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<(), String> {
    let got = if stored.starts_with("crc32:") {
        checksum(entries)
    } else {
        fnv1a(entries)
    };
    if got == stored {
        Ok(())
    } else {
        Err(got)
    }
}

/// Safetensors bytes with the `__metadata__` entries in key order: the safetensors writer
/// emits them in hash-map order, which differs from one save to the next. The header keeps its
/// length (only the order changes), so the data offsets stay valid.
///
/// # Errors
/// The bytes are not a safetensors file.
pub fn with_sorted_metadata(mut bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| 8 + n <= bytes.len())
        .ok_or("no safetensors header")?;
    let text = std::str::from_utf8(&bytes[8..8 + n]).map_err(|e| e.to_string())?;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_str(text.trim_end()).map_err(|e| e.to_string())?;
    if let Some(Value::Object(meta)) = header.get_mut("__metadata__") {
        let sorted: BTreeMap<String, Value> = std::mem::take(meta).into_iter().collect();
        meta.extend(sorted);
    }
    let mut out = serde_json::to_string(&header).map_err(|e| e.to_string())?;
    if out.len() > n {
        return Err("the header grew when sorted".into());
    }
    out.extend(std::iter::repeat_n(' ', n - out.len()));
    bytes[8..8 + n].copy_from_slice(out.as_bytes());
    Ok(bytes)
}

/// The Keras config keys whose values differ (the instance `name` aside), as readable lines.
pub fn config_differences(checkpoint: &Value, optimizer: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let a = checkpoint.as_object().unwrap_or(&empty);
    let b = optimizer.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = a.keys().collect();
    keys.extend(b.keys().filter(|k| !a.contains_key(*k)));
    keys.into_iter()
        .filter(|k| k.as_str() != "name" && !same_json(a.get(*k), b.get(*k)))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), Value::to_string);
            format!(
                "`{k}` is {} in the checkpoint but {} in the optimizer",
                show(a.get(k)),
                show(b.get(k))
            )
        })
        .collect()
}

/// JSON equality with numbers compared to a relative 1e-12: serde_json's default float parser
/// is not correctly rounded, so a config that went through JSON text may differ from the original
/// in the last bit of a float (which no float32 computation can see).
fn same_json(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
            _ => x == y,
        },
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(Some(x), Some(y)))
        }
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            x.len() == y.len() && x.iter().all(|(k, v)| same_json(Some(v), y.get(k)))
        }
        (x, y) => x == y,
    }
}

/// Writes `bytes` to `path` atomically and durably: into a temporary file beside it, flushed to
/// disk, renamed over `path`, then the folder flushed, so that a crash leaves either the old
/// file or the new one, complete. The temporary file is removed on error.
///
/// # Errors
/// Any file system error.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Float32 values as little-endian bytes: how every float32 tensor of the state is stored (and
/// exchanged between ranks), whatever the framework.
pub fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The float32 values of little-endian bytes, the inverse of [`f32_le_bytes`] (a length that is
/// not a multiple of 4 is checked by the caller; trailing bytes are ignored).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_see_every_byte_and_name() {
        type Sum = fn(Vec<(&'static str, &'static [u8])>) -> String;
        let sums: [Sum; 2] = [|e| checksum(e), |e| fnv1a(e)];
        for f in sums {
            let base = f(vec![("a", &[1u8, 2, 3][..])]);
            assert_ne!(base, f(vec![("a", &[1u8, 2, 4][..])]));
            assert_ne!(base, f(vec![("b", &[1u8, 2, 3][..])]));
            assert_ne!(base, f(vec![("a", &[1u8, 2][..]), ("", &[3u8][..])]));
            assert_eq!(verify_checksum(&base, [("a", &[1u8, 2, 3][..])]), Ok(()));
            assert!(verify_checksum(&base, [("a", &[1u8, 2, 2][..])]).is_err());
        }
        // The first version-1 files' checksum: FNV-1a 64 of "a\0" and the bytes 1, 2, 3.
        assert_eq!(fnv1a([("a", &[1u8, 2, 3][..])]).len(), 16);
    }

    #[test]
    fn metadata_comes_out_sorted_and_the_same_every_time() {
        let data = [0u8; 4];
        let one = |meta: Vec<(&str, &str)>| {
            let meta = meta
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data)
                    .expect("view");
            let bytes = safetensors::serialize([("t", view)], Some(meta)).expect("serialize");
            with_sorted_metadata(bytes).expect("sorted")
        };
        let names: Vec<String> = (0..12).map(|i| format!("k{i:02}")).collect();
        let keys: Vec<(&str, &str)> = names.iter().map(|k| (k.as_str(), "v")).collect();
        let first = one(keys.clone());
        for _ in 0..5 {
            assert_eq!(one(keys.clone()), first);
        }
        let text = String::from_utf8_lossy(&first);
        assert!(text.find("\"k00\"") < text.find("\"k11\""));
        let st = safetensors::SafeTensors::deserialize(&first).expect("still readable");
        assert_eq!(st.tensor("t").expect("t").data(), &data);
    }

    #[test]
    fn durable_write_replaces_and_leaves_no_temporary() {
        let path = std::env::temp_dir().join(format!("adafactor-durable-{}", std::process::id()));
        write_durably(&path, b"one").expect("write");
        write_durably(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        assert!(!Path::new(&tmp).exists());
        std::fs::remove_file(&path).ok();
        let missing = std::env::temp_dir().join("no-such-folder-adafactor/x");
        assert!(write_durably(&missing, b"x").is_err());
    }
}
