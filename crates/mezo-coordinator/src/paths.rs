//! Where a run may read from. A run spec names a model and a data folder on the coordinator's
//! (and workers') disks; with `--path-root` set, both must resolve inside one of the roots, and so
//! must every entry directly in them (the files a run reads: config, weights, tokenizer, JSONL).
//! Resolving (canonicalising) first defeats `..` and symlinks that point elsewhere.

use std::path::{Path, PathBuf};

/// Canonical forms of the configured roots; a root that does not exist is an error naming it.
pub fn canonical_roots(roots: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    roots.iter().map(|r| r.canonicalize().map_err(|e| format!("--path-root {}: {e}", r.display()))).collect()
}

/// `Ok` when `path` and every entry directly in it (if it is a folder) resolve inside a root.
/// `what` names the run-spec field in the error. No roots: everything is allowed.
pub fn confine(what: &str, path: &Path, roots: &[PathBuf]) -> Result<(), String> {
    if roots.is_empty() {
        return Ok(());
    }
    let inside = |p: &Path| -> Result<(), String> {
        let c = p.canonicalize().map_err(|e| format!("{what} {}: {e}", p.display()))?;
        if roots.iter().any(|r| c.starts_with(r)) {
            Ok(())
        } else {
            Err(format!(
                "{what} {} resolves to {}, outside the allowed roots ({})",
                p.display(),
                c.display(),
                roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
            ))
        }
    };
    inside(path)?;
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("{what} {}: {e}", path.display()))?;
            inside(&e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_roots_are_refused_by_name() {
        let base = std::env::temp_dir().join(format!("mezo-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        let model = root.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let outside = base.join("secret");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("weights.bin"), "x").unwrap();
        let roots = canonical_roots(&[root.clone()]).unwrap();

        confine("model", &model, &roots).unwrap();
        confine("model", &model, &[]).unwrap();
        // `..` out of the root.
        let e = confine("model", &root.join("../secret"), &roots).unwrap_err();
        assert!(
            e.contains("model") && e.contains("outside the allowed roots") && e.contains("secret"),
            "{e}"
        );
        // A symlink in the root pointing out of it, as the folder or as a file in it.
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let e = confine("data_dir", &root.join("link"), &roots).unwrap_err();
        assert!(e.starts_with("data_dir") && e.contains("outside"), "{e}");
        std::os::unix::fs::symlink(outside.join("weights.bin"), model.join("model.safetensors")).unwrap();
        let e = confine("model", &model, &roots).unwrap_err();
        assert!(e.contains("model.safetensors") && e.contains("outside"), "{e}");
        // Missing paths and roots are named.
        let e = confine("model", &root.join("nope"), &roots).unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let e = canonical_roots(&[base.join("absent")]).unwrap_err();
        assert!(e.contains("--path-root") && e.contains("absent"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
