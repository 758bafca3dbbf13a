//! Tasks, prompt templates and the rows a language model scores. No tensors here: the model
//! crate turns [`ScoringRow`]s into a batch.

pub mod sst2;

pub use sst2::{load_jsonl, Example, Template};

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
}

/// One candidate answer of one example, as the model sees it: the answer's tokens begin at
/// `answer_start`, everything before is the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoringRow {
    pub tokens: Vec<i64>,
    pub answer_start: usize,
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
