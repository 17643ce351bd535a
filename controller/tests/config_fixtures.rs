//! One bad configuration file per error the controller can find in one
//! (`tests/invalid-config/*.toml`), each headed by the exact error an operator is told:
//!
//! ```toml
//! # expect: rules[0].window: is required by fixed_window
//! ```
//!
//! Every file goes through [`file::load`], as `--config` does (parse, normalize, validate),
//! and the error it gives (`<path>: <field>: <message>`, without the path) must be the one
//! the file expects, exactly.

use std::path::{Path, PathBuf};

use sluice_controller::config::file::{self, Format};

const EXPECT: &str = "# expect: ";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid-config")
}

fn fixtures() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("tests/invalid-config exists")
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    paths.sort();
    paths
}

/// What the file's first line says the error is.
fn expected(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("the fixture reads");
    let first = text.lines().next().unwrap_or_default();
    first
        .strip_prefix(EXPECT)
        .unwrap_or_else(|| {
            panic!(
                "{}: the first line must be `{EXPECT}<field>: <message>`",
                path.display()
            )
        })
        .to_owned()
}

/// The error `load` gives for the file, without the path it starts with.
fn error_of(path: &Path) -> String {
    match file::load(path) {
        Ok(document) => format!("(no error: it loaded as {document:?})"),
        Err(error) => {
            let shown = format!("{}: ", path.display());
            error
                .strip_prefix(&shown)
                .unwrap_or_else(|| panic!("the error does not start with the path: {error:?}"))
                .to_owned()
        }
    }
}

#[test]
fn every_invalid_file_is_refused_with_its_exact_error() {
    let paths = fixtures();
    let mut wrong = Vec::new();
    for path in &paths {
        assert_eq!(
            path.extension().and_then(|e| e.to_str()),
            Some("toml"),
            "only .toml fixtures here: {}",
            path.display()
        );
        let (expected, actual) = (expected(path), error_of(path));
        if expected != actual {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            wrong.push(format!(
                "{name}\n  expected: {expected}\n  actual:   {actual}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} fixtures gave another error:\n{}",
        wrong.len(),
        paths.len(),
        wrong.join("\n")
    );
}

/// Each fixture is about one error: without its bad part (the lines marked `# bad`), the
/// same file loads. A fixture that is wrong in two ways would hide the second.
#[test]
fn each_fixture_is_wrong_in_one_place_only() {
    let scratch = std::env::temp_dir().join(format!("sluice-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("a scratch directory");
    let mut problems = Vec::new();
    for path in fixtures() {
        let text = std::fs::read_to_string(&path).expect("the fixture reads");
        if !text.contains("# bad") {
            problems.push(format!("{}: no line is marked `# bad`", path.display()));
            continue;
        }
        let fixed: String = text
            .lines()
            .filter_map(|line| match line.split_once("# bad") {
                // `# bad: <replacement>` puts the replacement in the line's place.
                Some((_, rest)) => rest.strip_prefix(": ").map(str::to_owned),
                None => Some(line.to_owned()),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let copy = scratch.join(path.file_name().unwrap_or_default());
        std::fs::write(&copy, &fixed).expect("the scratch copy is written");
        if let Err(error) = file::load(&copy) {
            problems.push(format!(
                "{}: still refused without its bad part: {error}",
                path.display()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_valid_file_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo-rules.toml");
    file::load(&path).unwrap_or_else(|e| panic!("{e}"));
}

/// The schema is the same in every format, and so are its errors: a fixture that parses
/// (its error is found by validation), written as YAML and as JSON, is refused with the same
/// field and message.
#[test]
fn yaml_and_json_files_are_refused_the_same_way() {
    let scratch = std::env::temp_dir().join(format!("sluice-formats-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("a scratch directory");
    let mut compared = 0;
    let mut wrong = Vec::new();
    for path in fixtures() {
        let text = std::fs::read_to_string(&path).expect("the fixture reads");
        let Ok(document) = file::parse(&text, Format::Toml) else {
            continue; // a parse error: its wording is the parser's own
        };
        for (format, extension) in [(Format::Yaml, "yaml"), (Format::Json, "json")] {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let copy = scratch.join(format!("{stem}.{extension}"));
            let written = file::render(&document, format).expect("the document renders");
            std::fs::write(&copy, written).expect("the copy is written");
            let error = file::load(&copy).expect_err("the copy is refused too");
            let error = error
                .strip_prefix(&format!("{}: ", copy.display()))
                .unwrap_or(&error)
                .to_owned();
            if error != expected(&path) {
                wrong.push(format!("{stem}.{extension}: {error}"));
            }
            compared += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(compared >= 60, "only {compared} files compared");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A TOML syntax error says where it is, as the YAML and JSON parsers' errors do (and as
/// this controller's TOML errors did before the configuration moved to `config::file`):
/// in a long file, "key with no value" alone does not find the mistake.
#[test]
fn a_toml_syntax_error_names_its_line() {
    let path = fixture_dir().join("parse-syntax-error.toml");
    let error = file::load(&path).expect_err("refused");
    assert!(error.contains("line 6"), "{error}");
}

#[test]
fn a_file_that_is_not_toml_yaml_or_json_is_refused_by_its_name() {
    let path = fixture_dir().join("rule-window-missing.toml");
    let ini = std::env::temp_dir().join(format!("sluice-{}.ini", std::process::id()));
    std::fs::copy(&path, &ini).expect("copied");
    let error = file::load(&ini).expect_err("refused");
    let _ = std::fs::remove_file(&ini);
    assert_eq!(
        error,
        format!(
            "{}: the file must end in .toml, .yaml, .yml or .json",
            ini.display()
        )
    );
    let missing = fixture_dir().join("no-such-file.toml");
    let error = file::load(&missing).expect_err("refused");
    assert!(
        error.starts_with(&format!("cannot read {}: ", missing.display())),
        "{error}"
    );
}
