//! `torch.save` files: the zip archive (torch ≥ 1.6) and the legacy stream (torch < 1.6),
//! turned into the tensors of their state dict.
//!
//! Both formats pickle the saved object with storages replaced by persistent ids; the zip
//! format keeps each storage as an archive entry `<name>/data/<key>` (byte order in
//! `<name>/byteorder`), the legacy format appends them after the pickle, each as a
//! little-endian element count and the raw little-endian bytes, in the order of a pickled list
//! of keys. A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)`,
//! possibly wrapped in `_rebuild_parameter`; nothing else is interpreted, and nothing is called.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::ops::Range;

use super::pickle::{self, Node, Pickle, Value};
use super::tensor::{ByteOrder, DType, TensorLayout};

/// What one state-dict entry holds.
#[derive(Clone, Debug)]
pub(crate) enum Entry {
    Tensor(TensorLayout),
    /// Anything else, described for error messages (an integer, an unknown object, …).
    Other(String),
}

/// The state dict of a torch checkpoint: entries in file order, and where the dict was found.
#[derive(Debug)]
pub(crate) struct StateDict {
    pub entries: Vec<(String, Entry)>,
    /// The key path of the dict inside the saved object (`""`: the object itself).
    pub location: String,
}

/// Keys under which training scripts keep the weights: mmengine/mmcv, timm and Lightning
/// (`state_dict`), torchvision's reference scripts and DeiT (`model`), the PyTorch tutorials
/// (`model_state_dict`), and a few others seen in the wild. Tried in this order, then the
/// same inside each of them (`{'model': {'state_dict': …}}`).
pub(crate) const STATE_DICT_KEYS: [&str; 8] =
    ["state_dict", "model", "model_state_dict", "module", "net", "network", "weights", "params"];

/// The stored entries of a zip archive, each CRC-checked when first used.
struct Archive<'a> {
    bytes: &'a [u8],
    /// Name → (data bytes, CRC-32); compressed entries map to `None`.
    entries: HashMap<String, Option<(Range<usize>, u32)>>,
    checked: RefCell<HashSet<String>>,
    first_name: String,
}

impl<'a> Archive<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, String> {
        let mut archive =
            zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("cannot read the zip archive: {e}"))?;
        let mut entries = HashMap::new();
        let mut first_name = String::new();
        for i in 0..archive.len() {
            let file = archive.by_index_raw(i).map_err(|e| format!("zip entry {i}: {e}"))?;
            let name = file.name().to_string();
            if i == 0 {
                first_name = name.clone();
            }
            // torch writes stored entries; compressed ones are refused if they are needed.
            if file.compression() != zip::CompressionMethod::Stored || file.size() != file.compressed_size() {
                entries.insert(name, None);
                continue;
            }
            let start = file.data_start().ok_or_else(|| format!("zip entry {name}: no data offset"))?;
            let range = usize::try_from(start)
                .ok()
                .and_then(|s| Some(s..s.checked_add(usize::try_from(file.size()).ok()?)?))
                .filter(|r| r.end <= bytes.len())
                .ok_or_else(|| format!("zip entry {name} claims {} bytes past the end of the file", file.size()))?;
            entries.insert(name, Some((range, file.crc32())));
        }
        // Entries sharing bytes would let a small file cost many CRC passes: real archives
        // never overlap.
        let mut ranges: Vec<&Range<usize>> = entries.values().flatten().map(|(r, _)| r).collect();
        ranges.sort_unstable_by_key(|r| (r.start, r.end));
        if ranges.windows(2).any(|w| w[1].start < w[0].end) {
            return Err("zip entries overlap".into());
        }
        Ok(Archive { bytes, entries, checked: RefCell::new(HashSet::new()), first_name })
    }

    /// The bytes of entry `name` (CRC-checked), `Ok(None)` when there is no such entry.
    fn get(&self, name: &str) -> Result<Option<Range<usize>>, String> {
        match self.entries.get(name) {
            None => Ok(None),
            Some(None) => Err(format!("zip entry {name} is compressed (torch stores entries uncompressed)")),
            Some(Some((range, crc))) => {
                if !self.checked.borrow().contains(name) {
                    if crc32fast::hash(&self.bytes[range.clone()]) != *crc {
                        return Err(format!("zip entry {name} is damaged (CRC mismatch)"));
                    }
                    self.checked.borrow_mut().insert(name.to_string());
                }
                Ok(Some(range.clone()))
            }
        }
    }
}

