//! Which rules a check could match, found in time that does not grow with the number of
//! rules: each rule is filed under its host (or "any host"), then under its exact path if
//! it has one (a `path`, or a glob without `*`), else under the longest literal every path
//! it matches starts with (its prefix, or its glob up to the first `*`). A check looks up
//! its path among the exact ones and walks the literals along its path, in its own host's
//! index and the any-host one: the candidates, in configuration order. The
//! caller still asks each candidate [`crate::rules::Rule::applies_to`]; the index only
//! leaves out rules that cannot match.

use std::collections::HashMap;

use crate::check::Check;
use crate::rules::RuleMatch;

/// The rules of one configuration, by host and path literal. Built once per configuration.
#[derive(Debug, Clone, Default)]
pub struct RuleIndex {
    any_host: PathIndex,
    /// Hosts in lower case (a rule's host matches ASCII case-insensitively).
    by_host: HashMap<String, PathIndex>,
}

/// The rules of one host (or of any host) by path.
#[derive(Debug, Clone, Default)]
struct PathIndex {
    exact: HashMap<String, Vec<u32>>,
    literals: LiteralTree,
}

impl PathIndex {
    fn insert(&mut self, matcher: &RuleMatch, rule: u32) {
        match exact_path(matcher) {
            Some(path) => self.exact.entry(path.to_owned()).or_default().push(rule),
            None => self.literals.insert(path_literal(matcher).as_bytes(), rule),
        }
    }

    /// Appends the rules that could match `path`, in ascending order.
    fn collect(&self, path: &str, found: &mut Vec<u32>) {
        let start = found.len();
        let exact = (!self.exact.is_empty())
            .then(|| self.exact.get(path))
            .flatten();
        if let Some(rules) = exact {
            found.extend_from_slice(rules);
        }
        self.literals.collect(path.as_bytes(), found);
        if let Some(collected) = found.get_mut(start..) {
            collected.sort_unstable();
        }
    }
}

impl RuleIndex {
    /// Files the rules' matches by position: candidates are positions in `matchers`.
    pub fn new<'a>(matchers: impl IntoIterator<Item = &'a RuleMatch>) -> RuleIndex {
        let mut index = RuleIndex::default();
        for (position, matcher) in matchers.into_iter().enumerate() {
            let Ok(position) = u32::try_from(position) else {
                break;
            };
            let tree = match &matcher.host {
                Some(host) => index.by_host.entry(host.to_ascii_lowercase()).or_default(),
                None => &mut index.any_host,
            };
            tree.insert(matcher, position);
        }
        index
    }

    /// The positions of the rules `check` could match, ascending (configuration order).
    pub fn candidates(&self, check: &Check) -> Vec<u32> {
        let mut found = Vec::new();
        let path = check.path.as_str();
        self.any_host.collect(path, &mut found);
        // Most configurations name no host (and the filter's index is often empty): no
        // hashing for a lookup that cannot find anything.
        let host_tree = if self.by_host.is_empty() {
            None
        } else if check.host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&check.host.to_ascii_lowercase())
        } else {
            self.by_host.get(check.host.as_str())
        };
        if let Some(tree) = host_tree {
            let from_any_host = found.len();
            tree.collect(path, &mut found);
            if from_any_host > 0 && found.len() > from_any_host {
                found.sort_unstable();
            }
        }
        found
    }
}

/// The one path the match selects, if it names one.
fn exact_path(matcher: &RuleMatch) -> Option<&str> {
    matcher.path.as_deref().or_else(|| {
        matcher
            .path_glob
            .as_deref()
            .filter(|glob| !glob.contains('*'))
    })
}

/// The longest text every path the match selects starts with ("" when any path will do),
/// for a match without an exact path.
fn path_literal(matcher: &RuleMatch) -> &str {
    let glob_literal = matcher
        .path_glob
        .as_deref()
        .map(|glob| glob.split('*').next().unwrap_or(""));
    [matcher.path_prefix.as_deref(), glob_literal]
        .into_iter()
        .flatten()
        .max_by_key(|literal| literal.len())
        .unwrap_or("")
}

/// A byte trie of path literals; each node holds the rules filed under the literal that
/// ends there, in the order they were filed.
#[derive(Debug, Clone)]
struct LiteralTree {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// By byte, sorted.
    children: Vec<(u8, u32)>,
    rules: Vec<u32>,
}

impl Default for LiteralTree {
    fn default() -> Self {
        LiteralTree {
            nodes: vec![Node::default()],
        }
    }
}

impl LiteralTree {
    fn insert(&mut self, literal: &[u8], rule: u32) {
        let mut at = 0usize;
        for &byte in literal {
            at = match self.child(at, byte) {
                Some(child) => child,
                None => {
                    let child = self.nodes.len();
                    let Ok(child_id) = u32::try_from(child) else {
                        return;
                    };
                    self.nodes.push(Node::default());
                    if let Some(node) = self.nodes.get_mut(at) {
                        let slot = node.children.partition_point(|&(b, _)| b < byte);
                        node.children.insert(slot, (byte, child_id));
                    }
                    child
                }
            };
        }
        if let Some(node) = self.nodes.get_mut(at) {
            node.rules.push(rule);
        }
    }

    fn child(&self, at: usize, byte: u8) -> Option<usize> {
        let children = &self.nodes.get(at)?.children;
        let slot = children.binary_search_by_key(&byte, |&(b, _)| b).ok()?;
        children.get(slot).map(|&(_, child)| child as usize)
    }

    /// Appends the rules filed under every prefix of `path` (the empty one too).
    fn collect(&self, path: &[u8], found: &mut Vec<u32>) {
        let mut at = 0usize;
        let mut rest = path.iter();
        while let Some(node) = self.nodes.get(at) {
            found.extend_from_slice(&node.rules);
            match rest.next().and_then(|&byte| self.child(at, byte)) {
                Some(next) => at = next,
                None => break,
            }
        }
    }
}
