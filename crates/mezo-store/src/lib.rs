//! The coordinator's durable store (issue #4, item 5): run specs and status, the step log and
//! the snapshot index in one sled database at `DIR/db`, snapshot bytes in files under
//! `DIR/snapshots/<run_id>/`.
//!
//! What it guarantees:
//! - The step log is the source of truth. [`Store::append_step`] returns only after the record
//!   is flushed to disk, so no one is told about a step that a crash could lose. Steps are
//!   contiguous from 0; a retried append of the same record counts once; a different record for a
//!   logged step, or a gap, is refused.
//! - Step records are stored in an exact binary encoding (f64 as bits), so losses, projected
//!   gradients and learning rates come back bit-identical, NaN included; replay after a crash
//!   can therefore reproduce the uninterrupted run exactly.
//! - Snapshot files are written atomically (temp file in the same directory, write, fsync,
//!   rename, fsync the directory) and indexed with their SHA-256 and length.
//!   [`Store::latest_snapshot`] returns the newest one that verifies, falls back to older valid
//!   ones, and reports every corrupt or missing one it skipped.
//! - A corrupt or unreadable store is an error naming the path, never a panic, and a log record
//!   that fails to decode is a `DataLoss` error naming the run and step, never skipped silently.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("store database {}: {message}", path.display())]
    Db { path: PathBuf, message: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("invalid {what} {value:?}: expected {expected}")]
    InvalidArgument { what: String, value: String, expected: String },
    #[error("conflict: {message}")]
    Conflict { message: String },
    #[error("data loss: {message}")]
    DataLoss { message: String },
}

/// One applied (or skipped) optimiser step: everything needed to replay it.
///
/// The serde derives are for callers (APIs, exports); the store itself writes an exact binary
/// encoding because JSON cannot carry NaN and need not round-trip every f64 bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub seeds: Vec<u64>,
    pub grads: Vec<f64>,
    pub lr: f64,
    /// (loss at θ+εz, loss at θ-εz) per direction.
    pub losses: Vec<(f64, f64)>,
    pub skipped: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub run_id: String,
    pub step: u64,
    /// Absolute path of the snapshot file.
    pub file: PathBuf,
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the file's contents.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Stopped,
}

#[derive(Serialize, Deserialize)]
struct StatusEntry {
    status: RunStatus,
    message: String,
}

/// What the snapshot index holds: the file name only, so the data directory can move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub step: u64,
    pub file_name: String,
    pub bytes: u64,
    pub sha256: String,
}

impl IndexEntry {
    /// Decodes an index value stored under step `key_step`. The entry must name that step and
    /// that step's own file: a corrupt entry naming `../x` or another run's file must not make
    /// recovery read outside the run's snapshot folder.
    pub fn parse(key_step: u64, value: &[u8]) -> Result<Self, String> {
        let e: IndexEntry = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        if e.step != key_step {
            return Err(format!("entry names step {}, its key step {key_step}", e.step));
        }
        let expected = snapshot_file_name(key_step);
        if e.file_name != expected {
            return Err(format!("entry names file {:?}, expected {expected:?}", e.file_name));
        }
        Ok(e)
    }

    /// Whether `data` is the file this entry indexed: its length, then its SHA-256.
    pub fn check(&self, data: &[u8]) -> Result<(), String> {
        if data.len() as u64 != self.bytes {
            return Err(format!("length {} does not match the indexed {}", data.len(), self.bytes));
        }
        let sha = sha256_hex(data);
        if sha != self.sha256 {
            return Err(format!("SHA-256 {sha} does not match the indexed {}", self.sha256));
        }
        Ok(())
    }
}

pub struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    db: sled::Db,
    runs: sled::Tree,
    status: sled::Tree,
    steps: sled::Tree,
    /// Dev-set accuracy by step (`run_id 0x00 step` -> f64 bits): what a client charting a run
    /// needs beyond the step log, which holds only what replay needs.
    evals: sled::Tree,
    snapshots: sled::Tree,
    /// Serialises read-check-write sequences (append, snapshot index, prune) within this process;
    /// sled's file lock keeps other processes out.
    write_lock: Mutex<()>,
}

