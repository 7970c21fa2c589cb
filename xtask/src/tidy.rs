//! Repository rules, run as tests (`cargo xtask test` runs them with the rest).

use std::path::{Path, PathBuf};

use crate::torch::{TCH_VERSION, TORCH_VERSION};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// The torch version that each tch release was built against (tch's README / torch-sys build.rs).
fn torch_for_tch(tch: &str) -> Option<&'static str> {
    match tch {
        "0.26.0" => Some("2.13.0"),
        "0.25.0" => Some("2.12.0"),
        "0.24.0" => Some("2.11.0"),
        _ => None,
    }
}

#[test]
fn tch_pin_and_installed_torch_agree() {
    let manifest = read("Cargo.toml");
    let pin = format!("tch = \"={TCH_VERSION}\"");
    assert!(
        manifest.contains(&pin),
        "Cargo.toml must pin {pin} (xtask/src/torch.rs says tch {TCH_VERSION})"
    );
    let sys = format!("torch-sys = \"={TCH_VERSION}\"");
    assert!(
        manifest.contains(&sys),
        "Cargo.toml must pin {sys} to the same version as tch"
    );
    assert_eq!(
        torch_for_tch(TCH_VERSION),
        Some(TORCH_VERSION),
        "xtask installs torch {TORCH_VERSION}, but tch {TCH_VERSION} expects another version"
    );
    // The lock file, when present, must hold the pinned version.
    if let Ok(lock) = std::fs::read_to_string(root().join("Cargo.lock")) {
        let entry = format!("name = \"tch\"\nversion = \"{TCH_VERSION}\"");
        assert!(
            lock.contains(&entry),
            "Cargo.lock does not resolve tch to {TCH_VERSION}"
        );
    }
    // mtkd doctor reports the same tch version.
    let doctor = read("crates/engine/src/doctor.rs");
    assert!(
        doctor.contains(&format!("TCH_VERSION: &str = \"{TCH_VERSION}\"")),
        "doctor.rs TCH_VERSION disagrees"
    );
}

/// The workspace's library crates (folders under `crates/`); `cli` is the application.
const LIBRARY_CRATES: [&str; 9] = [
    "dist",
    "distill-core",
    "teachers",
    "student",
    "rl-weighting",
    "vision-tasks",
    "records",
    "report",
    "engine",
];

fn dependency_names(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_deps = l.contains("dependencies");
            if let Some(name) = l
                .strip_prefix("[dependencies.")
                .or_else(|| l.strip_prefix("[dev-dependencies."))
            {
                out.push(name.trim_end_matches(']').to_owned());
            }
            continue;
        }
        if in_deps {
            if let Some((name, _)) = l.split_once('=') {
                let name = name.trim().split('.').next().unwrap_or_default().to_owned();
                if !name.is_empty() && !name.starts_with('#') {
                    out.push(name);
                }
            }
        }
    }
    out
}

#[test]
fn xtask_never_links_libtorch_or_workspace_crates() {
    let deps = dependency_names(&read("xtask/Cargo.toml"));
    for d in &deps {
        assert!(
            d != "tch" && d != "torch-sys" && !d.starts_with("mtkd-"),
            "xtask must build before libtorch exists, but it depends on `{d}`"
        );
    }
}

