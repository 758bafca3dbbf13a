//! Reader for `torch.save` checkpoints (`pytorch_model.bin`, zip format of torch >= 1.6).
//!
//! `torch.load` unpickles `data.pkl`, importing and calling whatever globals it names, so a
//! hostile checkpoint can run arbitrary code. This reader interprets the pickle opcodes with a
//! small stack machine that knows only the few callables a tensor state dict needs; any other
//! global is an error, never code. It does not use tch so it can be tested without libtorch.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use zip::result::ZipError;
use zip::ZipArchive;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

/// torch 2.x still names a typed storage class, not a dtype, in each persistent id.
#[rustfmt::skip]
const STORAGE_CLASSES: &[(&str, DType)] = &[
    ("DoubleStorage", DType::F64), ("FloatStorage", DType::F32), ("HalfStorage", DType::F16),
    ("BFloat16Storage", DType::BF16), ("LongStorage", DType::I64), ("IntStorage", DType::I32),
    ("ShortStorage", DType::I16), ("CharStorage", DType::I8), ("ByteStorage", DType::U8),
    ("BoolStorage", DType::Bool),
];

/// A tensor copied out of its storage: contiguous, row-major, little-endian.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TorchBinError {
    #[error("cannot read {}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{}: legacy pre-1.6 torch.save format; re-save with torch>=1.6 or use safetensors",
        .path.display()
    )]
    Legacy { path: PathBuf },
    #[error("{}: corrupt or truncated zip archive: {source}", .path.display())]
    Zip { path: PathBuf, source: ZipError },
    #[error("{}: zip entry {entry}: {reason}", .path.display())]
    Entry { path: PathBuf, entry: String, reason: String },
    #[error("{}: {entry} at byte {offset}, opcode {opcode}: {reason}", .path.display())]
    Pickle { path: PathBuf, entry: String, offset: usize, opcode: String, reason: String },
    #[error(
        "refusing to load {global} from {}: not a tensor state dict \
         (pickle globals other than torch tensors are never executed)",
        .path.display()
    )]
    ForbiddenGlobal { path: PathBuf, global: String },
    #[error("{}: tensor {key}: {reason}", .path.display())]
    Tensor { path: PathBuf, key: String, reason: String },
    #[error("{}: {reason}", .path.display())]
    Format { path: PathBuf, reason: String },
}

/// Reads every tensor of a state dict saved with torch.save, in file order.
pub fn read_torch_bin(path: &Path) -> Result<Vec<(String, RawTensor)>, TorchBinError> {
    let file = File::open(path).map_err(|source| TorchBinError::Io { path: path.into(), source })?;
    read_from(BufReader::new(file), path)
}

/// `path` only labels errors, so that tests can feed in-memory archives.
fn read_from<R: Read + Seek>(mut reader: R, path: &Path) -> Result<Vec<(String, RawTensor)>, TorchBinError> {
    let io = |source| TorchBinError::Io { path: path.into(), source };
    let format = |reason: String| TorchBinError::Format { path: path.into(), reason };
    let mut magic = Vec::new();
    reader.by_ref().take(4).read_to_end(&mut magic).map_err(io)?;
    if magic != b"PK\x03\x04" {
        // The legacy format is a bare sequence of pickles, so it opens with PROTO.
        return Err(match magic.first() {
            Some(0x80) => TorchBinError::Legacy { path: path.into() },
            _ => format("not a torch.save checkpoint (no zip signature)".into()),
        });
    }
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut zip =
        ZipArchive::new(reader).map_err(|source| TorchBinError::Zip { path: path.into(), source })?;

    // torch names the single top-level folder after the file first saved to: any name goes.
    let pkls: Vec<String> = (zip.file_names())
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(String::from)
        .collect();
    let [pkl_name] = &pkls[..] else {
        return Err(format(format!("expected one <archive>/data.pkl entry, found {}", pkls.len())));
    };
    let prefix = pkl_name.trim_end_matches("data.pkl");

    let byteorder = format!("{prefix}byteorder");
    if zip.index_for_name(&byteorder).is_some() {
        let raw = read_entry(&mut zip, &byteorder, None, path)?;
        let order = String::from_utf8_lossy(&raw);
        if order.trim() != "little" {
            let reason = format!("byte order {:?} is not supported, only little", order.trim());
            return Err(TorchBinError::Entry { path: path.into(), entry: byteorder, reason });
        }
    }

    let pickle = read_entry(&mut zip, pkl_name, None, path)?;
    let root = Unpickler::new(&pickle).run().map_err(|(offset, op, fault)| match fault {
        Fault::Forbidden(global) => TorchBinError::ForbiddenGlobal { path: path.into(), global },
        Fault::Invalid(reason) => TorchBinError::Pickle {
            path: path.into(),
            entry: pkl_name.clone(),
            offset,
            opcode: op.map_or_else(|| "<end of data>".into(), describe_op),
            reason,
        },
    })?;
    if !matches!(root, Value::Dict(_)) {
        return Err(format(format!("top-level object is a {}, not a dict of tensors", root.kind())));
    }
    let mut views = Vec::new();
    flatten(&root, "", 0, &mut views).map_err(format)?;
    let mut seen = HashSet::new();
    if let Some((dup, _)) = views.iter().find(|(k, _)| !seen.insert(k.as_str())) {
        return Err(format(format!("tensor key {dup:?} occurs twice")));
    }

    // Storages may back several tensors (tied weights, slices): keep each until its last user.
    let mut users: HashMap<Rc<str>, usize> = HashMap::new();
    for (_, view) in &views {
        *users.entry(view.storage.key.clone()).or_default() += 1;
    }
    let mut cache: HashMap<Rc<str>, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(views.len());
    for (key, view) in views {
        let st = &view.storage;
        let tensor_err = |reason| TorchBinError::Tensor { path: path.into(), key: key.clone(), reason };
        let entry = format!("{prefix}data/{}", st.key);
        if !cache.contains_key(&st.key) {
            let want = (st.numel.checked_mul(st.dtype.size_in_bytes() as u64))
                .ok_or_else(|| tensor_err("storage size overflows".into()))?;
            cache.insert(st.key.clone(), read_entry(&mut zip, &entry, Some(want), path)?);
        }
        let left = users.get_mut(&st.key).map_or(0, |n| {
            *n -= 1;
            *n
        });
        let bytes = cache.remove(&st.key).unwrap_or_default();
        let data = if left == 0 && covers_whole(&view, bytes.len()) {
            bytes // the usual one-tensor-per-storage case: move, don't copy
        } else {
            let data = gather(&view, &bytes, &entry).map_err(tensor_err)?;
            if left > 0 {
                cache.insert(st.key.clone(), bytes);
            }
            data
        };
        out.push((key, RawTensor { dtype: st.dtype, shape: view.shape.clone(), data }));
    }
    Ok(out)
}

