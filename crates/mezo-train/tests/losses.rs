//! The losses a forward pass measures, checked against the per-example definitions: the
//! classification loss and the non-differentiable accuracy over candidate sets of different
//! sizes (ReCoRD, COPA), with several gold candidates; greedy decoding in a padded batch and
//! under adapter variants gives each prompt's own continuation.

use std::collections::HashSet;

use mezo_data::ScoringRow;
use mezo_model::generate::greedy;
use mezo_model::{CausalLm, Decoding, LoraBatch, LoraConfig, Model, Opt, OptConfig, Target, Tuning};
use mezo_train::engine::{Item, LoraState};
use mezo_train::{LossKind, Prepared};
use tch::{Device, Kind, Tensor};

fn tiny_model() -> Model {
    let json = serde_json::json!({
        "model_type": "opt", "vocab_size": 96, "hidden_size": 16, "num_hidden_layers": 2,
        "ffn_dim": 32, "num_attention_heads": 2, "max_position_embeddings": 48,
    });
    let cfg = OptConfig::from_json(&json.to_string(), std::path::Path::new("tiny")).unwrap();
    let m = Opt::random(cfg, Device::Cpu, Kind::Float, 3).unwrap();
    // Larger weights than HF's init, so candidates score clearly apart.
    let _g = tch::no_grad_guard();
    for (_, t) in m.named_parameters() {
        if t.dim() == 2 {
            let _ = t.shallow_clone().g_mul_scalar_(8.0);
        }
    }
    Model::Opt(m)
}

/// Examples with 2, 3, 2 and 4 candidates; golds (the first is the target) include a set of two.
fn examples() -> (Vec<Vec<ScoringRow>>, Vec<Vec<usize>>) {
    let sizes = [2usize, 3, 2, 4];
    let golds = vec![vec![1], vec![2, 0], vec![0], vec![3, 1]];
    let rows = sizes
        .iter()
        .enumerate()
        .map(|(e, &n)| {
            let prompt: Vec<i64> = (0..4 + e as i64).map(|i| (11 * i + 5 * e as i64 + 2) % 90 + 4).collect();
            (0..n)
                .map(|c| {
                    let answer = vec![20 + 7 * c as i64, 30 + (e as i64 + c as i64) % 9];
                    ScoringRow { tokens: [prompt.clone(), answer].concat(), answer_start: prompt.len() }
                })
                .collect()
        })
        .collect();
    (rows, golds)
}

fn prepared(model: &Model, kind: LossKind) -> Prepared {
    let (rows, golds) = examples();
    let items: Vec<Item> =
        rows.iter().zip(&golds).map(|(r, g)| Item { rows: r, gold: g, prompt: &[], answers: &[] }).collect();
    Prepared::from_items(&items, kind, model, None).unwrap()
}

/// Each example's candidates' mean log-probabilities, scored one example at a time.
fn per_example_scores(model: &Model) -> Vec<Vec<f64>> {
    let (rows, _) = examples();
    rows.iter()
        .map(|r| {
            let t: Vec<Vec<i64>> = r.iter().map(|x| x.tokens.clone()).collect();
            let s: Vec<usize> = r.iter().map(|x| x.answer_start).collect();
            Vec::<f32>::try_from(&model.answer_logprobs(&t, &s).unwrap())
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        })
        .collect()
}

#[test]
fn classification_over_uneven_candidate_sets_matches_the_definition() {
    let model = tiny_model();
    let p = prepared(&model, LossKind::Classification);
    let got = p.loss_sums(&model, None).unwrap().double_value(&[0]);
    let (_, golds) = examples();
    let want: f64 = per_example_scores(&model)
        .iter()
        .zip(&golds)
        .map(|(s, g)| {
            let max = s.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + s.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            lse - s[g[0]]
        })
        .sum();
    assert!((got - want).abs() < 1e-4, "classification loss {got}, per-example definition {want}");
    assert_eq!(p.weight, 4.0);
}

