//! The module house rules of DESIGN.md, checked on the source: no import circles between
//! sibling modules (in `gateway/src` and `bench/src`), the wings `node` and `proxy` never
//! import each other, and the ground floor never imports the floors above it.
//!
//! The graph is read from the text: every `crate::a::b` and `super::` path (including those
//! inside `use crate::{a, b::{c}}` groups) names a module; an edge joins the two siblings
//! under the closest common ancestor of the file and the target. A child using its parent's
//! items (or the reverse) is no edge: that is how a module with children is built.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules that import nothing of ours from the floors above (DESIGN.md, "Module
/// dependencies").
const GROUND: &[&str] = &[
    "pg",
    "pki",
    "net",
    "admin",
    "ebpf",
    "pod",
    "route",
    "telemetry",
    "buffer_pool",
    "tunnel",
    "config",
    "identity",
];
/// What the ground floor must never import.
const ABOVE_GROUND: &[&str] = &[
    "policy", "upstream", "audit", "ca", "node", "proxy", "harness",
];

type Module = Vec<String>;

/// Every `.rs` file under `src` with its module path (`src/node/connection.rs` →
/// `["node", "connection"]`; `lib.rs`/`main.rs` → `[]`).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut m: Module = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if m == ["lib"] || m == ["main"] {
                    m.clear();
                }
                out.insert(m, path);
            }
        }
    }
    out
}

/// Source without comments and string literals, so that doc text naming a module is no
/// import.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = c;
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// The module paths a file refers to, as written (`crate::…` absolute, `super::…` resolved
/// from `from`).
fn references(from: &Module, text: &str) -> Vec<Module> {
    let code = code_only(text);
    let bytes: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let boundary = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        let (base, skip) = if boundary && rest.starts_with("crate::") {
            (Vec::new(), 7)
        } else if boundary && rest.starts_with("super::") {
            let mut base = from.clone();
            let mut j = i;
            while bytes[j..].iter().take(7).collect::<String>() == "super::" {
                base.pop();
                j += 7;
            }
            (base, j - i)
        } else {
            i += 1;
            continue;
        };
        i += skip;
        collect_paths(&bytes, &mut i, base, &mut out);
    }
    out
}

/// Reads `a::b::c` or `{a::b, c::{d}}` at `*i`, pushing each full path prefixed by `base`.
fn collect_paths(s: &[char], i: &mut usize, base: Module, out: &mut Vec<Module>) {
    let ident = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && (s[*i].is_alphanumeric() || s[*i] == '_') {
            *i += 1;
        }
        s[start..*i].iter().collect::<String>()
    };
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && s[*i].is_whitespace() {
            *i += 1;
        }
    };
    let mut path = base;
    loop {
        skip_ws(i);
        if *i < s.len() && s[*i] == '{' {
            *i += 1;
            loop {
                skip_ws(i);
                if *i >= s.len() || s[*i] == '}' {
                    *i += 1;
                    return;
                }
                collect_paths(s, i, path.clone(), out);
                skip_ws(i);
                if *i < s.len() && s[*i] == ',' {
                    *i += 1;
                }
            }
        }
        let name = ident(i);
        if name.is_empty() || name == "self" {
            out.push(path);
            return;
        }
        path.push(name);
        if s[*i..].iter().take(2).collect::<String>() == "::" {
            *i += 2;
        } else {
            out.push(path);
            return;
        }
    }
}

/// The longest prefix of `path` that is a module of the crate.
fn resolve(path: &Module, mods: &BTreeMap<Module, PathBuf>) -> Module {
    let mut p = path.clone();
    while !p.is_empty() && !mods.contains_key(&p) {
        p.pop();
    }
    p
}

/// Sibling edges: `(parent, from child, to child)`.
fn sibling_edges(src: &Path) -> BTreeSet<(Module, String, String)> {
    let mods = modules(src);
    let mut edges = BTreeSet::new();
    for (m, file) in &mods {
        let text = std::fs::read_to_string(file).unwrap();
        for r in references(m, &text) {
            let t = resolve(&r, &mods);
            let common = m.iter().zip(&t).take_while(|(a, b)| a == b).count();
            if common == m.len() || common == t.len() {
                continue; // the same module, a parent or a child
            }
            edges.insert((m[..common].to_vec(), m[common].clone(), t[common].clone()));
        }
    }
    edges
}