fn read_entry<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    name: &str,
    expected: Option<u64>,
    path: &Path,
) -> Result<Vec<u8>, TorchBinError> {
    let err = |reason| TorchBinError::Entry { path: path.into(), entry: name.into(), reason };
    let mut entry = zip.by_name(name).map_err(|e| match e {
        ZipError::FileNotFound => err("missing from the archive".into()),
        other => err(format!("unreadable: {other}")),
    })?;
    let size = entry.size();
    if let Some(want) = expected.filter(|&w| w != size) {
        return Err(err(format!("holds {size} bytes but its persistent id declares {want}")));
    }
    let mut buf = Vec::new();
    let cap = usize::try_from(size).map_err(|_| err(format!("{size} bytes do not fit in memory")))?;
    buf.try_reserve_exact(cap).map_err(|e| err(format!("cannot allocate {size} bytes: {e}")))?;
    // One byte past the declared size so that the zip reader hits EOF and checks the CRC, and an
    // entry that inflates beyond its header (a zip bomb) is noticed rather than buffered.
    (entry.by_ref().take(size.saturating_add(1)).read_to_end(&mut buf))
        .map_err(|e| err(format!("read failed (truncated or corrupt): {e}")))?;
    if buf.len() != cap {
        return Err(err(format!("declares {size} bytes but holds {}", buf.len())));
    }
    Ok(buf)
}

fn covers_whole(view: &TensorView, nbytes: usize) -> bool {
    let es = view.storage.dtype.size_in_bytes();
    view.offset == 0
        && view.numel().and_then(|n| n.checked_mul(es)) == Some(nbytes)
        && is_row_major(&view.shape, &view.stride)
}

fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        // torch leaves the stride of a size-1 dimension unconstrained.
        if d != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(d);
    }
    true
}

/// Copies a (possibly offset, strided) view out of its storage into a contiguous buffer.
fn gather(view: &TensorView, bytes: &[u8], entry: &str) -> Result<Vec<u8>, String> {
    let es = view.storage.dtype.size_in_bytes();
    let (shape, stride, offset) = (&view.shape, &view.stride, view.offset);
    let avail = bytes.len() / es;
    let numel = view.numel().ok_or("element count overflows")?;
    let mut last = offset;
    for (&d, &s) in shape.iter().zip(stride) {
        let span = d.saturating_sub(1).checked_mul(s);
        last = span.and_then(|x| x.checked_add(last)).ok_or("strides overflow")?;
    }
    if (numel > 0 && last >= avail) || offset > avail {
        return Err(format!(
            "view (offset {offset}, size {shape:?}, stride {stride:?}) reaches element {last} \
             but {entry} holds only {avail}"
        ));
    }
    if numel > avail {
        // Only overlapping views (e.g. expand()) outnumber their storage; refusing them keeps the
        // output bounded by the file's own size.
        return Err(format!("overlapping view of {numel} elements over {avail}; save a .clone()"));
    }
    let mut out = Vec::with_capacity(numel * es);
    if numel == 0 || is_row_major(shape, stride) {
        let run = bytes.get(offset * es..(offset + numel) * es).ok_or("storage too short")?;
        out.extend_from_slice(run);
        return Ok(out);
    }
    let mut idx = vec![0usize; shape.len()];
    let mut src = offset;
    for _ in 0..numel {
        out.extend_from_slice(bytes.get(src * es..(src + 1) * es).ok_or("storage too short")?);
        for d in (0..shape.len()).rev() {
            // Wrapping: a size-1 dimension may carry any stride, even one that overflows here; the
            // carry below undoes it exactly, so every index actually read was bounds-checked above.
            idx[d] += 1;
            src = src.wrapping_add(stride[d]);
            if idx[d] < shape[d] {
                break;
            }
            src = src.wrapping_sub(stride[d].wrapping_mul(shape[d]));
            idx[d] = 0;
        }
    }
    Ok(out)
}

type Views = Vec<(String, Rc<TensorView>)>;

