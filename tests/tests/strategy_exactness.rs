//! Exactness under concurrency: many concurrent checks against two controller processes
//! sharing one Redis admit exactly what each algorithm allows, for every strategy.

use std::sync::{Arc, Barrier};

use serde_json::json;
use sluice_e2e::fixtures::{strategy_rules, STRATEGY_CASES};
use sluice_e2e::{http, Controller, RedisServer};

const BURST: usize = 40;

#[test]
fn every_strategy_admits_exactly_its_limit_across_two_controllers() {
    let redis = RedisServer::start();
    let rules = strategy_rules();
    let controllers = [
        Controller::start(&rules, Some(&redis.url())),
        Controller::start(&rules, Some(&redis.url())),
    ];
    for (strategy, _, path, expected) in STRATEGY_CASES {
        let start = Arc::new(Barrier::new(BURST));
        let clients: Vec<_> = (0..BURST)
            .map(|n| {
                let url = format!("http://127.0.0.1:{}/v1/check", controllers[n % 2].port);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    let body = json!({ "checks": [{
                        "client": { "kind": "ip", "value": "198.51.100.7" },
                        "path": path,
                    }] });
                    start.wait();
                    let response = http::post_check(&url, &body).expect("check call");
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
