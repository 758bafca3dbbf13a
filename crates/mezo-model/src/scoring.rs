//! Candidate scoring for classification tasks: each candidate's mean token log-probability
//! after the prompt; the prediction is the best candidate (MeZO's evaluation of SST-2 & co).

use mezo_data::{candidate_rows, Example, ScoringRow, Template};
use serde::Serialize;

use crate::error::Result;
use crate::{LoraBatch, Model, ScoreBatch, TextTokenizer};

#[derive(Debug, Clone, Serialize)]
pub struct ExampleScore {
    pub idx: i64,
    pub label: usize,
    pub pred: usize,
    /// In candidate order.
    pub scores: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub examples: usize,
    pub accuracy: f64,
    pub per_example: Vec<ExampleScore>,
}

/// Tokenises every example into its candidate rows.
pub fn example_rows(
    tok: &TextTokenizer,
    examples: &[Example],
    template: Template,
) -> Result<Vec<Vec<ScoringRow>>> {
    let candidates = template.candidates();
    examples
        .iter()
        .map(|ex| candidate_rows(&template.prompt(&ex.sentence), &candidates, &mut |s| tok.encode(s)))
        .collect()
}

/// Scores every example, `batch_size` examples a forward, with `lora` (one variant) applied if
/// given. Examples are grouped by length so a batch carries little padding; the report keeps
/// the input order.
pub fn evaluate(
    model: &Model,
    tok: &TextTokenizer,
    examples: &[Example],
    template: Template,
    batch_size: usize,
    lora: Option<&LoraBatch>,
) -> Result<EvalReport> {
    let rows = example_rows(tok, examples, template)?;
    evaluate_rows(model, examples, &rows, batch_size, lora)
}

/// [`evaluate`] on examples already tokenised by [`example_rows`].
pub fn evaluate_rows(
    model: &Model,
    examples: &[Example],
    rows: &[Vec<ScoringRow>],
    batch_size: usize,
    lora: Option<&LoraBatch>,
) -> Result<EvalReport> {
    let _guard = tch::no_grad_guard();
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| rows[i].iter().map(|r| r.tokens.len()).max().unwrap_or(0));
    let mut scores: Vec<Vec<f64>> = vec![Vec::new(); examples.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let flat: Vec<&ScoringRow> = chunk.iter().flat_map(|&i| rows[i].iter()).collect();
        let tokens: Vec<Vec<i64>> = flat.iter().map(|r| r.tokens.clone()).collect();
        let starts: Vec<usize> = flat.iter().map(|r| r.answer_start).collect();
        let b = ScoreBatch::new(&tokens, &starts, model.pad_token_id(), model.device())?;
        let lp = model.answer_logprob_sums(&b, lora)?.squeeze_dim(0) / &b.counts;
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
        .map(|(ex, s)| ExampleScore { idx: ex.idx, label: ex.label, pred: argmax(&s), scores: s })
        .collect();
    let correct = per_example.iter().filter(|e| e.pred == e.label).count();
    Ok(EvalReport {
        examples: per_example.len(),
        accuracy: if per_example.is_empty() { 0.0 } else { correct as f64 / per_example.len() as f64 },
        per_example,
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
