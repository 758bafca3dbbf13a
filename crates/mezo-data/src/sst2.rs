//! SST-2 (and any JSONL with `sentence` and `label` fields) with the two prompt templates.

use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use crate::DataError;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The `idx` field when the file has one, else the line's position (0-based).
    pub idx: i64,
    pub sentence: String,
    /// 0 negative, 1 positive.
    pub label: usize,
}

#[derive(Deserialize)]
struct Line {
    sentence: Option<String>,
    label: Option<serde_json::Value>,
    idx: Option<i64>,
}

/// Reads examples from a JSONL file, one object per line with `sentence` and `label` (0/1).
pub fn load_jsonl(path: &Path) -> Result<Vec<Example>, DataError> {
    let file =
        std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError::Line { path: path.to_path_buf(), line: i + 1, message };
        let parsed: Line = serde_json::from_str(&line).map_err(|e| err(format!("not a JSON object: {e}")))?;
        let sentence = parsed.sentence.ok_or_else(|| err("missing field `sentence`".into()))?;
        let label = match parsed.label {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(0) => 0,
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(1) => 1,
            Some(other) => return Err(err(format!("field `label` is {other}, expected 0 or 1"))),
            None => return Err(err("missing field `label`".into())),
        };
        out.push(Example { idx: parsed.idx.unwrap_or(out.len() as i64), sentence, label });
    }
    if out.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(out)
}

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

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mezo-data-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_sst2_lines() {
        let p = write(
            "ok",
            "{\"idx\": 7, \"sentence\": \"fine\", \"label\": 1}\n\n{\"sentence\": \"bad\", \"label\": 0}\n",
        );
        let ex = load_jsonl(&p).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0], Example { idx: 7, sentence: "fine".into(), label: 1 });
        assert_eq!(ex[1].idx, 1);
        assert_eq!(ex[1].label, 0);
    }

    #[test]
    fn bad_lines_name_file_line_and_field() {
        let p = write("nolabel", "{\"sentence\": \"x\", \"label\": 0}\n{\"sentence\": \"x\"}\n");
        let e = load_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("`label`"), "{e}");
        let p = write("badlabel", "{\"sentence\": \"x\", \"label\": 3}\n");
        let e = load_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains(":1") && e.contains("label") && e.contains("0 or 1"), "{e}");
        let p = write("notjson", "sentence,label\n");
        let e = load_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("not a JSON object"), "{e}");
        let p = write("empty", "\n");
        assert!(load_jsonl(&p).unwrap_err().to_string().contains("no examples"));
        let e = load_jsonl(Path::new("/nonexistent/x.jsonl")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    }

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
