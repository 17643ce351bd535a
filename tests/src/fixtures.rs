//! Rules shared by the exactness tests (controller-level and through Envoy).

/// (strategy, its rule's fields, the path its rule matches, requests it must admit out of a
/// concurrent burst). Windows are long enough that nothing refills or resets while a burst
/// runs; the concurrency rule matches `/slow`, so that through Envoy every request of the
/// burst still holds its slot when the last one is checked.
pub const STRATEGY_CASES: [(&str, &str, &str, usize); 7] = [
    (
        "fixed_window",
        "limit = 10\nwindow = \"1d\"",
        "/fixed_window",
        10,
    ),
    (
        "sliding_window_log",
        "limit = 10\nwindow = \"1d\"",
        "/sliding_window_log",
        10,
    ),
    (
        "sliding_window_counter",
        "limit = 10\nwindow = \"1d\"",
        "/sliding_window_counter",
        10,
    ),
    (
        "token_bucket",
        "limit = 1\nwindow = \"1d\"\nburst = 10",
        "/token_bucket",
        10,
    ),
    (
        "gcra",
        "limit = 1\nwindow = \"1d\"\nburst = 10",
        "/gcra",
        10,
    ),
    (
        "leaky_bucket",
        "limit = 10\nwindow = \"1d\"\nmax_delay = \"0s\"",
        "/leaky_bucket",
        1,
    ),
    ("concurrency", "limit = 10\nlease = \"1h\"", "/slow", 10),
];

/// One rule per strategy of [`STRATEGY_CASES`], each on its own path.
pub fn strategy_rules() -> String {
    STRATEGY_CASES
        .iter()
        .map(|(strategy, fields, path, _)| {
            format!(
                "[[rules]]\nname = \"{strategy}\"\nstrategy = \"{strategy}\"\n{fields}\nmatch = {{ path_prefix = \"{path}\" }}\n\n"
            )
        })
        .collect()
}