const MAX_RUN_ID: usize = 64;
const STEP_RECORD_VERSION: u8 = 1;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

fn validate_run_id(run_id: &str) -> Result<()> {
    let ok = !run_id.is_empty()
        && run_id.len() <= MAX_RUN_ID
        && run_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument {
            what: "run id".into(),
            value: run_id.into(),
            expected: format!("1 to {MAX_RUN_ID} characters from [A-Za-z0-9_-]"),
        })
    }
}

/// `run_id 0x00 step(big-endian)`: run ids never contain 0x00, so one run's keys form a
/// contiguous range, ordered by step.
fn step_key(run_id: &str, step: u64) -> Vec<u8> {
    let mut k = run_prefix(run_id);
    k.extend_from_slice(&step.to_be_bytes());
    k
}

fn run_prefix(run_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(run_id.len() + 9);
    k.extend_from_slice(run_id.as_bytes());
    k.push(0);
    k
}

fn step_of_key(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

impl StepRecord {
    /// The store's exact binary encoding (f64 as bits, so NaN and every bit round-trip).
    pub fn encode(&self) -> Vec<u8> {
        encode_step(self)
    }

    /// The inverse of [`StepRecord::encode`]; any other input is an error saying why. Exactly
    /// one encoding decodes to each record (no trailing bytes, flags 0 or 1).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        decode_step(bytes)
    }
}

fn encode_step(rec: &StepRecord) -> Vec<u8> {
    let mut b = Vec::with_capacity(
        1 + 8 + 12 + 8 * (rec.seeds.len() + rec.grads.len() + 2 * rec.losses.len()) + 8 + 1,
    );
    b.push(STEP_RECORD_VERSION);
    b.extend_from_slice(&rec.step.to_le_bytes());
    b.extend_from_slice(&(rec.seeds.len() as u32).to_le_bytes());
    rec.seeds.iter().for_each(|s| b.extend_from_slice(&s.to_le_bytes()));
    b.extend_from_slice(&(rec.grads.len() as u32).to_le_bytes());
    rec.grads.iter().for_each(|g| b.extend_from_slice(&g.to_bits().to_le_bytes()));
    b.extend_from_slice(&rec.lr.to_bits().to_le_bytes());
    b.extend_from_slice(&(rec.losses.len() as u32).to_le_bytes());
    for (p, m) in &rec.losses {
        b.extend_from_slice(&p.to_bits().to_le_bytes());
        b.extend_from_slice(&m.to_bits().to_le_bytes());
    }
    b.push(rec.skipped as u8);
    b
}

