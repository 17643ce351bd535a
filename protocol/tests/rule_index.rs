//! The rule index returns exactly the rules a scan of every rule returns, in the same
//! order, for random rule sets and requests; and it leaves out the rules that cannot match.

use proptest::prelude::*;
use serde_json::{json, Value};
use sluice_protocol::check::Check;
use sluice_protocol::rule_index::RuleIndex;
use sluice_protocol::rules::Rule;

/// Small alphabets, so that random rules and requests often meet.
const HOSTS: [&str; 4] = ["a.test", "A.Test", "b.test", "c.test"];
const PIECES: [&str; 6] = ["/", "a", "b", "ab", "/x", "-"];
const GLOB_PIECES: [&str; 8] = ["/", "a", "b", "ab", "/x", "-", "*", "**"];

fn text(pieces: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(pieces), 0..5).prop_map(|parts| parts.concat())
}

fn rule_match() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::sample::select(&HOSTS[..])),
        prop::option::of(text(&PIECES)),
        prop::option::of(text(&PIECES)),
        prop::option::of(text(&GLOB_PIECES)),
        prop::sample::subsequence(vec!["GET", "post"], 0..=2),
        prop::sample::subsequence(vec!["default", "pro"], 0..=1),
        prop::option::of(prop::option::of(prop::sample::select(vec!["1", "2"]))),
    )
        .prop_map(|(host, path, prefix, glob, methods, tiers, header)| {
            let mut matcher = serde_json::Map::new();
            let mut put = |name: &str, value: Value| {
                matcher.insert(name.to_owned(), value);
            };
            if let Some(host) = host {
                put("host", json!(host));
            }
            if let Some(path) = path {
                put("path", json!(path));
            }
            if let Some(prefix) = prefix {
                put("path_prefix", json!(prefix));
            }
            if let Some(glob) = glob {
                put("path_glob", json!(glob));
            }
            if !methods.is_empty() {
                put("methods", json!(methods));
            }
            if !tiers.is_empty() {
                put("tiers", json!(tiers));
            }
            if let Some(value) = header {
                put("headers", json!([{ "name": "X-A", "value": value }]));
            }
            Value::Object(matcher)
        })
}

fn check() -> impl Strategy<Value = Check> {
    (
        prop::sample::select(&HOSTS[..]),
        prop::sample::select(vec!["GET", "POST", "get"]),
        text(&PIECES),
        prop::option::of(prop::sample::select(vec!["pro", "free"])),
        prop::option::of(prop::sample::select(vec!["1", "2"])),
    )
        .prop_map(|(host, method, path, tier, header)| {
            let headers = header.map_or_else(|| json!({}), |value| json!({ "x-a": value }));
            serde_json::from_value(json!({
                "client": { "kind": "ip", "value": "192.0.2.1" },
                "host": host, "method": method, "path": path,
                "tier": tier, "headers": headers,
            }))
            .expect("a check")
        })
}

fn rules(matches: Vec<Value>) -> Vec<Rule> {
    matches
        .into_iter()
        .enumerate()
        .map(|(n, matcher)| {
            serde_json::from_value(json!({
                "name": format!("r{n}"), "limit": 10, "window": "1s", "match": matcher,
            }))
            .expect("a rule")
        })
        .collect()
}

fn by_index<'r>(index: &RuleIndex, rules: &'r [Rule], check: &Check) -> Vec<&'r str> {
    let candidates = index.candidates(check);
    assert!(
        candidates.windows(2).all(|pair| pair[0] < pair[1]),
        "candidates ascend, each once: {candidates:?}"
    );
    candidates
        .into_iter()
        .map(|position| &rules[position as usize])
        .filter(|rule| rule.applies_to(check))
        .map(|rule| rule.name.as_str())
        .collect()
}

fn by_scan<'r>(rules: &'r [Rule], check: &Check) -> Vec<&'r str> {
    rules
        .iter()
        .filter(|rule| rule.applies_to(check))
        .map(|rule| rule.name.as_str())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn the_index_finds_what_a_scan_finds(
        matches in prop::collection::vec(rule_match(), 0..40),
        checks in prop::collection::vec(check(), 1..20),
    ) {
        let rules = rules(matches);
        let index = RuleIndex::new(rules.iter().map(|rule| &rule.matcher));
        for check in &checks {
            prop_assert_eq!(by_index(&index, &rules, check), by_scan(&rules, check), "{:?}", check);
        }
    }
}

fn get(host: &str, path: &str) -> Check {
    serde_json::from_value(json!({
        "client": { "kind": "ip", "value": "192.0.2.1" },
        "host": host, "method": "GET", "path": path,
    }))
    .expect("a check")
}

/// Among 10,000 rules, each for its own path or host, a request is offered the few that
/// could match it, not all of them.
#[test]
fn ten_thousand_rules_offer_a_request_only_its_own() {
    let mut matches: Vec<Value> = (0..4_000)
        .map(|n| json!({ "path": format!("/api/items/{n}") }))
        .collect();
    matches.extend((0..3_000).map(|n| json!({ "path_prefix": format!("/teams/{n}/") })));
    matches.extend(
        (0..2_999).map(|n| json!({ "host": format!("h{n}.test"), "path_glob": "/v1/*/x" })),
    );
    matches.push(json!({}));
    let rules = rules(matches);
    let index = RuleIndex::new(rules.iter().map(|rule| &rule.matcher));
    // Candidates: the rule for the request's exact path, those filed under a prefix of its
    // path, those of its host, and the rule for all.
    let cases = [
        (
            get("any.test", "/api/items/3210"),
            vec!["r3210", "r9999"],
            2,
        ),
        (
            get("any.test", "/teams/17/members"),
            vec!["r4017", "r9999"],
            2,
        ),
        (get("H42.test", "/v1/users/x"), vec!["r7042", "r9999"], 2),
        (get("any.test", "/api/items/3210/more"), vec!["r9999"], 1),
        (get("any.test", "/elsewhere"), vec!["r9999"], 1),
    ];
    for (check, expected, candidates) in cases {
        assert_eq!(by_index(&index, &rules, &check), expected, "{check:?}");
        assert_eq!(by_scan(&rules, &check), expected, "{check:?}");
        assert_eq!(index.candidates(&check).len(), candidates, "{check:?}");
    }
}