#[test]
fn accuracy_loss_is_minus_the_correct_predictions() {
    let model = tiny_model();
    let (_, golds) = examples();
    let scores = per_example_scores(&model);
    let correct = scores
        .iter()
        .zip(&golds)
        .filter(|(s, g)| {
            let pred = (0..s.len()).fold(0, |b, i| if s[i] > s[b] { i } else { b });
            g.contains(&pred)
        })
        .count();
    let p = prepared(&model, LossKind::Accuracy);
    let got = p.loss_sums(&model, None).unwrap().double_value(&[0]);
    assert_eq!(got, -(correct as f64), "accuracy loss counts predictions in the gold sets");
    // Under adapter variants (θ+εz, θ−εz) each variant's value is a count too.
    let lc = LoraConfig { r: 2, alpha: 4.0, targets: vec![Target::Q, Target::V] };
    let mut st = LoraState::init(lc.clone(), &model.config(), Device::Cpu, 1).unwrap();
    st.state.flat = Tensor::randn([st.state.flat.numel() as i64], (Kind::Float, Device::Cpu));
    let variants = Tensor::stack(&[&st.state.flat, &(-&st.state.flat)], 0);
    let batch = Tuning::Lora(LoraBatch::from_flat(&variants, &lc, &st.tensors, Kind::Float).unwrap());
    let v = Vec::<f32>::try_from(&p.loss_sums(&model, Some(&batch)).unwrap()).unwrap();
    assert_eq!(v.len(), 2);
    assert!(v.iter().all(|x| x.fract() == 0.0 && (-4.0..=0.0).contains(x)), "{v:?}");
}

#[test]
fn greedy_decoding_is_per_prompt_in_padded_batches_and_variants() {
    let model = tiny_model();
    let d = Decoding { max_new_tokens: 5, stop_ids: HashSet::new() };
    let prompts: Vec<Vec<i64>> = vec![vec![5, 9, 13], (0..11).map(|i| (i * 7) % 90 + 3).collect(), vec![42]];
    let together = greedy(&model, &prompts, None, &d).unwrap();
    assert_eq!(together.len(), 1);
    for (i, p) in prompts.iter().enumerate() {
        let alone = greedy(&model, std::slice::from_ref(p), None, &d).unwrap();
        assert_eq!(together[0][i], alone[0][0], "prompt {i}: padding changed its continuation");
        assert_eq!(alone[0][0].len(), 5);
        // The first token is the argmax after the prompt.
        let ids = Tensor::from_slice(p).unsqueeze(0);
        let mask = ids.ones_like();
        let h = model.hidden_states(&ids, &mask, mezo_model::Padding::Right, None).unwrap();
        let next = model.logits(&h.get(0).get(p.len() as i64 - 1)).argmax(-1, false).int64_value(&[]);
        assert_eq!(alone[0][0][0], next);
    }
    // A stop token ends a sequence and is not returned.
    let first = together[0][0][0];
    let stop = Decoding { max_new_tokens: 5, stop_ids: HashSet::from([first]) };
    assert!(greedy(&model, &prompts[..1], None, &stop).unwrap()[0][0].is_empty());
    // Two adapter variants at B = 0 (PEFT's init) decode as the base model does.
    let lc = LoraConfig { r: 2, alpha: 4.0, targets: vec![Target::Q, Target::V] };
    let st = LoraState::init(lc.clone(), &model.config(), Device::Cpu, 1).unwrap();
    let variants = Tensor::stack(&[&st.state.flat, &st.state.flat], 0);
    let batch = Tuning::Lora(LoraBatch::from_flat(&variants, &lc, &st.tensors, Kind::Float).unwrap());
    let v = greedy(&model, &prompts, Some(&batch), &d).unwrap();
    assert_eq!(v, vec![together[0].clone(), together[0].clone()]);
}