#[test]
fn library_crates_respect_the_dependency_rules() {
    // Among workspace crates: teachers, student and rl-weighting depend on distill-core only,
    // vision-tasks on distill-core, records and dist (the loader's shards); distill-core,
    // records and dist on none; report on records only; the engine sees every library crate;
    // the CLI is the engine's only user in the workspace.
    let allowed: [(&str, &[&str]); 8] = [
        ("dist", &[]),
        ("teachers", &["mtkd-distill-core"]),
        ("student", &["mtkd-distill-core"]),
        ("rl-weighting", &["mtkd-distill-core"]),
        (
            "vision-tasks",
            &["mtkd-distill-core", "mtkd-records", "mtkd-dist"],
        ),
        ("records", &[]),
        ("report", &["mtkd-records"]),
        (
            "engine",
            &[
                "mtkd-distill-core",
                "mtkd-teachers",
                "mtkd-student",
                "mtkd-rl-weighting",
                "mtkd-vision-tasks",
                "mtkd-records",
                "mtkd-report",
                "mtkd-dist",
            ],
        ),
    ];
    for (c, ok) in allowed {
        let deps = dependency_names(&read(&format!("crates/{c}/Cargo.toml")));
        for d in deps.iter().filter(|d| d.starts_with("mtkd-")) {
            assert!(
                ok.contains(&d.as_str()),
                "crates/{c} must not depend on {d} (see docs/ARCHITECTURE.md)"
            );
        }
    }
    let core = dependency_names(&read("crates/distill-core/Cargo.toml"));
    assert!(
        core.iter().all(|d| !d.starts_with("mtkd-")),
        "distill-core depends on no workspace crate"
    );
    // Records and their views build without libtorch: cheap to change and to test.
    for c in ["records", "report"] {
        let deps = dependency_names(&read(&format!("crates/{c}/Cargo.toml")));
        assert!(
            deps.iter().all(|d| d != "tch" && d != "torch-sys"),
            "crates/{c} must build without libtorch, but depends on tch or torch-sys"
        );
    }
    // The terminal belongs to the binary: argument parsing, progress bars, signal handlers and
    // the log subscriber live in mtkd-cli; libraries return errors and emit tracing events.
    for c in LIBRARY_CRATES {
        let deps = dependency_names(&read(&format!("crates/{c}/Cargo.toml")));
        for d in ["clap", "indicatif", "ctrlc", "tracing-subscriber"] {
            assert!(
                !deps.iter().any(|x| x == d),
                "crates/{c} must not depend on {d}: the terminal is mtkd-cli's"
            );
        }
    }
}

/// The top-level modules of a crate's `src/` (`a.rs` or `a/mod.rs`) and, for each, the other
/// top-level modules its files name through `crate::` paths (test modules excluded).
fn module_graph(
    src: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let module_of = |f: &Path| -> Option<String> {
        let rel = f.strip_prefix(src).ok()?;
        let first = rel
            .components()
            .next()?
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        let name = first.trim_end_matches(".rs").to_owned();
        (name != "lib" && name != "main" && name != "bin").then_some(name)
    };
    let mods: std::collections::BTreeSet<String> =
        files.iter().filter_map(|f| module_of(f)).collect();
    let mut graph = std::collections::BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(f) else { continue };
        let text = std::fs::read_to_string(f).unwrap_or_default();
        // Code before the first test module, comments (doc links) left out.
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let entry: &mut std::collections::BTreeSet<String> = graph.entry(m.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}`: every name in the braces.
            let names: Vec<String> = if rest.starts_with('{') {
                rest[1..rest.find('}').unwrap_or(1)]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or_default().to_owned())
                    .collect()
            } else {
                vec![name]
            };
            for n in names {
                if n != m && mods.contains(&n) {
                    entry.insert(n);
                }
            }
        }
    }
    graph
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    for c in LIBRARY_CRATES.iter().chain(&["cli"]) {
        let graph = module_graph(&root().join(format!("crates/{c}/src")));
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "crates/{c}: the modules {} import each other in a cycle (see docs/ARCHITECTURE.md)",
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn the_cycle_check_finds_a_cycle_and_accepts_a_tree() {
    let g = |edges: &[(&str, &str)]| {
        let mut m: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        for (a, b) in edges {
            m.entry((*a).to_owned())
                .or_default()
                .insert((*b).to_owned());
            m.entry((*b).to_owned()).or_default();
        }
        m
    };
    assert_eq!(
        find_cycle(&g(&[
            ("data", "detection"),
            ("detection", "loader"),
            ("loader", "data")
        ])),
        Some(vec![
            "data".into(),
            "detection".into(),
            "loader".into(),
            "data".into()
        ])
    );
    assert_eq!(find_cycle(&g(&[("a", "b"), ("a", "c"), ("b", "c")])), None);
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    text_files(dir, &[".rs"], out);
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files);
    rust_files(&root().join("xtask"), &mut files);
    assert!(files.len() > 10, "found only {} Rust files", files.len());
    let mut missing = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        if !text.trim_start().starts_with("//!") {
            missing.push(f.strip_prefix(root()).unwrap_or(&f).display().to_string());
        }
    }
    // build-support/link_libtorch.rs is `include!`d by build scripts, where `//!` is not allowed;
    // it is outside crates/ and xtask/ and so not checked here.
    assert!(
        missing.is_empty(),
        "files without a leading `//!` line: {missing:?}"
    );
}