/// The sibling cycles, each as the modules it passes through.
fn cycles(edges: &BTreeSet<(Module, String, String)>) -> Vec<String> {
    let mut found = Vec::new();
    let parents: BTreeSet<&Module> = edges.iter().map(|(p, _, _)| p).collect();
    for parent in parents {
        let graph: BTreeMap<&str, Vec<&str>> = edges.iter().filter(|(p, _, _)| p == parent).fold(
            BTreeMap::new(),
            |mut g, (_, a, b)| {
                g.entry(a.as_str()).or_default().push(b.as_str());
                g
            },
        );
        for &start in graph.keys() {
            // Depth-first search for a path back to `start`.
            let mut stack = vec![(start, vec![start])];
            let mut seen = BTreeSet::new();
            while let Some((node, path)) = stack.pop() {
                for &next in graph.get(node).map(Vec::as_slice).unwrap_or(&[]) {
                    if next == start {
                        found.push(format!(
                            "{}: {} -> {start}",
                            parent.join("::"),
                            path.join(" -> ")
                        ));
                    } else if seen.insert(next) {
                        let mut p = path.clone();
                        p.push(next);
                        stack.push((next, p));
                    }
                }
            }
        }
    }
    found
}

fn crate_src(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
}

#[test]
fn gateway_has_no_import_circles() {
    let c = cycles(&sibling_edges(&crate_src("src")));
    assert!(
        c.is_empty(),
        "import circles in gateway/src:\n{}",
        c.join("\n")
    );
}

#[test]
fn bench_has_no_import_circles() {
    let c = cycles(&sibling_edges(&crate_src("../bench/src")));
    assert!(
        c.is_empty(),
        "import circles in bench/src:\n{}",
        c.join("\n")
    );
}

#[test]
fn wings_never_import_each_other() {
    let bad: Vec<_> = sibling_edges(&crate_src("src"))
        .into_iter()
        .filter(|(p, a, b)| {
            p.is_empty() && ((a == "node" && b == "proxy") || (a == "proxy" && b == "node"))
        })
        .collect();
    assert!(bad.is_empty(), "wing imports: {bad:?}");
}

#[test]
fn ground_floor_imports_nothing_above_it() {
    let bad: Vec<_> = sibling_edges(&crate_src("src"))
        .into_iter()
        .filter(|(p, a, b)| {
            p.is_empty() && GROUND.contains(&a.as_str()) && ABOVE_GROUND.contains(&b.as_str())
        })
        .collect();
    assert!(bad.is_empty(), "ground floor importing upward: {bad:?}");
}

/// The reader itself: a circle written the ways our code writes imports is found, and
/// parent/child references are not edges.
#[test]
fn the_checker_finds_a_planted_circle() {
    let dir = std::env::temp_dir().join(format!("dbgw-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("wing")).unwrap();
    let write = |p: &str, s: &str| std::fs::write(dir.join(p), s).unwrap();
    write("lib.rs", "pub mod a;\npub mod b;\npub mod wing;\n");
    write(
        "a.rs",
        "use crate::{b::Thing, wing};\n// crate::wing::x in a comment\n",
    );
    write(
        "b.rs",
        "pub struct Thing;\nfn f() { let _ = \"crate::a\"; }\n",
    );
    write("wing.rs", "mod one;\nmod two;\n");
    write("wing/one.rs", "use super::two::X;\nuse super::Y;\n");
    write("wing/two.rs", "fn f() -> super::one::Z { todo!() }\n");
    let edges = sibling_edges(&dir);
    assert!(edges.contains(&(vec![], "a".into(), "b".into())));
    assert!(edges.contains(&(vec![], "a".into(), "wing".into())));
    assert!(
        !edges.iter().any(|(_, a, _)| a == "b"),
        "comment or string taken as import: {edges:?}"
    );
    let c = cycles(&edges);
    assert_eq!(
        c,
        vec!["wing: one -> two -> one", "wing: two -> one -> two"],
        "{edges:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
