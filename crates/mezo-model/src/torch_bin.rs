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
pub enum DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, Bool }

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
    let file =
        File::open(path).map_err(|source| TorchBinError::Io { path: path.into(), source })?;
    read_from(BufReader::new(file), path)
}

/// `path` only labels errors, so that tests can feed in-memory archives.
fn read_from<R: Read + Seek>(
    mut reader: R,
    path: &Path,
) -> Result<Vec<(String, RawTensor)>, TorchBinError> {
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
            idx[d] += 1;
            src += stride[d];
            if idx[d] < shape[d] {
                break;
            }
            src -= stride[d] * shape[d];
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
    for (k, v) in d.borrow().iter() {
        let Value::Str(k) = k else {
            return Err(format!("a {} dict key under {prefix:?}; expected str keys", k.kind()));
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

type Dict = Rc<RefCell<Vec<(Value, Value)>>>;

/// Containers are shared because pickle memoizes an object before filling it; every variant is
/// cheap to clone so that repeated BINGETs cannot blow up memory.
#[derive(Clone)]
enum Value {
    /// None, bools and floats: only ever ignored arguments, so just their type name is kept.
    Other(&'static str),
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Dict),
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
        let s = self.take(n + 1)?;
        std::str::from_utf8(&s[..n]).map_err(|_| "GLOBAL name is not UTF-8".into())
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
            b')' => Value::Tuple(Rc::new([])),
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
            b't' => Value::Tuple(self.pop_mark()?.into()),
            0x85..=0x87 => {
                let mut items = Vec::new();
                for _ in 0x84..op {
                    items.push(self.pop()?);
                }
                items.reverse();
                Value::Tuple(items.into())
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
                let items = match op {
                    b's' => vec![self.pop()?, self.pop()?].into_iter().rev().collect(),
                    _ => self.pop_mark()?,
                };
                let Value::Dict(d) = self.top()? else {
                    return Err(format!("SETITEM(S) on a {}", self.top()?.kind()).into());
                };
                let mut items = items.into_iter();
                while let Some(k) = items.next() {
                    let v = items.next().ok_or("SETITEMS with an odd number of items")?;
                    dict_set(d, k, v);
                }
                return Ok(None);
            }
            b'a' | b'e' => {
                let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                let Value::List(l) = self.top()? else {
                    return Err(format!("APPEND(S) on a {}", self.top()?.kind()).into());
                };
                l.borrow_mut().extend(items);
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
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Global::RebuildParameter
        }
        ("torch", _) if name.ends_with("Storage") => {
            match STORAGE_CLASSES.iter().find(|(n, _)| *n == name) {
                Some(&(_, dtype)) => Global::StorageClass(dtype),
                None => return Err(format!("unsupported storage type torch.{name}").into()),
            }
        }
        _ => return Err(Fault::Forbidden(format!("{module}.{name}"))),
    })
}

fn dict_set(d: &Dict, k: Value, v: Value) {
    let mut d = d.borrow_mut();
    // As in Python, a repeated key overwrites the value but keeps its first position.
    let same = |a: &Value| match (a, &k) {
        (Value::Str(a), Value::Str(b)) => a == b,
        (Value::Int(a), Value::Int(b)) => a == b,
        _ => false,
    };
    match d.iter_mut().find(|(a, _)| same(a)) {
        Some(slot) => slot.1 = v,
        None => d.push((k, v)),
    }
}

fn call(f: Value, args: Value) -> Result<Value, Fault> {
    let (Value::Global(g), Value::Tuple(args)) = (&f, &args) else {
        return Err(format!("REDUCE of a {} with a {}", f.kind(), args.kind()).into());
    };
    let index = |v: &Value| match v {
        Value::Int(i) => usize::try_from(*i).ok(),
        _ => None,
    };
    let indices = |v: &Value| match v {
        Value::Tuple(t) => t.iter().map(index).collect::<Option<Vec<_>>>(),
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
    if let Value::Tuple(t) = &pid {
        if let [Value::Str(tag), Value::Global(Global::StorageClass(dtype)), Value::Str(key), _, Value::Int(n)] =
            &t[..]
        {
            if &**tag == "storage" {
                let numel = u64::try_from(*n).map_err(|_| "negative storage size")?;
                let storage = Storage { dtype: *dtype, key: key.clone(), numel };
                return Ok(Value::Storage(Rc::new(storage)));
            }
        }
    }
    Err("persistent id is not ('storage', <torch storage class>, key, location, numel)".into())
}