fn flatten(v: &Value, prefix: &str, depth: usize, out: &mut Views) -> Result<(), String> {
    // A pickle can make a dict contain itself; this bounds the recursion.
    if depth > 64 {
        return Err(format!("dicts nested more than 64 deep under {prefix:?}"));
    }
    let Value::Dict(d) = v else { return Ok(()) };
    for kv in d.0.borrow().chunks_exact(2) {
        let [k, v] = kv else { continue };
        let Value::Str(k) = k else {
            return Err(format!("dict key of type {} under {prefix:?}; expected str", k.kind()));
        };
        let key = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        match v {
            Value::Tensor(t) => out.push((key, t.clone())),
            Value::Dict(_) => flatten(v, &key, depth + 1, out)?,
            _ => {} // ints, strings...: bookkeeping that some state dicts carry
        }
    }
    Ok(())
}

// ---- pickle interpreter ----

struct Storage {
    dtype: DType,
    key: Rc<str>,
    numel: u64,
}

struct TensorView {
    storage: Rc<Storage>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorView {
    fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }
}

#[derive(Debug, Clone, Copy)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    StorageClass(DType),
}

/// Children of a tuple, list or dict (a dict's as k0, v0, k1, v1, ...).
#[derive(Default)]
struct Items(RefCell<Vec<Value>>);

fn items(v: Vec<Value>) -> Rc<Items> {
    Rc::new(Items(RefCell::new(v)))
}

impl Drop for Items {
    // A pickle of a few MB can nest containers a million deep, which a recursive drop would
    // overflow the stack on: children this container solely owns are unlinked iteratively.
    fn drop(&mut self) {
        let mut work = std::mem::take(self.0.get_mut());
        while let Some(v) = work.pop() {
            if let Value::Tuple(rc) | Value::List(rc) | Value::Dict(rc) = v {
                if let Ok(mut sole) = Rc::try_unwrap(rc) {
                    work.append(sole.0.get_mut());
                }
            }
        }
    }
}

