//! The controller on a master found through Redis Sentinel (one master, one replica, three
//! Sentinels, real processes): the master is killed while checks flow straight to the
//! controller's check API; the controller follows the master the Sentinels promote. The
//! decisions made during the failover are counted and printed (allowed, denied, errors,
//! the longest time without a decision); what is asserted is only that checks were decided
//! before, failed for a while at most, and are decided by the new master after.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::redis_cluster::{calls, MASTER_NAME};
use sluice_e2e::{http, wait_until, Controller, RedisSentinels};

const RULES: &str = r#"
[[rules]]
name = "per-client"
limit = 5
window = "1h"
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Allowed,
    Denied,
    Error,
}

/// One check of `ip`: the controller's decision, or an error (a `503` while the store is
/// unreachable, or no answer).
fn check(controller: &Controller, ip: &str) -> Decision {
    let body = json!({"checks":[{"client":{"kind":"ip","value":ip},"host":"api.example.com",
        "method":"GET","path":"/items","cost":1,"ip":ip}]});
    match http::post_check(&controller.url("/v1/check"), &body) {
        Ok(answer) if answer.status == 200 => {
            match answer.json()["decisions"][0]["allowed"].as_bool() {
                Some(true) => Decision::Allowed,
                Some(false) => Decision::Denied,
                None => Decision::Error,
            }
        }
        _ => Decision::Error,
    }
}

#[test]
fn the_controller_follows_the_master_through_a_failover() {
    let mut world = RedisSentinels::start();
    let old_master = world.master_port().expect("a master");
    let replica = world.replica_port();
    let options = ControllerOptions {
        extra_args: vec![
            "--redis-sentinels".into(),
            world.urls().join(","),
            "--redis-sentinel-master".into(),
            MASTER_NAME.into(),
            "--redis-timeout-ms".into(),
            "500".into(),
        ],
        ..ControllerOptions::new(RULES, None)
    };
    let controller = Arc::new(Controller::start_with(&options));

    // Load: alternately a new client (admitted) and one spent client (denied after 5).
    let log: Arc<Mutex<Vec<(Instant, Decision)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (controller, log, stop) = (controller.clone(), log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ip = if n % 2 == 0 {
                    format!("fresh-{n}")
                } else {
                    "hot".to_owned()
                };
                let decision = check(&controller, &ip);
                log.lock().unwrap().push((Instant::now(), decision));
                n += 1;
            }
        })
    };
    let decided = |log: &Mutex<Vec<(Instant, Decision)>>, since: Option<Instant>| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(at, d)| since.is_none_or(|s| *at > s) && *d != Decision::Error)
            .count()
    };
    wait_until(
        "checks decided on the first master",
        Duration::from_secs(20),
        || decided(&log, None) >= 100,
    );
    assert!(calls(old_master, "evalsha") > 0, "the first master counted");

    let killed_at = Instant::now();
    world.kill_master();
    wait_until(
        "the sentinels promote the replica",
        Duration::from_secs(60),
        || world.named_master_port() == Some(replica),
    );
    let promoted_after = killed_at.elapsed();
    wait_until(
        "checks decided on the new master",
        Duration::from_secs(60),
        || decided(&log, Some(killed_at + promoted_after)) >= 100,
    );
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    assert!(calls(replica, "evalsha") > 0, "the new master counts");

    let log = log.lock().unwrap();
    let during: Vec<&(Instant, Decision)> = log.iter().filter(|(at, _)| *at >= killed_at).collect();
    let count = |what: Decision| during.iter().filter(|(_, d)| *d == what).count();
    let mut longest_gap = Duration::ZERO;
    let mut last_decision = killed_at;
    for (at, decision) in &during {
        if *decision != Decision::Error {
            longest_gap = longest_gap.max(at.duration_since(last_decision));
            last_decision = *at;
        }
    }
    let first_after = during
        .iter()
        .find(|(_, d)| *d != Decision::Error)
        .map(|(at, _)| at.duration_since(killed_at));
    println!(
        "failover: sentinels named the replica {promoted_after:?} after the kill; first decision \
         after the kill at {first_after:?}; from the kill to the end: {} allowed, {} denied, {} \
         errors (503 from the controller), longest time without a decision {longest_gap:?}",
        count(Decision::Allowed),
        count(Decision::Denied),
        count(Decision::Error),
    );
    assert!(count(Decision::Allowed) > 0 && count(Decision::Denied) > 0);
    // After the failover the hot client is still denied: its counter came over with the
    // replica (replication is asynchronous: the last writes before the kill may not have).
    let end = log.len();
    assert!(
        log[end.saturating_sub(10)..]
            .iter()
            .any(|(_, d)| *d == Decision::Denied),
        "the spent client stays denied"
    );
}
