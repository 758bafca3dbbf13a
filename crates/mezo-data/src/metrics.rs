//! SQuAD-style answer metrics, as MeZO scores SQuAD and DROP: answers are normalised (lower case,
//! ASCII punctuation removed, the articles a/an/the removed, whitespace collapsed), then token F1
//! and exact match, each the best over the reference answers.

use std::collections::HashMap;

/// Python's `string.punctuation`.
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// Python's `\w` in a `str` pattern: Unicode letters and digits, and `_`.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The SQuAD normalisation: lower case, drop punctuation, replace each whole word `a`, `an` or
/// `the` with a space (`\b(a|an|the)\b`), collapse whitespace.
pub fn normalize_answer(s: &str) -> String {
    let lowered = s.to_lowercase();
    let no_punct: String = lowered.chars().filter(|c| !PUNCTUATION.contains(*c)).collect();
    // A `\b(a|an|the)\b` match is exactly a maximal run of word characters equal to an article.
    let mut out = String::with_capacity(no_punct.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if matches!(run.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in no_punct.chars() {
        if is_word(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Token F1 of one prediction against one reference, both normalised.
fn f1_one(pred: &str, gold: &str) -> f64 {
    let p = normalize_answer(pred);
    let g = normalize_answer(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0i64;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The best F1 over the references. As in MeZO, a first reference of `CANNOTANSWER` or
/// `no answer` (an unanswerable question) scores 1 only for that exact answer. No references
/// scores 0.
pub fn f1_score(pred: &str, golds: &[String]) -> f64 {
    let Some(first) = golds.first() else { return 0.0 };
    if first == "CANNOTANSWER" || first == "no answer" {
        return f64::from(u8::from(normalize_answer(first) == normalize_answer(pred)));
    }
    golds.iter().map(|g| f1_one(pred, g)).fold(0.0, f64::max)
}

/// 1 when the normalised prediction equals any normalised reference.
pub fn exact_match(pred: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(pred);
    f64::from(u8::from(golds.iter().any(|g| normalize_answer(g) == p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn normalisation_matches_squad() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize_answer("an apple, a pear & the plum."), "apple pear plum");
        // Articles only as whole words: "other", "anthem", "theatre" stay.
        assert_eq!(normalize_answer("Another theatre anthem"), "another theatre anthem");
        // Punctuation goes before articles are matched: "the-end" -> "theend".
        assert_eq!(normalize_answer("the-end"), "theend");
        // A non-word, non-punctuation character is a word boundary (as `\b` is).
        assert_eq!(normalize_answer("€the"), "€");
        assert_eq!(normalize_answer("  "), "");
    }

    #[test]
    fn f1_and_em_known_values() {
        // Identical after normalisation.
        assert_eq!(f1_score("the Denver Broncos", &s(&["Denver Broncos"])), 1.0);
        assert_eq!(exact_match("the Denver Broncos", &s(&["Denver Broncos"])), 1.0);
        // 1 common token of 2 predicted and 3 gold: P=1/2, R=1/3, F1=0.4.
        assert!((f1_score("Denver rules", &s(&["Denver Broncos win"])) - 0.4).abs() < 1e-12);
        assert_eq!(exact_match("Denver rules", &s(&["Denver Broncos win"])), 0.0);
        // Best over references.
        assert_eq!(f1_score("Broncos", &s(&["Denver Broncos win", "Broncos"])), 1.0);
        // Repeated tokens count as often as both sides have them: common {a?}: "x x y" vs "x y y".
        // Common = min counts: x 1, y 1 = 2; P = 2/3, R = 2/3.
        assert!((f1_score("x x y", &s(&["x y y"])) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1_score("", &s(&["something"])), 0.0);
        assert_eq!(f1_score("anything", &[]), 0.0);
        // Unanswerable questions score exact matches only.
        assert_eq!(f1_score("No answer.", &s(&["no answer"])), 1.0);
        assert_eq!(f1_score("no idea", &s(&["no answer"])), 0.0);
    }
}
