//! Exactness under concurrency: many concurrent checks against two controller processes
//! sharing one Redis admit exactly what each algorithm allows, for every strategy.

use std::sync::{Arc, Barrier};

use serde_json::json;
use sluice_e2e::{http, Controller, RedisServer};

/// (strategy, its rule's fields, requests it must admit out of a concurrent burst).
/// Windows are long enough that nothing refills or resets while the burst runs.
const CASES: [(&str, &str, usize); 7] = [
    ("fixed_window", "limit = 10\nwindow = \"1d\"", 10),
    ("sliding_window_log", "limit = 10\nwindow = \"1d\"", 10),
    ("sliding_window_counter", "limit = 10\nwindow = \"1d\"", 10),
    ("token_bucket", "limit = 1\nwindow = \"1d\"\nburst = 10", 10),
    ("gcra", "limit = 1\nwindow = \"1d\"\nburst = 10", 10),
    (
        "leaky_bucket",
        "limit = 10\nwindow = \"1d\"\nmax_delay = \"0s\"",
        1,
    ),
    ("concurrency", "limit = 10\nlease = \"1h\"", 10),
];

const BURST: usize = 40;

fn rules() -> String {
    CASES
        .iter()
        .map(|(strategy, fields, _)| {
            format!(
                "[[rules]]\nname = \"{strategy}\"\nstrategy = \"{strategy}\"\n{fields}\nmatch = {{ path_prefix = \"/{strategy}\" }}\n\n"
            )
        })
        .collect()
}

#[test]
fn every_strategy_admits_exactly_its_limit_across_two_controllers() {
    let redis = RedisServer::start();
    let rules = rules();
    let controllers = [
        Controller::start(&rules, Some(&redis.url())),
        Controller::start(&rules, Some(&redis.url())),
    ];
    for (strategy, _, expected) in CASES {
        let start = Arc::new(Barrier::new(BURST));
        let clients: Vec<_> = (0..BURST)
            .map(|n| {
                let url = format!("http://127.0.0.1:{}/v1/check", controllers[n % 2].port);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    let body = json!({ "checks": [{
                        "client": { "kind": "ip", "value": "198.51.100.7" },
                        "path": format!("/{strategy}"),
                    }] });
                    start.wait();
                    let response = http::post_json(&url, &body).expect("check call");
                    assert_eq!(response.status, 200, "{response:?}");
                    response.json()["decisions"][0]["allowed"]
                        .as_bool()
                        .expect("allowed")
                })
            })
            .collect();
        let admitted = clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert_eq!(admitted, expected, "{strategy}");
    }
}
