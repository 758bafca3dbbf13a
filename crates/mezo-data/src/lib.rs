//! Tasks, prompt templates and the rows a language model scores, and the answer metrics. No
//! tensors here: the model crate turns [`ScoringRow`]s into a batch.

pub mod metrics;
pub mod sst2;
pub mod tasks;
pub mod user;

pub use sst2::Template;
pub use tasks::{Metric, Task, TaskExample, TaskName, TASK_NAMES};
pub use user::UserTemplate;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{path}: no examples")]
    Empty { path: PathBuf },
    #[error("invalid {what} `{value}`: expected {expected}")]
    InvalidArgument { what: &'static str, value: String, expected: String },
    #[error("{0}")]
    Config(String),
}

/// One candidate answer of one example, as the model sees it: the answer's tokens begin at
/// `answer_start`, everything before is the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoringRow {
    pub tokens: Vec<i64>,
    pub answer_start: usize,
}

/// Scoring rows of an example: one per candidate, or for a generation task the prompt followed
/// by the gold answer (its teacher-forced training row).
pub fn task_rows<E>(
    ex: &TaskExample,
    encode: &mut dyn FnMut(&str) -> Result<Vec<i64>, E>,
) -> Result<Vec<ScoringRow>, E> {
    if ex.candidates.is_empty() {
        candidate_rows(&ex.prompt, &[ex.target().as_str()], encode)
    } else {
        let c: Vec<&str> = ex.candidates.iter().map(String::as_str).collect();
        candidate_rows(&ex.prompt, &c, encode)
    }
}

/// MeZO's candidate tokenisation: a candidate's tokens are those of `prompt + candidate`
/// after the prompt's own tokens, so a merge across the boundary cannot hide a token.
pub fn candidate_rows<E>(
    prompt: &str,
    candidates: &[&str],
    encode: &mut dyn FnMut(&str) -> Result<Vec<i64>, E>,
) -> Result<Vec<ScoringRow>, E> {
    let prompt_len = encode(prompt)?.len();
    candidates
        .iter()
        .map(|c| {
            let tokens = encode(&format!("{prompt}{c}"))?;
            Ok(ScoringRow { tokens, answer_start: prompt_len })
        })
        .collect()
}