#[test]
fn ci_runs_the_readme_test_command() {
    let readme = read("README.md");
    let ci = read(".ci/run");
    assert!(
        readme.contains("cargo xtask test"),
        "README must give `cargo xtask test`"
    );
    assert!(
        ci.contains("cargo xtask test"),
        ".ci/run must run the README's test command"
    );
}

/// Text files under `dir` with one of `exts` (skipping `target` and hidden folders).
fn text_files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                text_files(&p, exts, out);
            }
        } else if exts.iter().any(|x| name.ends_with(x)) {
            out.push(p);
        }
    }
}

/// 1-based line number of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// Every doc path that starts with `docs/` (not inside a longer path or a URL), as
/// `(line, path)`. A trailing full stop (end of sentence) is not part of the path.
fn doc_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("docs/") {
        if text[..at].chars().next_back().is_some_and(is_path_char) {
            continue;
        }
        let run: String = text[at..]
            .chars()
            .take_while(|&c| is_path_char(c))
            .collect();
        let path = run.trim_end_matches('.');
        if path.ends_with(".md") {
            out.push((line_of(text, at), path.to_owned()));
        }
    }
    out
}

/// Bare `<name>.md` mentions (no folder), as `(line, file name)`: in a file of docs/ they name a
/// sibling.
fn bare_md_names(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices(".md") {
        let after = text[at + 3..].chars().next();
        if after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `.mdx`, `.md5`, ...
        }
        let before = &text[..at];
        let stem_len: usize = before
            .chars()
            .rev()
            .take_while(|&c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
            .map(char::len_utf8)
            .sum();
        let start = at - stem_len;
        let prefixed = before[..start]
            .chars()
            .next_back()
            .is_some_and(is_path_char);
        if stem_len > 0 && !prefixed {
            out.push((line_of(text, start), format!("{}.md", &text[start..at])));
        }
    }
    out
}

/// After `METHOD.md`: skip spaces and, across a line break, a comment leader (`//!`, `///`,
/// `//`, `#`), so that a citation wrapped over two comment lines is still read.
fn skip_gap(s: &str) -> &str {
    let trimmed = s.trim_start();
    if !s[..s.len() - trimmed.len()].contains('\n') {
        return trimmed;
    }
    for leader in ["//!", "///", "//", "#"] {
        if let Some(rest) = trimmed.strip_prefix(leader) {
            return rest.trim_start();
        }
    }
    trimmed
}

/// A section number at the start of `s` (`7` or `7.2`, giving 7), and the rest.
fn section_number(s: &str) -> Option<(u32, &str)> {
    let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let n = s[..digits].parse().ok()?;
    let mut rest = &s[digits..];
    if let Some(sub) = rest.strip_prefix('.') {
        if sub.starts_with(|c: char| c.is_ascii_digit()) {
            rest = sub.trim_start_matches(|c: char| c.is_ascii_digit());
        }
    }
    Some((n, rest))
}

/// The sections a citation names, read from the text right after `METHOD.md`: `section 3`,
/// `sections 2 and 4`, `sections 2, 3 and 8`, `sections 1-3`, `§9`, `7.2`. Empty when the text
/// cites no section.
fn cited_sections(after: &str) -> Vec<u32> {
    let s = skip_gap(after);
    let s = if let Some(r) = s
        .strip_prefix("sections")
        .or_else(|| s.strip_prefix("section"))
    {
        r.trim_start()
    } else if let Some(r) = s.strip_prefix('§') {
        r.trim_start_matches('§').trim_start()
    } else {
        s
    };
    let mut out = Vec::new();
    let Some((mut last, mut rest)) = section_number(s) else {
        return out;
    };
    out.push(last);
    loop {
        if let Some((to, r)) = rest.strip_prefix(['-', '–']).and_then(section_number) {
            out.extend(last + 1..=to);
            (last, rest) = (to, r);
            continue;
        }
        let next = [", ", " and ", ", and "]
            .iter()
            .find_map(|sep| rest.strip_prefix(sep))
            .and_then(section_number);
        match next {
            Some((n, r)) => {
                out.push(n);
                (last, rest) = (n, r);
            }
            None => return out,
        }
    }
}