/// Containers are shared because pickle memoizes an object before filling it; every variant is
/// cheap to clone so that repeated BINGETs cannot blow up memory.
#[derive(Clone)]
enum Value {
    /// None, bools and floats: only ever ignored arguments, so just their type name is kept.
    Other(&'static str),
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<Items>),
    List(Rc<Items>),
    Dict(Rc<Items>),
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<TensorView>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Other(kind) => kind,
            Value::Int(_) => "int",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "callable",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

enum Fault {
    Forbidden(String),
    Invalid(String),
}

impl<S: Into<String>> From<S> for Fault {
    fn from(s: S) -> Self {
        Fault::Invalid(s.into())
    }
}

#[rustfmt::skip]
const OPCODES: &[(u8, &str)] = &[
    (b'(', "MARK"), (b'.', "STOP"), (b'0', "POP"), (b'1', "POP_MARK"), (b'2', "DUP"),
    (b'F', "FLOAT"), (b'I', "INT"), (b'J', "BININT"), (b'K', "BININT1"), (b'L', "LONG"),
    (b'M', "BININT2"), (b'N', "NONE"), (b'P', "PERSID"), (b'Q', "BINPERSID"), (b'R', "REDUCE"),
    (b'S', "STRING"), (b'T', "BINSTRING"), (b'U', "SHORT_BINSTRING"), (b'V', "UNICODE"),
    (b'X', "BINUNICODE"), (b'a', "APPEND"), (b'b', "BUILD"), (b'c', "GLOBAL"), (b'd', "DICT"),
    (b'}', "EMPTY_DICT"), (b'e', "APPENDS"), (b'g', "GET"), (b'h', "BINGET"), (b'i', "INST"),
    (b'j', "LONG_BINGET"), (b'l', "LIST"), (b']', "EMPTY_LIST"), (b'o', "OBJ"), (b'p', "PUT"),
    (b'q', "BINPUT"), (b'r', "LONG_BINPUT"), (b's', "SETITEM"), (b't', "TUPLE"),
    (b')', "EMPTY_TUPLE"), (b'u', "SETITEMS"), (b'G', "BINFLOAT"), (b'B', "BINBYTES"),
    (b'C', "SHORT_BINBYTES"), (0x80, "PROTO"), (0x81, "NEWOBJ"), (0x82, "EXT1"), (0x83, "EXT2"),
    (0x84, "EXT4"), (0x85, "TUPLE1"), (0x86, "TUPLE2"), (0x87, "TUPLE3"), (0x88, "NEWTRUE"),
    (0x89, "NEWFALSE"), (0x8a, "LONG1"), (0x8b, "LONG4"), (0x8c, "SHORT_BINUNICODE"),
    (0x8d, "BINUNICODE8"), (0x8e, "BINBYTES8"), (0x8f, "EMPTY_SET"), (0x90, "ADDITEMS"),
    (0x91, "FROZENSET"), (0x92, "NEWOBJ_EX"), (0x93, "STACK_GLOBAL"), (0x94, "MEMOIZE"),
    (0x95, "FRAME"), (0x96, "BYTEARRAY8"), (0x97, "NEXT_BUFFER"), (0x98, "READONLY_BUFFER"),
];

fn describe_op(op: u8) -> String {
    let name = OPCODES.iter().find(|(b, _)| *b == op).map_or("unknown", |(_, n)| n);
    format!("{name} (0x{op:02x})")
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }
    }

    /// On error: byte offset and opcode (None past the end) of the failing instruction.
    fn run(mut self) -> Result<Value, (usize, Option<u8>, Fault)> {
        loop {
            let at = self.pos;
            let Some(&op) = self.data.get(at) else {
                return Err((at, None, "pickle ends without STOP (truncated?)".into()));
            };
            self.pos += 1;
            let pushed = match op {
                b'.' => return self.pop().map_err(|f| (at, Some(op), f)),
                _ => self.step(op).map_err(|f| (at, Some(op), f))?,
            };
            self.stack.extend(pushed);
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Fault> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let s = end.and_then(|e| self.data.get(self.pos..e)).ok_or("operand past end of data")?;
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Fault> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn utf8(&mut self, n: u64) -> Result<Value, Fault> {
        let n = usize::try_from(n).map_err(|_| "string length overflows")?;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| "string is not valid UTF-8")?;
        Ok(Value::Str(s.into()))
    }

    fn line(&mut self) -> Result<&'a str, Fault> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest.iter().position(|&b| b == b'\n').ok_or("GLOBAL name without newline")?;
        let s = self.take(n)?;
        self.take(1)?;
        std::str::from_utf8(s).map_err(|_| "GLOBAL name is not UTF-8".into())
    }

    /// Values below the innermost MARK belong to an enclosing construct, so they are off limits.
    fn top(&self) -> Result<&Value, Fault> {
        let floor = self.marks.last().copied().unwrap_or(0);
        self.stack.get(floor..).and_then(|s| s.last()).ok_or_else(|| "stack underflow".into())
    }

    fn pop(&mut self) -> Result<Value, Fault> {
        self.top()?;
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, Fault> {
        let m = self.marks.pop().ok_or("no MARK to pop to")?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    /// Executes one opcode; returns what it pushes.
    fn step(&mut self, op: u8) -> Result<Option<Value>, Fault> {
        let v = match op {
            0x80 => match self.arr()? {
                [p] if p <= 5 => return Ok(None),
                [p] => return Err(format!("pickle protocol {p} is newer than 5").into()),
            },
            0x95 => {
                // Frames only batch the writer's output; the opcodes inside follow inline.
                self.take(8)?;
                return Ok(None);
            }
            b'(' => {
                self.marks.push(self.stack.len());
                return Ok(None);
            }
            b'}' => Value::Dict(Rc::default()),
            b']' => Value::List(Rc::default()),
            b')' => Value::Tuple(Rc::default()),
            b'N' => Value::Other("None"),
            0x88 | 0x89 => Value::Other("bool"),
            b'G' => {
                self.take(8)?;
                Value::Other("float")
            }
            b'K' => Value::Int(self.arr::<1>()?[0].into()),
            b'M' => Value::Int(u16::from_le_bytes(self.arr()?).into()),
            b'J' => Value::Int(i32::from_le_bytes(self.arr()?).into()),
            0x8a => {
                let [n] = self.arr()?;
                let b = self.take(n.into())?;
                if b.len() > 8 {
                    return Err("LONG1 integer wider than 64 bits".into());
                }
                let mut le = [if b.last().is_some_and(|&x| x >= 0x80) { 0xff } else { 0 }; 8];
                le[..b.len()].copy_from_slice(b);
                Value::Int(i64::from_le_bytes(le))
            }
            b'X' => {
                let n = u32::from_le_bytes(self.arr()?);
                self.utf8(n.into())?
            }
            0x8c => {
                let [n] = self.arr()?;
                self.utf8(n.into())?
            }
            0x8d => {
                let n = u64::from_le_bytes(self.arr()?);
                self.utf8(n)?
            }
            b'U' | b'T' => {
                // Python 2 `str`: only ASCII keys are expected, so lossy decoding is harmless.
                let n = match op {
                    b'U' => self.arr::<1>()?[0].into(),
                    _ => i32::from_le_bytes(self.arr()?),
                };
                let n = usize::try_from(n).map_err(|_| "negative BINSTRING length")?;
                Value::Str(String::from_utf8_lossy(self.take(n)?).into())
            }
            b'c' => {
                let module = self.line()?;
                Value::Global(resolve(module, self.line()?)?)
            }
            0x93 => match (self.pop()?, self.pop()?) {
                (Value::Str(name), Value::Str(module)) => Value::Global(resolve(&module, &name)?),
                _ => return Err("STACK_GLOBAL operands are not two strs".into()),
            },
            b'q' | b'r' | 0x94 => {
                let i = match op {
                    b'q' => self.arr::<1>()?[0].into(),
                    b'r' => u32::from_le_bytes(self.arr()?),
                    _ => u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?,
                };
                let v = self.top()?.clone();
                self.memo.insert(i, v);
                return Ok(None);
            }
            b'h' | b'j' => {
                let i = match op {
                    b'h' => self.arr::<1>()?[0].into(),
                    _ => u32::from_le_bytes(self.arr()?),
                };
                self.memo.get(&i).ok_or_else(|| format!("memo entry {i} was never stored"))?.clone()
            }
            b't' => Value::Tuple(items(self.pop_mark()?)),
            0x85..=0x87 => {
                let mut popped = Vec::new();
                for _ in 0x84..op {
                    popped.push(self.pop()?);
                }
                popped.reverse();
                Value::Tuple(items(popped))
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let f = self.pop()?;
                if op == 0x81 && !matches!(f, Value::Global(Global::OrderedDict)) {
                    return Err(format!("NEWOBJ of a {}", f.kind()).into());
                }
                call(f, args)?
            }
            b'b' => {
                self.pop()?;
                // nn.Module.state_dict() attaches `_metadata` to its OrderedDict; not needed here.
                return match self.top()? {
                    Value::Dict(_) => Ok(None),
                    v => Err(format!("BUILD on a {}; only dicts are accepted", v.kind()).into()),
                };
            }
            b's' | b'u' => {
                let pairs = match op {
                    b's' => vec![self.pop()?, self.pop()?].into_iter().rev().collect(),
                    _ => self.pop_mark()?,
                };
                let Value::Dict(d) = self.top()? else {
                    return Err(format!("SETITEM(S) on a {}", self.top()?.kind()).into());
                };
                let mut pairs = pairs.into_iter();
                while let Some(k) = pairs.next() {
                    let v = pairs.next().ok_or("SETITEMS with an odd number of items")?;
                    dict_set(d, k, v);
                }
                return Ok(None);
            }
            b'a' | b'e' => {
                let new = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                let Value::List(l) = self.top()? else {
                    return Err(format!("APPEND(S) on a {}", self.top()?.kind()).into());
                };
                l.0.borrow_mut().extend(new);
                return Ok(None);
            }
            b'Q' => persistent_load(self.pop()?)?,
            _ => return Err("unsupported opcode (torch.save never writes it for a state dict)".into()),
        };
        Ok(Some(v))
    }
}

fn resolve(module: &str, name: &str) -> Result<Global, Fault> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Global::RebuildParameter,
        ("torch", _) if name.ends_with("Storage") => match STORAGE_CLASSES.iter().find(|(n, _)| *n == name) {
            Some(&(_, dtype)) => Global::StorageClass(dtype),
            None => return Err(format!("unsupported storage type torch.{name}").into()),
        },
        _ => return Err(Fault::Forbidden(format!("{module}.{name}"))),
    })
}