fn decode_step(bytes: &[u8]) -> Result<StepRecord, String> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
            if self.0.len() < N {
                return Err("record is truncated".into());
            }
            let (head, rest) = self.0.split_at(N);
            self.0 = rest;
            Ok(head.try_into().expect("split_at gave N bytes"))
        }
        fn u64(&mut self) -> Result<u64, String> {
            self.take::<8>().map(u64::from_le_bytes)
        }
        fn f64(&mut self) -> Result<f64, String> {
            self.u64().map(f64::from_bits)
        }
        fn len(&mut self) -> Result<usize, String> {
            let n = u32::from_le_bytes(self.take::<4>()?) as usize;
            // A corrupt length must not drive a huge allocation.
            if n > self.0.len() / 8 {
                return Err(format!("length {n} exceeds the record"));
            }
            Ok(n)
        }
    }
    let mut r = Reader(bytes);
    let [version] = r.take::<1>()?;
    if version != STEP_RECORD_VERSION {
        return Err(format!("unknown record version {version}"));
    }
    let step = r.u64()?;
    let n = r.len()?;
    let seeds = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
    let n = r.len()?;
    let grads = (0..n).map(|_| r.f64()).collect::<Result<_, _>>()?;
    let lr = r.f64()?;
    let n = r.len()?;
    let losses = (0..n).map(|_| Ok((r.f64()?, r.f64()?))).collect::<Result<_, String>>()?;
    let skipped = match r.take::<1>()? {
        [0] => false,
        [1] => true,
        [x] => return Err(format!("invalid skipped flag {x}")),
    };
    if !r.0.is_empty() {
        return Err(format!("{} trailing bytes", r.0.len()));
    }
    Ok(StepRecord { step, seeds, grads, lr, losses, skipped })
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn snapshot_file_name(step: u64) -> String {
    format!("step-{step:020}.snap")
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

impl Store {
    /// Opens (creating if absent) the store at `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir.join("snapshots")).map_err(io_err(dir))?;
        let dir = dir.canonicalize().map_err(io_err(dir))?;
        let db_path = dir.join("db");
        let db_err = |message: String| StoreError::Db { path: db_path.clone(), message };
        // Every write is flushed explicitly, so sled's background flusher adds nothing; without it
        // no thread outlives the Store and a dropped Store can be reopened at once.
        let config = sled::Config::new().path(&db_path).flush_every_ms(None);
        // sled may panic on some corrupt files instead of returning an error; a corrupt store
        // must be a clear error naming the path. Nothing outlives a panic here but the message
        // (the config is consumed), so asserting unwind safety is sound.
        let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()))
            .map_err(|p| {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                db_err(format!("cannot open (corrupt?): {what}"))
            })?
            .map_err(|e| db_err(format!("cannot open: {e}")))?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| db_err(format!("tree {name}: {e}")));
        Ok(Store {
            runs: tree("runs")?,
            status: tree("status")?,
            steps: tree("steps")?,
            evals: tree("evals")?,
            snapshots: tree("snapshots")?,
            db,
            db_path,
            dir,
            write_lock: Mutex::new(()),
        })
    }

    fn db_err(&self, e: sled::Error) -> StoreError {
        match e {
            sled::Error::Corruption { .. } => {
                StoreError::DataLoss { message: format!("store database {}: {e}", self.db_path.display()) }
            }
            e => StoreError::Db { path: self.db_path.clone(), message: e.to_string() },
        }
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(|e| self.db_err(e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is (), so a panic elsewhere cannot have left it inconsistent.
        self.write_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn require_run(&self, run_id: &str) -> Result<()> {
        validate_run_id(run_id)?;
        match self.runs.contains_key(run_id).map_err(|e| self.db_err(e))? {
            true => Ok(()),
            false => Err(StoreError::NotFound { what: format!("run {run_id:?}") }),
        }
    }

    fn run_snapshot_dir(&self, run_id: &str) -> PathBuf {
        self.dir.join("snapshots").join(run_id)
    }

    /// Records a new run with status `Pending`; refuses an existing id.
    pub fn create_run(&self, run_id: &str, spec_json: &str) -> Result<()> {
        validate_run_id(run_id)?;
        let status = serde_json::to_vec(&StatusEntry { status: RunStatus::Pending, message: String::new() })
            .expect("status entry serialises");
        let res = (&self.runs, &self.status).transaction(|(runs, st)| {
            if runs.get(run_id)?.is_some() {
                return sled::transaction::abort(());
            }
            runs.insert(run_id, spec_json.as_bytes())?;
            st.insert(run_id, status.as_slice())?;
            Ok(())
        });
        match res {
            Ok(()) => self.flush(),
            Err(sled::transaction::TransactionError::Abort(())) => {
                Err(StoreError::AlreadyExists { what: format!("run {run_id:?}") })
            }
            Err(sled::transaction::TransactionError::Storage(e)) => Err(self.db_err(e)),
        }
    }

    pub fn run_spec(&self, run_id: &str) -> Result<String> {
        validate_run_id(run_id)?;
        let v = self
            .runs
            .get(run_id)
            .map_err(|e| self.db_err(e))?
            .ok_or_else(|| StoreError::NotFound { what: format!("run {run_id:?}") })?;
        String::from_utf8(v.to_vec()).map_err(|_| StoreError::DataLoss {
            message: format!("run {run_id:?}: stored spec is not UTF-8"),
        })
    }

    pub fn set_status(&self, run_id: &str, s: RunStatus, message: &str) -> Result<()> {
        self.require_run(run_id)?;
        let v = serde_json::to_vec(&StatusEntry { status: s, message: message.into() })
            .expect("status entry serialises");
        self.status.insert(run_id, v).map_err(|e| self.db_err(e))?;
        self.flush()
    }

    pub fn status(&self, run_id: &str) -> Result<(RunStatus, String)> {
        validate_run_id(run_id)?;
        let v = self
            .status
            .get(run_id)
            .map_err(|e| self.db_err(e))?
            .ok_or_else(|| StoreError::NotFound { what: format!("run {run_id:?}") })?;
        let e: StatusEntry = serde_json::from_slice(&v).map_err(|e| StoreError::DataLoss {
            message: format!("run {run_id:?}: stored status does not decode: {e}"),
        })?;
        Ok((e.status, e.message))
    }

    /// Every run with its status, ordered by run id.
    pub fn list_runs(&self) -> Result<Vec<(String, RunStatus)>> {
        self.runs
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(|e| self.db_err(e))?;
                let id = String::from_utf8(k.to_vec()).map_err(|_| StoreError::DataLoss {
                    message: format!("run id {k:?} in the store is not UTF-8"),
                })?;
                let (s, _) = self.status(&id)?;
                Ok((id, s))
            })
            .collect()
    }

    /// Appends step t; durable (flushed to disk) when it returns, so nobody is told about a step
    /// that could be lost. Steps must be contiguous from 0: appending t when the log ends at t-1
    /// works; re-appending an identical record (bitwise, so NaN losses compare equal) for an
    /// existing step is a no-op, so a retried write counts once; a different record for an
    /// existing step, or a gap, is a `Conflict` naming the run and both step numbers.
    pub fn append_step(&self, run_id: &str, rec: &StepRecord) -> Result<()> {
        self.log_step(run_id, rec)?;
        self.sync()
    }

    /// [`Store::append_step`] without the flush: the step is readable at once (a worker's
    /// `FetchLog` sees it) but durable only after the next [`Store::sync`]. The coordinator
    /// overlaps that flush with the next step's forwards and tells no client about the step
    /// before it returns.
    pub fn log_step(&self, run_id: &str, rec: &StepRecord) -> Result<()> {
        self.require_run(run_id)?;
        let _guard = self.lock();
        let next = self.next_step(run_id)?;
        let encoded = encode_step(rec);
        let t = rec.step;
        if t < next {
            let existing = self.steps.get(step_key(run_id, t)).map_err(|e| self.db_err(e))?;
            return match existing {
                Some(v) if v.as_ref() == encoded.as_slice() => Ok(()),
                _ => Err(StoreError::Conflict {
                    message: format!(
                        "run {run_id:?}: step {t} is already logged with a different record \
                         (the log ends at step {})",
                        next - 1
                    ),
                }),
            };
        }
        if t > next {
            let ends = match next {
                0 => "the log is empty".to_string(),
                n => format!("the log ends at step {}", n - 1),
            };
            return Err(StoreError::Conflict {
                message: format!(
                    "run {run_id:?}: cannot append step {t}: {ends}, so the next step must be {next}"
                ),
            });
        }
        self.steps.insert(step_key(run_id, t), encoded).map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Makes every step logged so far durable (one fsync of the log).
    pub fn sync(&self) -> Result<()> {
        self.flush()
    }

    /// The step the log expects next: 0 for an empty log.
    pub fn next_step(&self, run_id: &str) -> Result<u64> {
        self.require_run(run_id)?;
        match self.steps.scan_prefix(run_prefix(run_id)).keys().next_back() {
            None => Ok(0),
            Some(k) => {
                let k = k.map_err(|e| self.db_err(e))?;
                let t = step_of_key(&k).ok_or_else(|| StoreError::DataLoss {
                    message: format!("run {run_id:?}: malformed step key {k:?}"),
                })?;
                Ok(t + 1)
            }
        }
    }

    /// The logged steps from `from` on, in order.
    pub fn steps(&self, run_id: &str, from: u64) -> Result<Vec<StepRecord>> {
        self.require_run(run_id)?;
        let end = {
            let mut e = run_prefix(run_id);
            *e.last_mut().expect("prefix ends with 0x00") = 1;
            e
        };
        let mut out = Vec::new();
        for (expect, kv) in (from..).zip(self.steps.range(step_key(run_id, from)..end)) {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let t = step_of_key(&k).unwrap_or(u64::MAX);
            let rec = decode_step(&v).map_err(|why| StoreError::DataLoss {
                message: format!("run {run_id:?}: step {t} in the log does not decode: {why}"),
            })?;
            if rec.step != t || t != expect {
                return Err(StoreError::DataLoss {
                    message: format!(
                        "run {run_id:?}: log entry at key step {t} holds step {} where step \
                         {expect} was expected",
                        rec.step
                    ),
                });
            }
            out.push(rec);
        }
        Ok(out)
    }

    /// Records the dev-set accuracy measured after step `step` was applied; flushed when it
    /// returns. A later value for the same step (a re-evaluation after a restart) replaces it.
    pub fn append_eval(&self, run_id: &str, step: u64, accuracy: f64) -> Result<()> {
        self.require_run(run_id)?;
        if !(0.0..=1.0).contains(&accuracy) {
            return Err(StoreError::InvalidArgument {
                what: "dev accuracy".into(),
                value: accuracy.to_string(),
                expected: "a ratio from 0 to 1".into(),
            });
        }
        self.evals
            .insert(step_key(run_id, step), &accuracy.to_bits().to_le_bytes())
            .map_err(|e| self.db_err(e))?;
        self.flush()
    }

    /// Every recorded dev accuracy of a run as `(step, accuracy)`, in step order.
    pub fn evals(&self, run_id: &str) -> Result<Vec<(u64, f64)>> {
        self.require_run(run_id)?;
        let mut out = Vec::new();
        for kv in self.evals.scan_prefix(run_prefix(run_id)) {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let (Some(step), Ok(bits)) = (step_of_key(&k), <[u8; 8]>::try_from(v.as_ref())) else {
                return Err(StoreError::DataLoss {
                    message: format!(
                        "run {run_id:?}: a dev-accuracy record ({} bytes) does not decode",
                        v.len()
                    ),
                });
            };
            out.push((step, f64::from_bits(u64::from_le_bytes(bits))));
        }
        Ok(out)
    }

    /// Writes a snapshot file atomically (temp file in the same dir, write, fsync, rename, fsync
    /// the dir) and indexes it with its SHA-256 and length. A snapshot for the same step replaces
    /// the earlier one.
    pub fn write_snapshot(&self, run_id: &str, step: u64, data: &[u8]) -> Result<SnapshotMeta> {
        self.require_run(run_id)?;
        // The file (written, synced, renamed into place) is this step's alone: only the index
        // entry takes the store's lock, so a slow disk does not hold up `log_step` (the
        // coordinator writes snapshots beside a running step).
        let dir = self.run_snapshot_dir(run_id);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let file_name = snapshot_file_name(step);
        let path = dir.join(&file_name);
        let tmp = dir.join(format!(".{file_name}.tmp"));
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io_err(&tmp))?;
        f.write_all(data).and_then(|_| f.sync_all()).map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&dir)?;

        let sha256 = sha256_hex(data);
        let entry = IndexEntry { step, file_name, bytes: data.len() as u64, sha256: sha256.clone() };
        let v = serde_json::to_vec(&entry).expect("index entry serialises");
        {
            let _guard = self.lock();
            self.snapshots.insert(step_key(run_id, step), v).map_err(|e| self.db_err(e))?;
        }
        self.flush()?;
        Ok(SnapshotMeta { run_id: run_id.into(), step, file: path, bytes: data.len() as u64, sha256 })
    }

    /// Index entries newest first: (key, decoded entry or a reason it does not decode).
    fn index_newest_first(&self, run_id: &str) -> Result<Vec<(sled::IVec, Result<IndexEntry, String>)>> {
        self.snapshots
            .scan_prefix(run_prefix(run_id))
            .rev()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.db_err(e))?;
                let entry = match step_of_key(&k) {
                    Some(t) => IndexEntry::parse(t, &v),
                    None => Err(format!("index key of {} bytes names no step", k.len())),
                };
                Ok((k, entry))
            })
            .collect()
    }

    /// Reads and verifies one indexed snapshot: its bytes, or why it is unusable.
    fn verify(&self, run_id: &str, e: &IndexEntry) -> Result<(SnapshotMeta, Vec<u8>), String> {
        let path = self.run_snapshot_dir(run_id).join(&e.file_name);
        let shown = path.display();
        let mut data = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|err| format!("snapshot {shown} (step {}): unreadable: {err}", e.step))?;
        e.check(&data).map_err(|why| format!("snapshot {shown} (step {}): {why}", e.step))?;
        let meta = SnapshotMeta {
            run_id: run_id.into(),
            step: e.step,
            file: path,
            bytes: e.bytes,
            sha256: e.sha256.clone(),
        };
        Ok((meta, data))
    }

    /// The newest snapshot whose file exists and matches its checksum and length, with its
    /// bytes; older valid ones are the fallback; every corrupt or missing one skipped is reported
    /// in the returned warnings (file + reason) so the caller can log and count it; `None` if no
    /// valid snapshot.
    #[allow(clippy::type_complexity)]
    pub fn latest_snapshot(&self, run_id: &str) -> Result<(Option<(SnapshotMeta, Vec<u8>)>, Vec<String>)> {
        self.require_run(run_id)?;
        let mut warnings = Vec::new();
        for (k, entry) in self.index_newest_first(run_id)? {
            let entry = match entry {
                Ok(e) => e,
                Err(why) => {
                    let t = step_of_key(&k).unwrap_or(u64::MAX);
                    warnings.push(format!(
                        "run {run_id:?}: snapshot index entry for step {t} in {} does not \
                         decode: {why}",
                        self.db_path.display()
                    ));
                    continue;
                }
            };
            match self.verify(run_id, &entry) {
                Ok(found) => return Ok((Some(found), warnings)),
                Err(why) => warnings.push(why),
            }
        }
        Ok((None, warnings))
    }

    /// Deletes snapshot files and index entries older than the newest `keep` valid ones (corrupt
    /// ones among those older go too), and temp files left by interrupted writes. With fewer than
    /// `keep` valid snapshots nothing is deleted. Not while a [`Store::write_snapshot`] of the
    /// same run is under way (its temp file would count as left over): the coordinator writes
    /// and prunes a run's snapshots one after the other on one thread.
    pub fn prune_snapshots(&self, run_id: &str, keep: usize) -> Result<()> {
        self.require_run(run_id)?;
        if keep == 0 {
            return Err(StoreError::InvalidArgument {
                what: "snapshots to keep".into(),
                value: "0".into(),
                expected: "at least 1 (recovery needs a snapshot)".into(),
            });
        }
        // Which snapshots to keep is decided without the store's lock (verifying reads and hashes
        // every kept file); a snapshot indexed meanwhile is newer than all of them and stays.
        let dir = self.run_snapshot_dir(run_id);
        let index = self.index_newest_first(run_id)?;
        let mut valid = 0;
        let mut cut = None;
        for (i, (_, entry)) in index.iter().enumerate() {
            if let Ok(e) = entry {
                if self.verify(run_id, e).is_ok() {
                    valid += 1;
                    if valid == keep {
                        cut = Some(i + 1);
                        break;
                    }
                }
            }
        }
        if let Some(cut) = cut {
            let _guard = self.lock();
            for (k, entry) in &index[cut..] {
                // Index first, then the file: a crash in between leaves an orphan file, never an
                // index entry pointing at nothing.
                self.snapshots.remove(k).map_err(|e| self.db_err(e))?;
                self.flush()?;
                if let Ok(e) = entry {
                    let path = dir.join(&e.file_name);
                    match fs::remove_file(&path) {
                        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                            return Err(StoreError::Io { path, source: err })
                        }
                        _ => {}
                    }
                }
            }
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            for ent in rd.flatten() {
                let name = ent.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    fs::remove_file(ent.path()).map_err(io_err(&ent.path()))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