/// Why a file could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The content is not a torch checkpoint at all (a zip of something else, say).
    NotTorch(String),
    /// A torch checkpoint, broken.
    Broken(String),
}

impl From<String> for ReadError {
    fn from(reason: String) -> Self {
        ReadError::Broken(reason)
    }
}

/// Whether the first zip local header names a `data.pkl`, as torch's archives start.
fn starts_like_torch_zip(bytes: &[u8]) -> bool {
    let Some(len) = bytes.get(26..28).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize) else { return false };
    bytes.get(30..30 + len).is_some_and(|name| name.ends_with(b"/data.pkl"))
}

/// Reads a torch zip checkpoint.
pub(crate) fn read_zip(bytes: &[u8]) -> Result<StateDict, ReadError> {
    let archive = Archive::new(bytes).map_err(|e| {
        if starts_like_torch_zip(bytes) {
            ReadError::Broken(format!("truncated or damaged: {e}"))
        } else {
            ReadError::NotTorch(format!("a file starting like a zip archive that cannot be read ({e})"))
        }
    })?;
    // Every entry sits in one top-level folder named after the file: `<name>/data.pkl`.
    let folder = archive.first_name.split_once('/').map_or("", |(f, _)| f);
    let pkl_name = format!("{folder}/data.pkl");
    let Some(pkl) = archive.get(&pkl_name)? else {
        let mut names: Vec<&str> = archive.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        let more = if names.len() > 5 { ", …" } else { "" };
        names.truncate(5);
        return Err(ReadError::NotTorch(format!(
            "a zip archive without {pkl_name} (entries: {}{more})",
            names.join(", ")
        )));
    };
    let order = match archive.get(&format!("{folder}/byteorder"))?.map(|r| &bytes[r]) {
        None | Some(b"little") => ByteOrder::Little,
        Some(b"big") => ByteOrder::Big,
        Some(other) => return Err(format!("byteorder entry says {:?}", String::from_utf8_lossy(other)).into()),
    };
    let (pickle, _) = pickle::parse(&bytes[pkl]).map_err(|e| format!("{pkl_name}: {e}"))?;
    let storage = |key: &str| -> Result<(Range<usize>, ByteOrder), String> {
        let name = format!("{folder}/data/{key}");
        match archive.get(&name)? {
            Some(range) => Ok((range, order)),
            None => Err(format!("storage {name} is not in the archive")),
        }
    };
    Ok(state_dict(&pickle, &storage)?)
}

/// torch's legacy magic number, 0x1950a86a20f9469cfc6c, as LONG1 little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Whether `bytes` start with the pickled legacy magic number.
pub(crate) fn is_legacy(bytes: &[u8]) -> bool {
    matches!(pickle::parse(bytes), Ok((p, _)) if p.root == Value::BigInt(LEGACY_MAGIC[..].into()))
}

/// Reads a legacy (torch < 1.6) stream: magic, protocol version, system info, the object,
/// the storage keys, then the storages.
pub(crate) fn read_legacy(bytes: &[u8]) -> Result<StateDict, String> {
    let mut at = 0;
    let mut next = |what: &str| -> Result<Pickle, String> {
        let (p, len) = pickle::parse(&bytes[at..]).map_err(|e| format!("{what}: {e} (from byte {at})"))?;
        at += len;
        Ok(p)
    };
    if next("magic number")?.root != Value::BigInt(LEGACY_MAGIC[..].into()) {
        return Err("the first pickle is not torch's magic number".into());
    }
    match next("protocol version")?.root {
        Value::Int(1001) => {}
        other => return Err(format!("protocol version {other:?}, expected 1001")),
    }
    next("system info")?;
    let object = next("the saved object")?;
    let keys_pickle = next("the storage keys")?;
    let keys: Vec<String> = keys_pickle
        .sequence(&keys_pickle.root)
        .ok_or("the storage keys are not a list")?
        .iter()
        .map(|k| text(k).map(str::to_string).ok_or("a storage key is not a string"))
        .collect::<Result<_, _>>()?;
    // Each storage: an i64 element count, then that many elements of the storage's type.
    let types = storage_types(&object);
    let mut ranges: HashMap<&str, Range<usize>> = HashMap::new();
    let mut pos = at;
    for key in &keys {
        let dtype = types.get(key.as_str()).ok_or_else(|| format!("storage {key} is listed but no tensor uses it"))?;
        let size =
            element_size(dtype).ok_or_else(|| format!("storage {key} has type {dtype}, whose size is unknown"))?;
        let count = bytes
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| format!("file ends inside the header of storage {key}"))?;
        let end = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(size))
            .and_then(|n| n.checked_add(pos + 8))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| format!("storage {key} claims {count} elements, past the end of the file"))?;
        ranges.insert(key, pos + 8..end);
        pos = end;
    }
    let storage = |key: &str| -> Result<(Range<usize>, ByteOrder), String> {
        // Legacy storages are always written little-endian.
        ranges
            .get(key)
            .map(|r| (r.clone(), ByteOrder::Little))
            .ok_or_else(|| format!("storage {key} is not in the file"))
    };
    state_dict(&object, &storage)
}

