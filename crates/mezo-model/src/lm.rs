//! What scoring and decoding need from a causal language model, and both written once on top of
//! it: a model provides its last hidden states and its LM head ([`CausalLm::hidden_states`],
//! [`CausalLm::logits`]); candidate scoring ([`CausalLm::answer_logprob_sums`]) and greedy
//! decoding's next-token logits ([`CausalLm::last_token_logits`]) are the same for every
//! architecture.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::{Model, Padding, ScoreBatch, Tuning};

pub trait CausalLm {
    /// The last hidden states, `[batch, seq, width]`. `ids` and `mask` are `[batch, seq]` int64,
    /// `mask` 1 on tokens and 0 on padding (for [`Padding::Tree`], `k >= 2` on branch `k`). With
    /// `tuning`, rows are grouped by adapter variant.
    fn hidden_states(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        padding: Padding,
        tuning: Option<&Tuning>,
    ) -> Result<Tensor>;
    /// The LM head over any leading shape of hidden states.
    fn logits(&self, hidden: &Tensor) -> Tensor;
    fn pad_token_id(&self) -> i64;
    fn eos_token_id(&self) -> i64;
    fn device(&self) -> Device;
    /// The longest sequence the model takes.
    fn max_positions(&self) -> usize;
    /// Whether tree rows ([`Padding::Tree`]) read as their branches alone on this model.
    fn supports_trees(&self) -> bool;

    /// Candidate rows (answers from `answer_start[i]` on) prepared for scoring on the model's
    /// device: candidates that share their inputs share a row, and, where the model supports
    /// trees, candidates of several tokens after one prompt ride in one tree row, and rows that all
    /// begin with one long prompt ride in one tree row that reads it once. A candidate tree is at
    /// most half the model's positions long, so any prefix (at most 1024 of OPT's 2048) still
    /// fits; a shared-prompt tree at most the model's positions (its positions are its rows').
    fn score_batch(&self, rows: &[Vec<i64>], answer_start: &[usize]) -> Result<ScoreBatch> {
        let (pad, device) = (self.pad_token_id(), self.device());
        if self.supports_trees() {
            ScoreBatch::with_trees(rows, answer_start, pad, device, self.max_positions() / 2)
        } else {
            ScoreBatch::new(rows, answer_start, pad, device)
        }
    }

    /// Logits after each row's last real token, `[rows, vocab]` float32, for right-padded `ids`
    /// and `mask` (`[rows, seq]`). With `tuning`, rows are grouped by adapter variant.
    fn last_token_logits(&self, ids: &Tensor, mask: &Tensor, tuning: Option<&Tuning>) -> Result<Tensor> {
        let hidden = self.hidden_states(ids, mask, Padding::Right, tuning)?;
        let last = mask.sum_dim_intlist(1, false, Kind::Int64) - 1;
        let rows = Tensor::arange(ids.size()[0], (Kind::Int64, self.device()));
        let picked = hidden.index(&[Some(&rows), Some(&last)]);
        Ok(self.logits(&picked).to_kind(Kind::Float))
    }

    /// Sum of each row's answer-token log-probabilities, for `variants` copies of the batch
    /// (one per variant of `tuning`; 1 without): `[variants, rows]` float32 on the model's
    /// device. The LM head runs only at the scored positions, which is most of the saving for a
    /// 50k vocabulary.
    fn answer_logprob_sums(&self, b: &ScoreBatch, tuning: Option<&Tuning>) -> Result<Tensor> {
        let v = tuning.map_or(1, Tuning::variants);
        let (ids, mask) = if v == 1 {
            (b.ids.shallow_clone(), b.mask.shallow_clone())
        } else {
            (b.ids.repeat([v, 1]), b.mask.repeat([v, 1]))
        };
        let padding = if b.tree { Padding::Tree } else { Padding::Right };
        let hidden = self.hidden_states(&ids, &mask, padding, tuning)?;
        let device = self.device();
        // Variant i's copy of input row j is hidden row i * inputs + j; its score for row k is
        // sum i * rows + k.
        let variant = Tensor::arange(v, (Kind::Int64, device)).unsqueeze(1);
        let src = (b.src_row.unsqueeze(0) + &variant * b.ids.size()[0]).flatten(0, 1);
        let dst = (b.row_idx.unsqueeze(0) + &variant * b.rows).flatten(0, 1);
        let pos_idx = b.pos_idx.repeat([v]);
        let targets = b.targets.repeat([v]);
        let picked = hidden.index(&[Some(&src), Some(&pos_idx)]);
        let logp = self.logits(&picked).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        let token_lp = logp.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
        let sums = Tensor::zeros([v * b.rows], (Kind::Float, device)).index_add(0, &dst, &token_lp);
        Ok(sums.view([v, b.rows]))
    }

    /// Mean log-probability of each row's answer tokens (rows from `answer_start[i]` on, given
    /// everything before): `[rows]` float32.
    fn answer_logprobs(&self, rows: &[Vec<i64>], answer_start: &[usize]) -> Result<Tensor> {
        let b = self.score_batch(rows, answer_start)?;
        Ok(self.answer_logprob_sums(&b, None)?.squeeze_dim(0) / &b.counts)
    }
}

// Implemented for `Model`, which every caller holds; an architecture joins through `Model`'s
// `hidden_states` and `logits`.
impl CausalLm for Model {
    fn hidden_states(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        padding: Padding,
        tuning: Option<&Tuning>,
    ) -> Result<Tensor> {
        Model::hidden_states(self, ids, mask, padding, tuning)
    }

    fn logits(&self, hidden: &Tensor) -> Tensor {
        Model::logits(self, hidden)
    }

    fn pad_token_id(&self) -> i64 {
        Model::pad_token_id(self)
    }

    fn eos_token_id(&self) -> i64 {
        Model::eos_token_id(self)
    }

    fn device(&self) -> Device {
        Model::device(self)
    }

    fn max_positions(&self) -> usize {
        self.config().max_position_embeddings() as usize
    }

    fn supports_trees(&self) -> bool {
        Model::supports_trees(self)
    }
}
