//! The daemon's files stay rooms, not a knot: no module below the command line imports it, no
//! two modules import each other (directly or round a circle), and no file grows past what a
//! reader takes in at once. Read from the sources: every `crate::module` a file names outside
//! its comments and its `#[cfg(test)]` module (tests may use anything).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Longest file in `daemon/src`, in lines (issue 16: "no file over ~600 lines").
const MAX_LINES: usize = 600;

/// The modules that may name the CLI: itself, the binary and the library root.
const CLI_USERS: [&str; 3] = ["cli", "main", "lib"];

/// Every daemon source file: module name → its text.
fn sources() -> BTreeMap<String, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The modules of this crate that `text` names (`crate::x`, `crate::{x, y::z}`), outside
/// comments and the test module.
fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first identifier of each top-level item: `b::{X, Y}, c` names b and c.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    sources()
        .iter()
        .map(|(name, text)| (name.clone(), imports(text)))
        .collect()
}

#[test]
fn the_parser_reads_use_lines_and_paths() {
    let text = "use crate::a;\nuse crate::{b::{X, Y}, c, d::e};\n// crate::commented\n\
                fn f() { crate::g::h(); }\n#[cfg(test)]\nmod tests { use crate::t; }";
    let got: Vec<_> = imports(text).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "d", "g"]);
}

#[test]
fn only_the_command_line_knows_the_command_line() {
    for (module, deps) in graph() {
        if !CLI_USERS.contains(&module.as_str()) {
            assert!(
                !deps.contains("cli"),
                "daemon/src/{module}.rs imports the CLI: take a DeviceConfig (config.rs) or \
                 plain values instead"
            );
        }
    }
}

#[test]
fn no_import_cycle_between_daemon_modules() {
    let graph = graph();
    // Depth-first search; a module met again while on the current path closes a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            panic!("import cycle: {}", cycle.join(" -> "));
        }
        path.push(m.to_string());
        for dep in graph.get(m).into_iter().flatten() {
            // `lib` declares every module; the others name modules, never the root.
            if graph.contains_key(dep) && dep != "lib" {
                visit(dep, graph, path, done);
            }
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut vec![], &mut done);
    }
}

#[test]
fn no_file_is_too_long_to_read_as_one_room() {
    for (module, text) in sources() {
        let lines = text.lines().count();
        assert!(
            lines <= MAX_LINES,
            "daemon/src/{module}.rs has {lines} lines (at most {MAX_LINES}): split it by job"
        );
    }
}