/// The dtype of every storage the pickle refers to, by key (legacy: needed to walk the data).
fn storage_types(pickle: &Pickle) -> HashMap<&str, DType> {
    pickle
        .nodes
        .iter()
        .filter_map(|node| match node {
            Node::PersistentId(pid) => {
                let s = StorageRef::from_pid(pickle, pid).ok()?;
                Some((s.key, s.dtype))
            }
            _ => None,
        })
        .collect()
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::Str(s) => Some(s),
        Value::Bytes(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// A storage as its persistent id names it.
struct StorageRef<'p> {
    key: &'p str,
    dtype: DType,
    /// Elements claimed.
    numel: usize,
    /// Legacy storage views: (offset, elements) within the root storage.
    view: Option<(usize, usize)>,
}

impl<'p> StorageRef<'p> {
    /// `('storage', storage_type, key, location, numel[, view_metadata])`.
    fn from_pid(pickle: &'p Pickle, pid: &Value) -> Result<Self, String> {
        let fields = pickle.sequence(pid).ok_or("persistent id is not a tuple")?;
        if fields.first().and_then(text) != Some("storage") || !(5..=6).contains(&fields.len()) {
            return Err("persistent id is not a storage".into());
        }
        let dtype = match pickle.global(&fields[1]) {
            Some(("torch" | "torch.cuda", name)) => storage_dtype(name),
            _ => return Err("storage type is not a torch storage class".into()),
        };
        let key = text(&fields[2]).ok_or("storage key is not a string")?;
        let count = |v: &Value| int(v).and_then(|n| usize::try_from(n).ok());
        let numel = count(&fields[4]).ok_or("storage size is not a non-negative integer")?;
        let view = match fields.get(5) {
            None | Some(Value::None) => None,
            Some(meta) => {
                let m = pickle.sequence(meta).filter(|m| m.len() == 3).ok_or("malformed storage view")?;
                Some((count(&m[1]).ok_or("bad view offset")?, count(&m[2]).ok_or("bad view size")?))
            }
        };
        Ok(StorageRef { key, dtype, numel, view })
    }
}

/// The element type of a torch storage class (`FloatStorage`, …).
fn storage_dtype(class: &str) -> DType {
    match class {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" | "UntypedStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        other => DType::Other(other.trim_end_matches("Storage").to_string()),
    }
}

/// Bytes per element of a storage type, including those never read (complex, quantized),
/// which a legacy stream must still be walked past.
fn element_size(dtype: &DType) -> Option<usize> {
    dtype.size().or(match dtype {
        DType::Other(name) => match name.as_str() {
            "ComplexDouble" => Some(16),
            "ComplexFloat" => Some(8),
            "ComplexHalf" | "QInt32" => Some(4),
            "QInt8" | "QUInt8" | "QUInt4x2" | "QUInt2x4" => Some(1),
            _ => None,
        },
        _ => None,
    })
}

/// The element type a `torch.<dtype>` global names (`_rebuild_tensor_v3`'s argument).
fn torch_dtype(name: &str) -> DType {
    match name {
        "float32" | "float" => DType::F32,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "float64" | "double" => DType::F64,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "int16" | "short" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        other => DType::Other(other.to_string()),
    }
}

/// Finds a storage's bytes and byte order by its key.
type Storages<'a> = dyn Fn(&str) -> Result<(Range<usize>, ByteOrder), String> + 'a;

/// Locates the state dict in the saved object and reads its entries.
fn state_dict(pickle: &Pickle, storages: &Storages<'_>) -> Result<StateDict, String> {
    let (location, items) = locate(pickle)?;
    let mut entries = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Some(key) = text(k) else { continue };
        let entry = match tensor(pickle, v) {
            Ok(Some(t)) => Entry::Tensor(layout(&t, storages).map_err(|e| format!("tensor {key}: {e}"))?),
            Ok(None) => Entry::Other(pickle.describe(v)),
            Err(e) => Entry::Other(e),
        };
        entries.push((key.to_string(), entry));
    }
    Ok(StateDict { entries, location })
}

