//! SST-2's two prompt templates (the task suite, [`crate::tasks`], reads its JSONL).

use crate::DataError;

/// The prompt formats of the MeZO paper's SST-2 runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// `"<sentence> It was"` with candidates `" terrible"` / `" great"` (MeZO's SST2Template).
    Mezo,
    /// `"Classify the sentiment of this review: <sentence>\nThe sentiment is"` with
    /// `" negative."` / `" positive."`.
    Classify,
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, DataError> {
        match s {
            "mezo" => Ok(Template::Mezo),
            "classify" => Ok(Template::Classify),
            _ => Err(DataError::InvalidArgument {
                what: "template",
                value: s.into(),
                expected: "mezo or classify".into(),
            }),
        }
    }

    pub fn prompt(self, sentence: &str) -> String {
        match self {
            Template::Mezo => format!("{sentence} It was"),
            Template::Classify => {
                format!("Classify the sentiment of this review: {sentence}\nThe sentiment is")
            }
        }
    }

    /// Candidate answers in label order (index = label).
    pub fn candidates(self) -> [&'static str; 2] {
        match self {
            Template::Mezo => [" terrible", " great"],
            Template::Classify => [" negative.", " positive."],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_the_paper() {
        assert_eq!(Template::Mezo.prompt("a film"), "a film It was");
        assert_eq!(
            Template::Classify.prompt("a film"),
            "Classify the sentiment of this review: a film\nThe sentiment is"
        );
        assert_eq!(Template::Mezo.candidates(), [" terrible", " great"]);
        assert!(Template::parse("other").is_err());
    }

    #[test]
    fn candidate_tokens_follow_the_prompt() {
        // A toy tokenizer: one token per character.
        let mut enc = |s: &str| Ok::<_, ()>(s.chars().map(|c| c as i64).collect());
        let rows = crate::candidate_rows("ab", &[" c", "d"], &mut enc).unwrap();
        assert_eq!(rows[0].tokens.len(), 4);
        assert_eq!(rows[0].answer_start, 2);
        assert_eq!(rows[1].tokens[2..], ['d' as i64]);
    }
}