/// Every `## N.` heading of a markdown text.
fn numbered_headings(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.strip_prefix("## "))
        .filter_map(|h| section_number(h).filter(|(_, rest)| rest.starts_with('.')))
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn cited_docs_exist() {
    let root = root();
    let exts = [".rs", ".py", ".toml", ".md"];
    let mut files = vec![root.join("README.md")];
    for dir in ["crates", "xtask", "scripts", "configs", "docs"] {
        text_files(&root.join(dir), &exts, &mut files);
    }
    assert!(
        files.len() > 20,
        "found only {} files to check",
        files.len()
    );
    let sections = std::fs::read_to_string(root.join("docs/METHOD.md"))
        .map(|t| numbered_headings(&t))
        .unwrap_or_default();
    // Built from pieces so that this file does not match itself.
    let private = [concat!("..", "/shared"), concat!("shared", "/docs")];
    let mut problems = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap_or(f).display().to_string();
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"));
        // A file directly in docs/ may name its siblings without the folder.
        let in_docs = f.parent() == Some(root.join("docs").as_path());
        let mut targets = doc_paths(&text);
        if in_docs {
            targets.extend(
                bare_md_names(&text)
                    .into_iter()
                    .map(|(l, n)| (l, format!("docs/{n}"))),
            );
        }
        for (line, target) in targets {
            if !root.join(&target).is_file() {
                problems.push(format!(
                    "{rel}:{line}: cites {target}, which does not exist"
                ));
            }
        }
        let needle = if in_docs {
            "METHOD.md"
        } else {
            "docs/METHOD.md"
        };
        for (at, _) in text.match_indices(needle) {
            let line = line_of(&text, at);
            for n in cited_sections(&text[at + needle.len()..]) {
                if !sections.contains(&n) {
                    problems.push(format!(
                        "{rel}:{line}: cites docs/METHOD.md section {n}, but it has no `## {n}.` heading"
                    ));
                }
            }
        }
        for p in private {
            for (at, _) in text.match_indices(p) {
                problems.push(format!(
                    "{rel}:{}: mentions `{p}`: the team's private folder is not part of the repo",
                    line_of(&text, at)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "broken doc citations:\n{}",
        problems.join("\n")
    );
}

#[test]
fn citation_parser_reads_the_forms_in_use() {
    assert_eq!(cited_sections(" section 7, defect 1"), [7]);
    assert_eq!(cited_sections(" sections 8 and 10)"), [8, 10]);
    assert_eq!(cited_sections(" sections 2, 3 and 8 with"), [2, 3, 8]);
    assert_eq!(cited_sections(" sections 1-3, written"), [1, 2, 3]);
    assert_eq!(cited_sections(" section 7.2)."), [7]);
    assert_eq!(cited_sections(" 7.2). Both"), [7]);
    assert_eq!(cited_sections(" §9) keep"), [9]);
    assert_eq!(cited_sections("\n//! section 12: a"), [12]);
    assert!(cited_sections(" says not to").is_empty());
    assert!(cited_sections(" (and the EBKD paper)").is_empty());
    assert_eq!(
        doc_paths("see docs/AGENT.md. and https://x.org/docs/NO.md"),
        [(1, "docs/AGENT.md".to_owned())]
    );
    assert_eq!(
        bare_md_names("METHOD.md §1 and docs/AGENT.md"),
        [(1, "METHOD.md".to_owned())]
    );
    assert_eq!(
        numbered_headings("# t\n## 1. A\n## 10. B\n### 10.1 C\n## Notes"),
        [1, 10]
    );
}