/// A dict's `(key, value)` pairs.
type Items = [(Value, Value)];

/// The items of a dict or `collections.OrderedDict`.
fn dict_items<'p>(pickle: &'p Pickle, value: &Value) -> Option<&'p [(Value, Value)]> {
    match pickle.node(value)? {
        Node::Dict(items) => Some(items),
        Node::Object { callable, items, .. } if pickle.global(callable) == Some(("collections", "OrderedDict")) => {
            Some(items)
        }
        _ => None,
    }
}

/// The dict holding the weights: the saved dict itself when it holds tensors, else under one
/// of [`STATE_DICT_KEYS`], one or two levels down; failing those, the saved dict.
fn locate(pickle: &Pickle) -> Result<(String, &Items), String> {
    let holds_tensors = |items: &[(Value, Value)]| items.iter().any(|(_, v)| matches!(tensor(pickle, v), Ok(Some(_))));
    let lookup = |items: &'_ [(Value, Value)], key: &str| -> Option<Value> {
        items.iter().find(|(k, _)| text(k) == Some(key)).map(|(_, v)| v.clone())
    };
    let Some(root) = dict_items(pickle, &pickle.root) else {
        let hint = match pickle.node(&pickle.root) {
            Some(Node::Object { .. }) => " (a whole pickled model? torch.save(model.state_dict()) is read)",
            _ => "",
        };
        return Err(format!("the saved object is {}, not a dict of tensors{hint}", pickle.describe(&pickle.root)));
    };
    // Breadth first over (path, dict): the saved dict, then its named children, then theirs;
    // each dict once, however often the pickle refers to it.
    let mut seen = HashSet::new();
    let mut first_visit = |v: &Value| matches!(v, Value::Node(i) if seen.insert(*i));
    first_visit(&pickle.root);
    let mut level: Vec<(String, &[(Value, Value)])> = vec![(String::new(), root)];
    for _ in 0..3 {
        if let Some((path, items)) = level.iter().find(|(_, items)| holds_tensors(items)) {
            return Ok((path.clone(), items));
        }
        let mut next = Vec::new();
        for (path, items) in &level {
            for key in STATE_DICT_KEYS {
                let child = lookup(items, key).filter(&mut first_visit);
                if let Some(child) = child.and_then(|v| dict_items(pickle, &v)) {
                    let sub = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
                    next.push((sub, child));
                }
            }
        }
        level = next;
    }
    // No dict holds tensors: the saved dict is taken as it is, so that a block asking for a
    // key learns what the entry holds instead (an object never called, a number…).
    Ok((String::new(), root))
}

/// A tensor as `_rebuild_tensor_v2` describes it, storage not yet resolved.
struct TensorArgs<'p> {
    storage: StorageRef<'p>,
    /// `_rebuild_tensor_v3`'s explicit dtype.
    dtype: Option<DType>,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// Reads `value` as a tensor: `Ok(None)` when it is not one, `Err` when it is a tensor whose
