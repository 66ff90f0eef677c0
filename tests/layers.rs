//! The crate's layers, checked: an import only ever points down (ARCHITECTURE.md).
//!
//! Every `crate::<module>` named in code under `src/` (comments aside) must belong to a
//! lower layer than the file that names it, or to the file's own module. The shared
//! layers (1: error, credentials, backoff, watched; 4: pool, tls, libpq) may use each other;
//! adapters (5) do not reach into each other, nor do the integrations (6). No server is
//! needed: this reads the source files.

use std::path::{Path, PathBuf};

/// Layers whose modules are building blocks for the layers above, and may use each other.
const SHARED_LAYERS: [u8; 2] = [1, 4];

/// The layer of a top-level module of the crate, bottom (1) to top (6).
fn layer(module: &str) -> Option<u8> {
    Some(match module {
        // 1: the pieces everything shares.
        "error" | "credentials" | "backoff" | "test_util" | "secrecy" | "watched" => 1,
        // 2: the Vault/OpenBao client.
        "vault" => 2,
        // 3: the lease engine.
        "lease" => 3,
        // 4: what every pool adapter shares.
        "pool" | "tls" | "libpq" => 4,
        // 5: one adapter per backend.
        "postgres" | "sqlx" | "redis" | "kafka" => 5,
        // 6: integrations and the sidecar.
        "axum" | "proxy" | "bin" => 6,
        _ => return None,
    })
}

/// The top-level module a file under `src/` belongs to (`src/lease/source/kv.rs` →
/// `lease`, `src/tls.rs` → `tls`), `None` for `lib.rs`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src/") {
        let path = entry.expect("reading src/").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules named as `crate::<name>` in `line`.
fn crate_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        // `$crate::` and names ending in `crate` (e.g. `subcrate::`) are not ours.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.push(name);
        }
    }
    found
}

#[test]
fn imports_only_point_down_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(own) = layer(&module) else {
            wrong.push(format!(
                "{}: module `{module}` has no layer; add it to tests/layers.rs and ARCHITECTURE.md",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("reading a source file");
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for target in crate_paths(line) {
                checked += 1;
                if target == module {
                    continue;
                }
                match layer(&target) {
                    Some(l) if l < own || (l == own && SHARED_LAYERS.contains(&l)) => {}
                    Some(l) => wrong.push(format!(
                        "{}:{}: `{module}` (layer {own}) imports `crate::{target}` (layer {l})",
                        file.display(),
                        n + 1
                    )),
                    // Items at the crate root (`crate::BoxFuture`, `crate::Result`) are
                    // capitalised and never match; a lowercase unknown name is a module
                    // this test does not know yet.
                    None => wrong.push(format!(
                        "{}:{}: `crate::{target}` has no layer; add it to tests/layers.rs",
                        file.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} crate paths seen: is the scan broken?"
    );
    assert!(
        wrong.is_empty(),
        "imports that do not point down:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_finds_upward_and_sideways_imports() {
    assert_eq!(crate_paths("use crate::lease::BoxFuture;"), ["lease"]);
    assert_eq!(
        crate_paths("x: crate::vault::Client, y: crate::error::Result"),
        ["vault", "error"]
    );
    assert!(crate_paths("$crate::foo and subcrate::bar").is_empty());
    // vault (2) → lease (3) is up; redis (5) → postgres (5) is sideways: both wrong.
    assert!(layer("lease") > layer("vault"));
    assert_eq!(layer("redis"), layer("postgres"));
    assert!(!SHARED_LAYERS.contains(&layer("redis").unwrap()));
}