fn dict_set(d: &Items, k: Value, v: Value) {
    let mut d = d.0.borrow_mut();
    // As in Python, a repeated key overwrites the value but keeps its first position.
    let same = |a: &Value| match (a, &k) {
        (Value::Str(a), Value::Str(b)) => a == b,
        (Value::Int(a), Value::Int(b)) => a == b,
        _ => false,
    };
    let slot = d.chunks_exact_mut(2).find_map(|kv| match kv {
        [a, slot] if same(a) => Some(slot),
        _ => None,
    });
    match slot {
        Some(slot) => *slot = v,
        None => d.extend([k, v]),
    }
}

fn call(f: Value, args: Value) -> Result<Value, Fault> {
    let (Value::Global(g), Value::Tuple(args)) = (&f, &args) else {
        return Err(format!("REDUCE of a {} with a {}", f.kind(), args.kind()).into());
    };
    let args = args.0.borrow();
    let index = |v: &Value| match v {
        Value::Int(i) => usize::try_from(*i).ok(),
        _ => None,
    };
    let indices = |v: &Value| match v {
        Value::Tuple(t) => t.0.borrow().iter().map(index).collect::<Option<Vec<_>>>(),
        _ => None,
    };
    match (g, &args[..]) {
        (Global::OrderedDict, []) => Ok(Value::Dict(Rc::default())),
        (Global::RebuildParameter, [t @ Value::Tensor(_), _, _, rest @ ..]) if rest.len() <= 1 => {
            Ok(t.clone())
        }
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        (Global::RebuildTensorV2, [Value::Storage(s), off, size, stride, _, _, rest @ ..])
            if rest.len() <= 1 =>
        {
            let bad = |what| format!("_rebuild_tensor_v2: {what} is not made of non-negative ints");
            let offset = index(off).ok_or_else(|| bad("storage_offset"))?;
            let shape = indices(size).ok_or_else(|| bad("size"))?;
            let stride = indices(stride).ok_or_else(|| bad("stride"))?;
            if shape.len() != stride.len() {
                return Err(format!("size {shape:?} and stride {stride:?} differ in rank").into());
            }
            Ok(Value::Tensor(Rc::new(TensorView { storage: s.clone(), offset, shape, stride })))
        }
        _ => {
            let kinds: Vec<_> = args.iter().map(Value::kind).collect();
            Err(format!("unexpected arguments for {g:?}: ({})", kinds.join(", ")).into())
        }
    }
}

