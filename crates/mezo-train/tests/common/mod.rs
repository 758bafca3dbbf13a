//! What the engine's integration tests share.

use mezo_data::ScoringRow;
use mezo_model::Model;
use mezo_train::{LossKind, Prepared};

/// A classification batch: example `e` of `examples` reads `prompt(e)` and chooses between the
/// answers `[40, 41]` and `[50, 51]`, gold `e % 2`.
pub fn two_candidate_batch(
    model: &Model,
    examples: impl Iterator<Item = i64>,
    prompt: impl Fn(i64) -> Vec<i64>,
) -> Prepared {
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for e in examples {
        let prompt = prompt(e);
        let cands: Vec<ScoringRow> = [[40i64, 41], [50, 51]]
            .iter()
            .map(|c| ScoringRow { tokens: [prompt.clone(), c.to_vec()].concat(), answer_start: prompt.len() })
            .collect();
        rows.push(cands);
        labels.push((e % 2) as usize);
    }
    let refs: Vec<&[ScoringRow]> = rows.iter().map(|r| r.as_slice()).collect();
    Prepared::new(&refs, &labels, LossKind::Classification, model).unwrap()
}
