//! The documentation names only paths that exist: every file or folder that
//! ARCHITECTURE.md or the README names in backticks is in the repository.
//!
//! A name with a slash (`consumers/src/sink/mod.rs`, `tests/postgres_sink.rs`)
//! must be the end of some path in the repository. A bare file name
//! (`rows.rs`) in ARCHITECTURE.md is read where it stands: under the crate of
//! its `### \`crate/\`` section and, inside a bullet that opens with a folder
//! (`- \`pg/\``), in that folder.

use std::path::{Path, PathBuf};

/// File endings that make a backticked word a file name.
const FILE_ENDINGS: &[&str] = &[
    ".rs", ".sql", ".sh", ".md", ".toml", ".py", ".json", ".tf", ".yml", ".yaml", ".avsc", ".jsonl",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace above testkit")
        .to_path_buf()
}

/// Every file and folder of the repository, relative to its root, with `/`.
fn tree(root: &Path) -> (Vec<String>, Vec<String>) {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a folder").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Build output, git's data and the stack's installs are not ours.
            if matches!(name.as_str(), "target" | ".git" | ".local" | "node_modules") {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .expect("below the root")
                .to_string_lossy()
                .replace('\\', "/");
            if path.is_dir() {
                dirs.push(relative);
                pending.push(path);
            } else {
                files.push(relative);
            }
        }
    }
    (files, dirs)
}

/// A backticked word that names a path: (the name, whether a folder).
fn path_name(word: &str) -> Option<(&str, bool)> {
    let outside = word.starts_with("../") || word.starts_with(".local") || word.contains("://");
    let pattern = word.chars().any(|c| "*<>{}$=,()[] ".contains(c));
    if outside || pattern || word.starts_with('-') {
        return None;
    }
    if let Some(dir) = word.strip_suffix('/') {
        return Some((dir, true));
    }
    FILE_ENDINGS
        .iter()
        .any(|e| word.ends_with(e) && word.len() > e.len())
        .then_some((word, false))
}

/// The paths a document names that do not exist, as "line: name".
fn missing(doc: &str, text: &str, files: &[String], dirs: &[String], in_context: bool) -> Vec<String> {
    let mut out = Vec::new();
    // The crate of the current `### `crate/`` section and the folder of the
    // current bullet.
    let (mut krate, mut folder): (Option<String>, Option<String>) = (None, None);
    for (n, line) in text.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("### ") {
            krate = heading
                .split('`')
                .nth(1)
                .and_then(|w| w.strip_suffix('/'))
                .map(str::to_owned);
            folder = None;
        } else if line.starts_with("## ") {
            (krate, folder) = (None, None);
        } else if line.starts_with("- ") {
            folder = line
                .strip_prefix("- `")
                .and_then(|rest| rest.split('`').next())
                .and_then(|w| w.strip_suffix('/'))
                .map(str::to_owned);
        }
        for (i, word) in line.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            let Some((name, is_dir)) = path_name(word) else {
                continue;
            };
            let candidates = if is_dir { dirs } else { files };
            let found = if name.contains('/') {
                candidates.iter().any(|c| c == name || c.ends_with(&format!("/{name}")))
            } else if !in_context || candidates.iter().any(|c| c == name) {
                // Not read in context, or at the root.
                true
            } else if is_dir {
                candidates.iter().any(|c| c.rsplit('/').next() == Some(name))
            } else {
                candidates.iter().any(|c| {
                    let base = c.rsplit('/').next() == Some(name);
                    let under_crate = krate.as_ref().is_none_or(|k| c.starts_with(&format!("{k}/")));
                    let in_folder = folder.as_ref().is_none_or(|f| c.contains(&format!("/{f}/")));
                    base && under_crate && in_folder
                })
            };
            if !found {
                out.push(format!("{doc}:{}: {word}", n + 1));
            }
        }
    }
    out
}

#[test]
fn every_path_the_documentation_names_exists() {
    let root = root();
    let (files, dirs) = tree(&root);
    let mut gone = Vec::new();
    for (doc, in_context) in [("ARCHITECTURE.md", true), ("README.md", false)] {
        let text = std::fs::read_to_string(root.join(doc)).expect("the document");
        gone.extend(missing(doc, &text, &files, &dirs, in_context));
    }
    assert!(gone.is_empty(), "named but not in the repository:\n{}", gone.join("\n"));
}

#[test]
fn a_path_that_does_not_exist_is_found() {
    let files = vec![
        "consumers/src/pg/rows.rs".to_owned(),
        "schemas/src/interval.rs".to_owned(),
    ];
    let dirs = vec!["consumers".to_owned(), "consumers/src/pg".to_owned()];
    let text = "### `consumers/` (crate)\n\n- `pg/`: `rows.rs`, `validate.rs`, `candles/interval.rs`.\n\
                - `pg/` again: `interval.rs`\n";
    assert_eq!(
        missing("A.md", text, &files, &dirs, true),
        [
            "A.md:3: validate.rs",
            "A.md:3: candles/interval.rs",
            "A.md:4: interval.rs"
        ]
    );
}