/// arguments are malformed (kept as the entry's description: an error only if it is needed).
fn tensor<'p>(pickle: &'p Pickle, value: &Value) -> Result<Option<TensorArgs<'p>>, String> {
    let mut value = value;
    // Unwrap `_rebuild_parameter(data, …)` and `_rebuild_from_type_v2(func, type, args, …)`;
    // bounded, as a pickle can wrap a value in itself.
    for _ in 0..8 {
        let Some(Node::Object { callable, args, .. }) = pickle.node(value) else { return Ok(None) };
        let Some((module, name)) = pickle.global(callable) else { return Ok(None) };
        let args_list = pickle.sequence(args).unwrap_or(&[]);
        match (module, name) {
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                value = args_list.first().ok_or("_rebuild_parameter without arguments")?;
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                // (func, new_type, args, state): func(*args), the subclass dropped.
                let (Some(func), Some(inner)) = (args_list.first(), args_list.get(2)) else {
                    return Err("_rebuild_from_type_v2 with too few arguments".into());
                };
                let Some((m, n)) = pickle.global(func) else { return Ok(None) };
                return rebuild(pickle, m, n, pickle.sequence(inner).unwrap_or(&[]));
            }
            _ => return rebuild(pickle, module, name, args_list),
        }
    }
    Err("tensor wrapped too deeply".into())
}

/// `_rebuild_tensor(storage, offset, size, stride)`, `_rebuild_tensor_v2(…, requires_grad,
/// backward_hooks[, metadata])`, `_rebuild_tensor_v3(…, dtype[, metadata])`.
fn rebuild<'p>(pickle: &'p Pickle, module: &str, name: &str, args: &[Value]) -> Result<Option<TensorArgs<'p>>, String> {
    let version = match (module, name) {
        ("torch._utils", "_rebuild_tensor") => 1,
        ("torch._utils", "_rebuild_tensor_v2") => 2,
        ("torch._utils", "_rebuild_tensor_v3") => 3,
        _ => return Ok(None),
    };
    if args.len() < 4 || (version == 3 && args.len() < 7) {
        return Err(format!("{name} with {} arguments", args.len()));
    }
    let Some(Node::PersistentId(pid)) = pickle.node(&args[0]) else {
        return Err(format!("{name}'s storage is {}", pickle.describe(&args[0])));
    };
    let storage = StorageRef::from_pid(pickle, pid)?;
    let dims = |v: &Value, what: &str| -> Result<Vec<usize>, String> {
        let items = pickle.sequence(v).ok_or_else(|| format!("{what} is not a tuple"))?;
        items
            .iter()
            .map(|d| int(d).and_then(|n| usize::try_from(n).ok()).ok_or_else(|| format!("{what} has {d:?}")))
            .collect()
    };
    let offset =
        int(&args[1]).and_then(|n| usize::try_from(n).ok()).ok_or("storage offset is not a non-negative integer")?;
    let dtype = match version {
        3 => match pickle.global(&args[6]) {
            Some(("torch", dtype)) => Some(torch_dtype(dtype)),
            _ => return Err("_rebuild_tensor_v3's dtype is not a torch dtype".into()),
        },
        _ => None,
    };
    Ok(Some(TensorArgs { storage, dtype, offset, shape: dims(&args[2], "size")?, strides: dims(&args[3], "stride")? }))
}

/// Resolves a tensor's storage and checks the view against it.
fn layout(t: &TensorArgs<'_>, storages: &Storages<'_>) -> Result<TensorLayout, String> {
    let s = &t.storage;
    let (mut bytes, order) = storages(s.key)?;
    let dtype = t.dtype.clone().unwrap_or_else(|| s.dtype.clone());
    let Some(storage_size) = element_size(&s.dtype) else {
        // A storage type nobody reads: the tensor keeps its name and shape, for the error
        // that names them if it is ever needed.
        return TensorLayout::new(dtype, t.shape.clone(), t.strides.clone(), t.offset, bytes, order);
    };
    // The storage holds `numel` elements of its own type; the entry must back them all.
    let claimed = s.numel.checked_mul(storage_size).filter(|&n| n <= bytes.len()).ok_or_else(|| {
        format!(
            "storage {} claims {} {} elements, the file holds {} bytes for it",
            s.key,
            s.numel,
            s.dtype.name(),
            bytes.len()
        )
    })?;
    bytes.end = bytes.start + claimed;
    if let Some((offset, len)) = s.view {
        let start = offset.checked_mul(storage_size).and_then(|o| o.checked_add(bytes.start));
        let end = len.checked_mul(storage_size).zip(start).and_then(|(l, s)| s.checked_add(l));
        match (start, end) {
            (Some(start), Some(end)) if end <= bytes.end => bytes = start..end,
            _ => return Err(format!("storage view ({offset}, {len}) outside storage {}", s.key)),
        }
    }
    TensorLayout::new(dtype, t.shape.clone(), t.strides.clone(), t.offset, bytes, order)
}
