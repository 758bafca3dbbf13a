//! Greedy decoding on top of a model's full forward pass, for generation tasks (SQuAD, DROP)
//! and their non-differentiable F1 objective. Each new token recomputes the whole sequence: no
//! key-value cache, which keeps the model side to one function ([`CausalLm::last_token_logits`],
//! written once over any model's hidden states and LM head).

use std::collections::HashSet;

use tch::Device;

use crate::error::Result;
use crate::opt::pad_right;
use crate::{CausalLm, TextTokenizer, Tuning};

/// When generation stops: a stop token (newline-bearing tokens and EOS, as MeZO's SQuAD runs
/// with `--eos_token "\n"`) or `max_new_tokens` new tokens.
#[derive(Debug, Clone)]
pub struct Decoding {
    pub max_new_tokens: usize,
    pub stop_ids: HashSet<i64>,
}

impl Decoding {
    pub fn new(tok: &TextTokenizer, eos_token_id: i64, max_new_tokens: usize) -> Self {
        let mut stop_ids: HashSet<i64> = tok.newline_ids().into_iter().collect();
        stop_ids.insert(eos_token_id);
        Decoding { max_new_tokens, stop_ids }
    }
}

/// Greedy continuations of every prompt under every adapter variant of `tuning` (one without):
/// `[variant][prompt]` new tokens, the stop token excluded. A sequence also stops at the
/// model's longest sequence.
pub fn greedy(
    model: &dyn CausalLm,
    prompts: &[Vec<i64>],
    tuning: Option<&Tuning>,
    d: &Decoding,
) -> Result<Vec<Vec<Vec<i64>>>> {
    let _g = tch::no_grad_guard();
    let variants = tuning.map_or(1, |t| t.variants()) as usize;
    // Variant-major, as adapter batches group rows.
    let mut seqs: Vec<Vec<i64>> = (0..variants).flat_map(|_| prompts.iter().cloned()).collect();
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); seqs.len()];
    let limit = model.max_positions();
    let mut done: Vec<bool> = seqs.iter().map(|s| s.len() >= limit || s.is_empty()).collect();
    for _ in 0..d.max_new_tokens {
        if done.iter().all(|&x| x) {
            break;
        }
        let (ids, mask) = pad_right(&seqs, model.pad_token_id(), model.device())?;
        let next = model.last_token_logits(&ids, &mask, tuning)?.argmax(-1, false);
        let next: Vec<i64> =
            Vec::<i64>::try_from(&next.to_device(Device::Cpu)).map_err(crate::ModelError::Torch)?;
        for (i, &t) in next.iter().enumerate() {
            if done[i] {
                continue;
            }
            if d.stop_ids.contains(&t) {
                done[i] = true;
                continue;
            }
            seqs[i].push(t);
            out[i].push(t);
            done[i] = seqs[i].len() >= limit;
        }
    }
    let per = prompts.len();
    Ok((0..variants).map(|v| out[v * per..(v + 1) * per].to_vec()).collect())
}

/// The answer text of generated tokens: decoded, cut at the first newline, trimmed (MeZO decodes
/// and strips).
pub fn answer_text(tok: &TextTokenizer, tokens: &[i64]) -> Result<String> {
    let text = tok.decode(tokens)?;
    Ok(text.split('\n').next().unwrap_or("").trim().to_string())
}
