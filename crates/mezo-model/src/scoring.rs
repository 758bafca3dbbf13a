//! Evaluation of a task's examples. Candidate tasks: each candidate's mean token log-probability
//! after the prompt, the prediction the best candidate (MeZO's evaluation of SST-2 & co), scored
//! by accuracy. Generation tasks: greedy decoding to a newline, scored by SQuAD F1 and exact match.

use mezo_data::metrics::{exact_match, f1_score};
use mezo_data::{task_rows, Metric, ScoringRow, Task, TaskExample};
use serde::Serialize;

use crate::error::Result;
use crate::generate::{answer_text, greedy, Decoding};
use crate::CausalLm;
use crate::{Model, TextTokenizer, Tuning};

#[derive(Debug, Clone, Serialize)]
pub struct ExampleScore {
    pub idx: i64,
    /// The first gold candidate.
    pub label: usize,
    pub pred: usize,
    /// In candidate order.
    pub scores: Vec<f64>,
    /// The prediction is one of the gold candidates.
    pub correct: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationScore {
    pub idx: i64,
    pub prediction: String,
    pub answers: Vec<String>,
    pub f1: f64,
    pub exact_match: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub examples: usize,
    /// `accuracy` or `f1`: what `score` is.
    pub metric: &'static str,
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_example: Vec<ExampleScore>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub generations: Vec<GenerationScore>,
}

impl EvalReport {
    /// The sum of the per-example metric (correct predictions, or F1), for combining shards.
    pub fn score_sum(&self) -> f64 {
        if self.generations.is_empty() {
            self.per_example.iter().filter(|e| e.correct).count() as f64
        } else {
            self.generations.iter().map(|g| g.f1).sum()
        }
    }
}

fn mean(v: impl Iterator<Item = f64>, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        v.sum::<f64>() / n as f64
    }
}

/// Tokenises every example into its scoring rows ([`task_rows`]).
pub fn example_rows(tok: &TextTokenizer, examples: &[TaskExample]) -> Result<Vec<Vec<ScoringRow>>> {
    examples.iter().map(|ex| task_rows(ex, &mut |s| tok.encode(s))).collect()
}

/// The prompts' tokens (what generation starts from).
pub fn prompt_tokens(tok: &TextTokenizer, examples: &[TaskExample]) -> Result<Vec<Vec<i64>>> {
    examples.iter().map(|ex| tok.encode(&ex.prompt)).collect()
}

/// Evaluates a task's examples with `tuning` (one variant of a LoRA or prefix adapter) applied if given.
pub fn evaluate(
    model: &Model,
    tok: &TextTokenizer,
    task: &Task,
    examples: &[TaskExample],
    batch_size: usize,
    tuning: Option<&Tuning>,
    max_new_tokens: usize,
) -> Result<EvalReport> {
    match task.metric() {
        Metric::Accuracy => {
            let rows = example_rows(tok, examples)?;
            evaluate_rows(model, examples, &rows, batch_size, tuning)
        }
        Metric::F1 => {
            let prompts = prompt_tokens(tok, examples)?;
            let d = Decoding::new(tok, model.eos_token_id(), max_new_tokens);
            evaluate_generation(model, tok, &d, examples, &prompts, batch_size, tuning)
        }
    }
}

/// Candidate scoring on examples already tokenised by [`example_rows`], `batch_size` examples a
/// forward. Examples are grouped by length so a batch carries little padding; the report keeps
/// the input order.
pub fn evaluate_rows(
    model: &Model,
    examples: &[TaskExample],
    rows: &[Vec<ScoringRow>],
    batch_size: usize,
    tuning: Option<&Tuning>,
) -> Result<EvalReport> {
    let _guard = tch::no_grad_guard();
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| rows[i].iter().map(|r| r.tokens.len()).max().unwrap_or(0));
    let mut scores: Vec<Vec<f64>> = vec![Vec::new(); examples.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let flat: Vec<&ScoringRow> = chunk.iter().flat_map(|&i| rows[i].iter()).collect();
        let tokens: Vec<Vec<i64>> = flat.iter().map(|r| r.tokens.clone()).collect();
        let starts: Vec<usize> = flat.iter().map(|r| r.answer_start).collect();
        let b = model.score_batch(&tokens, &starts)?;
        let lp = model.answer_logprob_sums(&b, tuning)?.squeeze_dim(0) / &b.counts;
        let values: Vec<f64> = Vec::<f32>::try_from(&lp.to_device(tch::Device::Cpu))
            .map_err(crate::ModelError::Torch)?
            .into_iter()
            .map(f64::from)
            .collect();
        let mut it = values.into_iter();
        for &i in chunk {
            scores[i] = it.by_ref().take(rows[i].len()).collect();
        }
    }
    let per_example: Vec<ExampleScore> = examples
        .iter()
        .zip(scores)
        .map(|(ex, s)| {
            let pred = argmax(&s);
            ExampleScore { idx: ex.idx, label: ex.label(), pred, correct: ex.gold.contains(&pred), scores: s }
        })
        .collect();
    let n = per_example.len();
    let accuracy = mean(per_example.iter().map(|e| f64::from(u8::from(e.correct))), n);
    Ok(EvalReport {
        examples: n,
        metric: Metric::Accuracy.name(),
        score: accuracy,
        accuracy: Some(accuracy),
        f1: None,
        exact_match: None,
        per_example,
        generations: Vec::new(),
    })
}

/// Greedy generation for each prompt, `batch_size` prompts a decoding loop, scored against the
/// examples' reference answers.
pub fn evaluate_generation(
    model: &dyn CausalLm,
    tok: &TextTokenizer,
    d: &Decoding,
    examples: &[TaskExample],
    prompts: &[Vec<i64>],
    batch_size: usize,
    tuning: Option<&Tuning>,
) -> Result<EvalReport> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut texts: Vec<String> = vec![String::new(); examples.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<i64>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let out = greedy(model, &batch, tuning, d)?.remove(0);
        for (&i, toks) in chunk.iter().zip(&out) {
            texts[i] = answer_text(tok, toks)?;
        }
    }
    let generations: Vec<GenerationScore> = examples
        .iter()
        .zip(texts)
        .map(|(ex, prediction)| GenerationScore {
            idx: ex.idx,
            f1: f1_score(&prediction, &ex.answers),
            exact_match: exact_match(&prediction, &ex.answers),
            prediction,
            answers: ex.answers.clone(),
        })
        .collect();
    let n = generations.len();
    let f1 = mean(generations.iter().map(|g| g.f1), n);
    let em = mean(generations.iter().map(|g| g.exact_match), n);
    Ok(EvalReport {
        examples: n,
        metric: Metric::F1.name(),
        score: f1,
        accuracy: None,
        f1: Some(f1),
        exact_match: Some(em),
        per_example: Vec::new(),
        generations,
    })
}

/// First best index, so ties go to the earlier candidate as in MeZO's `np.argmax`.
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