/// torch.save writes each storage as ('storage', storage_class, key, location, numel).
fn persistent_load(pid: Value) -> Result<Value, Fault> {
    use Value as V;
    if let V::Tuple(t) = &pid {
        if let [V::Str(tag), V::Global(Global::StorageClass(dtype)), V::Str(key), _, V::Int(n)] =
            &t.0.borrow()[..]
        {
            if &**tag == "storage" {
                let numel = u64::try_from(*n).map_err(|_| "negative storage size")?;
                let storage = Storage { dtype: *dtype, key: key.clone(), numel };
                return Ok(V::Storage(Rc::new(storage)));
            }
        }
    }
    Err("persistent id is not ('storage', <torch storage class>, key, location, numel)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_bin").join(name)
    }

    fn read_mem(bytes: Vec<u8>) -> Result<Vec<(String, RawTensor)>, TorchBinError> {
        read_from(Cursor::new(bytes), Path::new("mem.bin"))
    }

    // ---- decoding, for comparison with the values torch itself printed ----

    fn f16_to_f32(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let (exp, frac) = (i32::from((h >> 10) & 0x1f), f32::from(h & 0x3ff));
        sign * match exp {
            0 => frac * 2f32.powi(-24),
            31 if frac == 0.0 => f32::INFINITY,
            31 => f32::NAN,
            _ => (1.0 + frac / 1024.0) * 2f32.powi(exp - 15),
        }
    }

    #[derive(Debug, PartialEq)]
    enum Values {
        F(Vec<u32>), // f32 bit patterns, so that the comparison is exact (and -0.0 != 0.0)
        I(Vec<i64>),
    }

    fn decode(t: &RawTensor) -> Values {
        let es = t.dtype.size_in_bytes();
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>() * es, "data length");
        let c = t.data.chunks_exact(es);
        let u16s = || c.clone().map(|b| u16::from_le_bytes([b[0], b[1]]));
        match t.dtype {
            DType::F32 => Values::F(c.map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()),
            DType::F16 => Values::F(u16s().map(|h| f16_to_f32(h).to_bits()).collect()),
            DType::BF16 => Values::F(u16s().map(|h| u32::from(h) << 16).collect()),
            DType::F64 => {
                let f = |b: &[u8]| f64::from_le_bytes(b.try_into().unwrap()) as f32;
                Values::F(c.map(|b| f(b).to_bits()).collect())
            }
            DType::I64 => Values::I(c.map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()),
            DType::I32 => Values::I(c.map(|b| i32::from_le_bytes(b.try_into().unwrap()).into()).collect()),
            DType::I16 => Values::I(u16s().map(|h| (h as i16).into()).collect()),
            DType::I8 => Values::I(c.map(|b| (b[0] as i8).into()).collect()),
            DType::U8 | DType::Bool => Values::I(c.map(|b| b[0].into()).collect()),
        }
    }

    fn expected_values(dtype: &str, json: &serde_json::Value) -> Values {
        let items = json.as_array().unwrap();
        match dtype {
            // The JSON floats are exact f32 values, so rounding back to f32 is lossless.
            "F32" | "F16" | "BF16" | "F64" => {
                Values::F(items.iter().map(|v| (v.as_f64().unwrap() as f32).to_bits()).collect())
            }
            _ => Values::I(items.iter().map(|v| v.as_i64().unwrap()).collect()),
        }
    }

    fn keys(tensors: &[(String, RawTensor)]) -> Vec<&str> {
        tensors.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn fixtures_match_values_written_by_torch() {
        let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
        let files = expected.as_object().unwrap();
        assert!(files.len() >= 6, "expected.json lists {} fixtures", files.len());
        for (file, tensors) in files {
            let got = read_torch_bin(&fixture(file)).unwrap_or_else(|e| panic!("{e}"));
            let want = tensors.as_array().unwrap();
            let want_keys: Vec<&str> = want.iter().map(|t| t["key"].as_str().unwrap()).collect();
            assert_eq!(keys(&got), want_keys, "{file}: keys in file order");
            for ((key, t), w) in got.iter().zip(want) {
                let dtype = w["dtype"].as_str().unwrap();
                assert_eq!(format!("{:?}", t.dtype), dtype, "{file} {key}: dtype");
                let shape: Vec<usize> =
                    w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                assert_eq!(t.shape, shape, "{file} {key}: shape");
                assert_eq!(decode(t), expected_values(dtype, &w["values"]), "{file} {key}: values");
            }
        }
    }

    #[test]
    fn transposed_view_is_made_contiguous() {
        let got = read_torch_bin(&fixture("transposed.bin")).unwrap();
        let [(key, t)] = &got[..] else { panic!("one tensor expected") };
        assert_eq!((key.as_str(), t.shape.as_slice()), ("t", &[4, 3][..]));
        let want = [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.].map(|x: f32| x.to_bits());
        assert_eq!(decode(t), Values::F(want.to_vec()));
    }

    #[test]
    fn views_of_one_storage_honour_offset_and_stride() {
        let got = read_torch_bin(&fixture("shared.bin")).unwrap();
        assert_eq!(keys(&got), ["full", "tail", "col", "mat", "tied"]);
        let v: Vec<Values> = got.iter().map(|(_, t)| decode(t)).collect();
        let Values::F(full) = &v[0] else { panic!() };
        assert_eq!(v[1], Values::F(full[3..].to_vec()), "tail = full[3:] (storage_offset 3)");
        assert_eq!(v[4], v[0], "tied weight");
        let h = |x: f32| x.to_bits();
        assert_eq!(v[2], Values::F(vec![h(7.), h(12.), h(17.)]), "m[1:, 2]");
    }

    #[test]
    fn module_state_dict_with_metadata_and_nested_dicts() {
        let m = read_torch_bin(&fixture("module.bin")).unwrap();
        assert_eq!(keys(&m), ["0.weight", "0.bias", "1.weight", "1.bias"]);
        let n = read_torch_bin(&fixture("nested.bin")).unwrap();
        assert_eq!(keys(&n), ["encoder.layer.w", "encoder.norm", "param", "head.bias"]);
        let p4 = read_torch_bin(&fixture("protocol4.bin")).unwrap();
        assert_eq!(keys(&p4), ["full", "tail", "col", "mat", "tied"]);
    }

    #[test]
    fn malicious_globals_are_refused_not_run() {
        for (file, global) in
            [("malicious_global.bin", "os.system"), ("malicious_stack_global.bin", "builtins.eval")]
        {
            let path = fixture(file);
            let err = read_torch_bin(&path).unwrap_err();
            assert!(matches!(err, TorchBinError::ForbiddenGlobal { .. }), "{err:?}");
            let msg = err.to_string();
            let want = format!("refusing to load {global} from {}: not a tensor state dict", path.display());
            assert!(msg.starts_with(&want), "{msg}");
        }
    }

    #[test]
    fn broken_files_give_errors_naming_the_file() {
        let cases = [
            ("truncated.bin", "corrupt or truncated zip archive"),
            ("truncated_pickle.bin", "dtypes/data.pkl at byte"),
            ("out_of_bounds.bin", "tensor w: view (offset 2, size [3], stride [1]) reaches element 4"),
            ("big_endian.bin", "byte order \"big\" is not supported"),
            ("legacy.bin", "legacy pre-1.6 torch.save format; re-save with torch>=1.6 or use safetensors"),
            ("does_not_exist.bin", "cannot read"),
        ];
        for (file, want) in cases {
            let path = fixture(file);
            let msg = read_torch_bin(&path).unwrap_err().to_string();
            assert!(msg.contains(&*path.to_string_lossy()), "{file}: {msg}");
            assert!(msg.contains(want), "{file}: {msg}");
        }
    }

    // ---- hand-assembled archives for what torch itself would never write ----

    fn s(x: &str) -> Vec<u8> {
        [&b"X"[..], &(x.len() as u32).to_le_bytes(), x.as_bytes()].concat()
    }

    /// A tuple of ints: BININT1 where it fits, else an 8-byte LONG1.
    fn ints(xs: &[u64]) -> Vec<u8> {
        let mut v = vec![b'('];
        for &x in xs {
            match u8::try_from(x) {
                Ok(b) => v.extend([b'K', b]),
                Err(_) => v.extend([&[0x8a, 8][..], &x.to_le_bytes()].concat()),
            }
        }
        v.push(b't');
        v
    }

    /// `_rebuild_tensor_v2(('storage', torch.<class>, key, 'cpu', numel), offset, size, stride,
    /// False, {})`
    fn tensor(class: &str, key: &str, numel: u8, offset: u8, size: &[u64], stride: &[u64]) -> Vec<u8> {
        let mut v = b"ctorch._utils\n_rebuild_tensor_v2\n((".to_vec();
        v.extend([s("storage"), format!("ctorch\n{class}\n").into_bytes(), s(key), s("cpu")].concat());
        v.extend([b'K', numel, b't', b'Q', b'K', offset]);
        v.extend([ints(size), ints(stride), b"\x89}tR".to_vec()].concat());
        v
    }

    fn state_dict(items: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut v = b"\x80\x02}(".to_vec();
        items.iter().for_each(|(k, t)| v.extend([s(k), t.clone()].concat()));
        v.extend(b"u.");
        v
    }

    type Storages<'a> = Vec<(&'a str, Vec<u8>)>;

    fn archive(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        w.start_file("arch/data.pkl", opts).unwrap();
        w.write_all(pkl).unwrap();
        for (key, data) in storages {
            w.start_file(format!("arch/data/{key}"), opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn f32s(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    fn err(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> String {
        read_mem(archive(pkl, storages)).unwrap_err().to_string()
    }

    #[test]
    fn strided_views_and_other_dtypes() {
        let pkl = state_dict(&[
            ("a", tensor("FloatStorage", "0", 12, 1, &[2, 2], &[1, 3])),
            ("b", tensor("FloatStorage", "0", 12, 12, &[0, 5], &[5, 1])),
            ("c", tensor("FloatStorage", "0", 12, 0, &[1, 3], &[7, 2])),
            ("d", tensor("DoubleStorage", "1", 2, 0, &[2], &[1])),
            ("e", tensor("ShortStorage", "2", 2, 1, &[], &[])),
            ("f", tensor("FloatStorage", "0", 12, 0, &[1, 3], &[i64::MAX as u64, 2])),
        ]);
        let doubles = [0.5f64, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let shorts = [-7i16, 300].iter().flat_map(|x| x.to_le_bytes()).collect();
        let got = read_mem(archive(&pkl, &[("0", f32s(12)), ("1", doubles), ("2", shorts)])).unwrap();
        let h = |xs: &[f32]| Values::F(xs.iter().map(|x| x.to_bits()).collect());
        assert_eq!(decode(&got[0].1), h(&[1., 4., 2., 5.]));
        assert_eq!((got[1].1.shape.as_slice(), got[1].1.data.len()), (&[0, 5][..], 0));
        assert_eq!(decode(&got[2].1), h(&[0., 2., 4.]));
        assert_eq!((got[3].1.dtype, decode(&got[3].1)), (DType::F64, h(&[0.5, -2.0])));
        assert_eq!((got[4].1.dtype, decode(&got[4].1)), (DType::I16, Values::I(vec![300])));
        assert_eq!(got[4].1.shape, Vec::<usize>::new());
        assert_eq!(decode(&got[5].1), h(&[0., 2., 4.]), "huge stride on a size-1 dim");
    }

    #[test]
    fn memoized_dicts_are_shared_objects() {
        // {'x': d, 'y': d} where d is memoized while still empty and filled afterwards.
        let mut pkl = b"\x80\x02}(".to_vec();
        pkl.extend(
            [s("x"), b"}q\x07".to_vec(), s("w"), tensor("FloatStorage", "0", 2, 0, &[2], &[1])].concat(),
        );
        pkl.extend([b"s".to_vec(), s("y"), b"h\x07u.".to_vec()].concat());
        let got = read_mem(archive(&pkl, &[("0", f32s(2))])).unwrap();
        assert_eq!(keys(&got), ["x.w", "y.w"]);
    }

    #[test]
    fn hostile_or_unsupported_pickles_are_rejected() {
        let t = |class, numel, offset, size: &[u64], stride: &[u64]| {
            state_dict(&[("w", tensor(class, "0", numel, offset, size, stride))])
        };
        let cases: Vec<(Vec<u8>, Storages, &str)> = vec![
            (
                b"\x80\x02}X\x01\x00\x00\x00aI1\ns.".to_vec(),
                vec![],
                "mem.bin: arch/data.pkl at byte 9, opcode INT (0x49): unsupported opcode",
            ),
            (b"\x80\x02].".to_vec(), vec![], "mem.bin: top-level object is a list, not a dict of tensors"),
            (b"\x80\x02}K\x01K\x02s.".to_vec(), vec![], "dict key of type int"),
            (b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.".to_vec(), vec![], "dicts nested more than 64 deep"),
            (b"\x80\x02ctorch\nload\n.".to_vec(), vec![], "refusing to load torch.load from mem.bin"),
            (b"\x80\x06}.".to_vec(), vec![], "pickle protocol 6"),
            (b"\x80\x02}s.".to_vec(), vec![], "stack underflow"),
            (b"\x80\x02}h\x05.".to_vec(), vec![], "memo entry 5 was never stored"),
            (b"\x80\x02}X\xff\xff\xff\xff".to_vec(), vec![], "operand past end of data"),
            (
                b"\x80\x02}(X\x01\x00\x00\x00a".to_vec(),
                vec![],
                "at byte 10, opcode <end of data>: pickle ends without STOP",
            ),
            (b"\x80\x02}(X\x01\x00\x00\x00aK\x01Nu.".to_vec(), vec![], "odd number of items"),
            (
                t("ComplexFloatStorage", 4, 0, &[4], &[1]),
                vec![("0", f32s(8))],
                "unsupported storage type torch.ComplexFloatStorage",
            ),
            (t("FloatStorage", 4, 0, &[4], &[1]), vec![], "zip entry arch/data/0: missing from the archive"),
            (
                t("FloatStorage", 5, 0, &[4], &[1]),
                vec![("0", f32s(4))],
                "holds 16 bytes but its persistent id declares 20",
            ),
            (
                t("FloatStorage", 1, 0, &[4], &[0]),
                vec![("0", f32s(1))],
                "tensor w: overlapping view of 4 elements over 1",
            ),
            (
                t("FloatStorage", 4, 5, &[0], &[1]),
                vec![("0", f32s(4))],
                "view (offset 5, size [0], stride [1]) reaches element 5",
            ),
            (
                t("FloatStorage", 4, 0, &[2, 2], &[3, 1]),
                vec![("0", f32s(4))],
                "reaches element 4 but arch/data/0 holds only 4",
            ),
        ];
        for (pkl, storages, want) in cases {
            let msg = err(&pkl, &storages);
            assert!(msg.contains(want), "want {want:?} in: {msg}");
        }
    }

    #[test]
    fn deep_nesting_neither_overflows_the_stack_nor_recurses() {
        let n = 1_000_000;
        let tuples = [&b"\x80\x02)"[..], &vec![0x85; n], b"."].concat();
        let lists = [&b"\x80\x02"[..], &vec![b']'; n], &vec![b'a'; n - 1], b"."].concat();
        let key = b"X\x01\x00\x00\x00a}";
        let dicts = [&b"\x80\x02}"[..], &key.repeat(n / 8), &vec![b's'; n / 8], b"."].concat();
        for (pkl, want) in [
            (tuples, "top-level object is a tuple"),
            (lists, "top-level object is a list"),
            (dicts, "dicts nested more than 64 deep"),
        ] {
            let msg = err(&pkl, &[]);
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let raw = std::fs::read(fixture("shared.bin")).unwrap();
        for n in 0..raw.len() {
            assert!(read_mem(raw[..n].to_vec()).is_err(), "prefix of {n} bytes accepted");
        }
        let mut zip = ZipArchive::new(Cursor::new(raw)).unwrap();
        let pkl = read_entry(&mut zip, "shared/data.pkl", None, Path::new("x")).unwrap();
        for n in 0..pkl.len() {
            assert!(Unpickler::new(&pkl[..n]).run().is_err(), "pickle prefix {n} accepted");
        }
    }

    #[test]
    fn corrupted_pickle_bytes_never_panic() {
        let raw = std::fs::read(fixture("shared.bin")).unwrap();
        let mut zip = ZipArchive::new(Cursor::new(raw)).unwrap();
        let pkl = read_entry(&mut zip, "shared/data.pkl", None, Path::new("x")).unwrap();
        let storages: Vec<(String, Vec<u8>)> = ["0", "1"]
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    read_entry(&mut zip, &format!("shared/data/{k}"), None, Path::new("x")).unwrap(),
                )
            })
            .collect();
        let storages: Vec<(&str, Vec<u8>)> = storages.iter().map(|(k, d)| (k.as_str(), d.clone())).collect();
        let mut ok = 0;
        for i in 0..pkl.len() {
            for b in [0x00, 0x01, 0x7f, 0xff, b'K', b'(', b'h', 0x8a] {
                let mut bad = pkl.clone();
                bad[i] = b;
                ok += usize::from(read_mem(archive(&bad, &storages)).is_ok());
            }
        }
        assert!(ok > 0, "some corruptions (e.g. of float data) are harmless");
    }

    #[test]
    fn dtype_sizes() {
        use DType::*;
        let sizes = [F64, F32, F16, BF16, I64, I32, I16, I8, U8, Bool].map(DType::size_in_bytes);
        assert_eq!(sizes, [8, 4, 2, 2, 8, 4, 2, 1, 1, 1]);
    }
}
