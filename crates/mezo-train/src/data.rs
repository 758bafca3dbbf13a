//! The MeZO data protocol: a seeded sample of `n_train` training and `n_dev` development examples
//! from the training file, the validation file as test set; per-epoch shuffles by seed and
//! length-aware batches.

use std::path::Path;

use mezo_core::HostRng;
use mezo_data::{Task, TaskExample};

use crate::error::{Result, TrainError};

pub struct Splits {
    pub train: Vec<TaskExample>,
    pub dev: Vec<TaskExample>,
    pub test: Vec<TaskExample>,
}

/// Samples train and dev without overlap from `train_file` (seeded), test = `test_file`. With
/// `min_words > 0`, only training-file examples of at least that many words are sampled (SST-2's
/// training file is mostly short phrases, its validation file whole sentences).
pub fn mezo_splits(
    task: &Task,
    train_file: &Path,
    test_file: &Path,
    n_train: usize,
    n_dev: usize,
    seed: u64,
    min_words: usize,
) -> Result<Splits> {
    let mut pool = task.load(train_file)?;
    if min_words > 0 {
        pool.retain(|e| e.words >= min_words);
    }
    if pool.len() < n_train + n_dev {
        return Err(TrainError::Config(format!(
            "{}: {} examples (of at least {min_words} words), but the protocol samples {n_train} train + {n_dev} dev",
            train_file.display(),
            pool.len()
        )));
    }
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    HostRng::new(seed ^ 0x5EED_DA7A).shuffle(&mut idx);
    let pick = |r: &[usize]| r.iter().map(|&i| pool[i].clone()).collect::<Vec<_>>();
    let train = pick(&idx[..n_train]);
    let dev = pick(&idx[n_train..n_train + n_dev]);
    let test = task.load(test_file)?;
    Ok(Splits { train, dev, test })
}

/// Draws batches of example indices: each epoch a fresh seeded shuffle; within windows of
/// `WINDOW` batches, examples are sorted by length so each batch carries little padding, and the
/// window's batches are then shuffled so lengths do not trend through the epoch. A remainder
/// smaller than a batch is dropped (every step sees exactly `batch` examples).
pub struct Batcher {
    lengths: Vec<usize>,
    batch: usize,
    seed: u64,
    epoch: u64,
    queue: Vec<Vec<usize>>,
}

const WINDOW: usize = 8;

impl Batcher {
    pub fn new(lengths: Vec<usize>, batch: usize, seed: u64) -> Result<Self> {
        if batch == 0 || batch > lengths.len() {
            return Err(TrainError::Config(format!(
                "batch size {batch} must be between 1 and the number of training examples ({})",
                lengths.len()
            )));
        }
        Ok(Batcher { lengths, batch, seed, epoch: 0, queue: Vec::new() })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn refill(&mut self) {
        let mut rng = HostRng::new(mezo_core::splitmix64(self.seed ^ 0xBA7C_4E55) ^ self.epoch);
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        rng.shuffle(&mut order);
        let usable = order.len() / self.batch * self.batch;
        order.truncate(usable);
        let mut batches = Vec::new();
        for window in order.chunks_mut(self.batch * WINDOW) {
            window.sort_by_key(|&i| self.lengths[i]);
            let mut w: Vec<Vec<usize>> = window.chunks(self.batch).map(|c| c.to_vec()).collect();
            rng.shuffle(&mut w);
            batches.extend(w);
        }
        batches.reverse(); // popped from the back
        self.queue = batches;
        self.epoch += 1;
    }

    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.queue.is_empty() {
            self.refill();
        }
        self.queue.pop().expect("refill yields at least one batch")
    }

    /// The batch [`Self::next_batch`] returns next, without taking it (starting the next epoch's
    /// shuffle if this one is used up, as `next_batch` would).
    pub fn peek(&mut self) -> &[usize] {
        if self.queue.is_empty() {
            self.refill();
        }
        self.queue.last().expect("refill yields at least one batch")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_an_epoch_and_are_deterministic() {
        let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 23).collect();
        let mut a = Batcher::new(lengths.clone(), 16, 7).unwrap();
        let mut b = Batcher::new(lengths.clone(), 16, 7).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..6 {
            let x = a.next_batch();
            assert_eq!(x, b.next_batch());
            assert_eq!(x.len(), 16);
            seen.extend(x);
        }
        assert_eq!(seen.len(), 96, "one epoch visits every example of the used part once");
        assert_eq!(a.epoch(), 1);
        let next = a.next_batch();
        assert_eq!(a.epoch(), 2);
        let mut c = Batcher::new(lengths, 16, 8).unwrap();
        assert_ne!(
            c.next_batch(),
            Batcher::new((0..100).map(|i| (i * 37) % 23).collect(), 16, 7).unwrap().next_batch()
        );
        assert_eq!(next.len(), 16);
        // Peeking shows the next batch without taking it, across an epoch's end too.
        for _ in 0..8 {
            let peeked = a.peek().to_vec();
            assert_eq!(peeked, a.next_batch());
        }
    }

    #[test]
    fn batches_group_similar_lengths() {
        let lengths: Vec<usize> = (0..1024).map(|i| (i * 7919) % 100).collect();
        let mut b = Batcher::new(lengths.clone(), 16, 1).unwrap();
        let spread: f64 = (0..64)
            .map(|_| {
                let x = b.next_batch();
                let l: Vec<usize> = x.iter().map(|&i| lengths[i]).collect();
                (l.iter().max().unwrap() - l.iter().min().unwrap()) as f64
            })
            .sum::<f64>()
            / 64.0;
        assert!(spread < 30.0, "mean length spread in a batch {spread} (random batches give ~90)");
    }
}
