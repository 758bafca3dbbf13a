//! Group commit for the store's step log.
//!
//! An fsync costs 0.2-0.3 ms on the disks we measured, more than a whole step of coordinator
//! work, so one flush per step would cap every run at a few thousand steps/s. Instead run actors
//! log steps as they happen and one flusher thread makes them durable in batches: each
//! `Store::sync` covers every step logged before it began. A run actor publishes a step only once
//! the flusher reports it durable, so clients never hear of a step a crash could lose.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use mezo_store::Store;
use tokio::sync::watch;

/// How far the log is durable: every entry with a sequence number at most `upto`, or the error
/// that stopped the flusher.
#[derive(Debug, Clone, Default)]
pub struct Durable {
    pub upto: u64,
    pub error: Option<String>,
}

/// The run actors' handle; dropping it stops the flusher thread.
pub struct Committer {
    shared: Arc<Shared>,
    durable: watch::Receiver<Durable>,
}

struct Shared {
    /// Sequence number of the last entry logged (entries are numbered from 1).
    logged: AtomicU64,
    wake: (Mutex<()>, Condvar),
    stop: AtomicBool,
}

impl Committer {
    /// Starts the flusher thread for `store`.
    pub fn start(store: Arc<Store>) -> Committer {
        let (tx, durable) = watch::channel(Durable::default());
        let shared = Arc::new(Shared {
            logged: AtomicU64::new(0),
            wake: (Mutex::new(()), Condvar::new()),
            stop: AtomicBool::new(false),
        });
        let c = shared.clone();
        std::thread::Builder::new()
            .name("mezo-commit".into())
            .spawn(move || {
                let mut done = 0u64;
                loop {
                    let target = {
                        let mut g = c.wake.0.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            if c.stop.load(Ordering::Acquire) {
                                return;
                            }
                            let target = c.logged.load(Ordering::Acquire);
                            if target > done {
                                break target;
                            }
                            g = c.wake.1.wait(g).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    match store.sync() {
                        Ok(()) => {
                            done = target;
                            tx.send_modify(|d| d.upto = target);
                        }
                        Err(e) => {
                            tx.send_modify(|d| d.error = Some(e.to_string()));
                            return;
                        }
                    }
                }
            })
            .expect("starting the commit thread");
        Committer { shared, durable }
    }

    /// Records that an entry was just logged; returns its sequence number.
    pub fn logged(&self) -> u64 {
        let s = &self.shared;
        let seq = s.logged.fetch_add(1, Ordering::AcqRel) + 1;
        let _g = s.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        s.wake.1.notify_one();
        seq
    }

    /// Follows the durable mark (a run actor publishes its steps as it moves).
    pub fn subscribe(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }

    /// Whether entry `seq` is durable (`Err` if flushing failed).
    pub fn is_durable(&self, seq: u64) -> Result<bool, String> {
        let d = self.durable.borrow();
        match &d.error {
            Some(e) => Err(e.clone()),
            None => Ok(d.upto >= seq),
        }
    }

    /// Waits until entry `seq` is durable.
    pub async fn wait(&self, seq: u64) -> Result<(), String> {
        let mut rx = self.durable.clone();
        let d = rx
            .wait_for(|d| d.upto >= seq || d.error.is_some())
            .await
            .map_err(|_| "the commit thread stopped".to_string())?;
        match &d.error {
            Some(e) => Err(format!("flushing the store: {e}")),
            None => Ok(()),
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::Release);
        let _g = s.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        s.wake.1.notify_all();
    }
}
