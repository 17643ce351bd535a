//! The controller on a master found through Redis Sentinel (one master, one replica, three
//! Sentinels, real processes): the master is killed while checks flow straight to the
//! controller's check API; the controller follows the master the Sentinels promote. The
//! decisions made during the failover are counted and printed (allowed, denied, errors,
//! the longest time without a decision); what is asserted is that checks were decided
//! before, failed for a while at most, are decided by the new master after, and that a
//! client spent long before the kill is still spent on the new master (its counter came
//! over with the replica).
//!
//! Two more turn the master the controller writes to into a replica behind its back (no
//! failover, no dropped connection), while the Sentinels name the other server: as a synced
//! replica its scripts meet `READONLY`, as a replica of a master that is down (with
//! `replica-serve-stale-data no`) `MASTERDOWN`. One check meets the error (a `503`, or the
//! store fallback's answer), and the next is decided by the new master, exactly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::redis_cluster::{calls, query, MASTER_NAME};
use sluice_e2e::{http, wait_until, Controller, RedisSentinels, RedisServer};

/// A log over the last hour, not a window aligned to the clock: no boundary can fall during
/// the test and hand the spent client a new quota.
const RULES: &str = r#"
[[rules]]
name = "per-client"
strategy = "sliding_window_log"
limit = 5
window = "1h"
"#;

/// A decision, with what the rule had left after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Allowed { remaining: u64 },
    Denied { remaining: u64 },
    Error,
}

impl Decision {
    fn decided(self) -> bool {
        self != Decision::Error
    }
}

/// One check of `ip`: the controller's decision, or an error (a `503` while the store is
/// unreachable, or no answer).
fn check(controller: &Controller, ip: &str) -> Decision {
    let body = json!({"checks":[{"client":{"kind":"ip","value":ip},"host":"api.example.com",
        "method":"GET","path":"/items","cost":1,"ip":ip}]});
    match http::post_check(&controller.url("/v1/check"), &body) {
        Ok(answer) if answer.status == 200 => {
            let decision = &answer.json()["decisions"][0];
            match (
                decision["allowed"].as_bool(),
                decision["policy"]["remaining"].as_u64(),
            ) {
                (Some(true), Some(remaining)) => Decision::Allowed { remaining },
                (Some(false), Some(remaining)) => Decision::Denied { remaining },
                _ => Decision::Error,
            }
        }
        _ => Decision::Error,
    }
}

/// One entry of the load's log: when the answer came, whether it was for the spent
/// client, and the decision.
type Entry = (Instant, bool, Decision);

/// How far into the replication stream the server at `port` is (`master_repl_offset`).
fn replication_offset(port: u16) -> Option<u64> {
    let info: String = query(port, &["INFO", "replication"]).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("master_repl_offset:"))
        .and_then(|offset| offset.trim().parse().ok())
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
    let log: Arc<Mutex<Vec<Entry>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (controller, log, stop) = (controller.clone(), log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let hot = n % 2 == 1;
                let ip = if hot {
                    "hot".to_owned()
                } else {
                    format!("fresh-{n}")
                };
                let decision = check(&controller, &ip);
                log.lock().unwrap().push((Instant::now(), hot, decision));
                n += 1;
            }
        })
    };
    let decided = |log: &Mutex<Vec<Entry>>, since: Option<Instant>| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(at, _, d)| since.is_none_or(|s| *at > s) && d.decided())
            .count()
    };
    wait_until(
        "checks decided on the first master",
        Duration::from_secs(20),
        || decided(&log, None) >= 100,
    );
    assert!(calls(old_master, "evalsha") > 0, "the first master counted");
    // The spent client was admitted 5 times, then denied, all before the kill; what its
    // counter says after the failover is what came over with the replica.
    {
        let log = log.lock().unwrap();
        let hot: Vec<Decision> = log
            .iter()
            .filter(|(_, hot, d)| *hot && d.decided())
            .map(|(_, _, d)| *d)
            .collect();
        let admitted: Vec<Decision> = (0..5)
            .rev()
            .map(|remaining| Decision::Allowed { remaining })
            .collect();
        assert!(hot.len() > 10, "{hot:?}");
        assert_eq!(hot[..5], admitted, "the first 5 admitted");
        assert!(
            hot[5..]
                .iter()
                .all(|d| *d == Decision::Denied { remaining: 0 }),
            "then denied: {hot:?}"
        );
    }
    // Replication is asynchronous: the replica has the spent client's counter once it has
    // everything the master had written by now.
    let written = replication_offset(old_master).expect("the master's offset");
    wait_until(
        "the replica caught up with the master",
        Duration::from_secs(10),
        || replication_offset(replica).is_some_and(|offset| offset >= written),
    );

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
    let during: Vec<&Entry> = log.iter().filter(|(at, _, _)| *at >= killed_at).collect();
    let count = |allowed: bool| {
        during
            .iter()
            .filter(|(_, _, d)| match d {
                Decision::Allowed { .. } => allowed,
                Decision::Denied { .. } => !allowed,
                Decision::Error => false,
            })
            .count()
    };
    let errors = during.iter().filter(|(_, _, d)| !d.decided()).count();
    let mut longest_gap = Duration::ZERO;
    let mut last_decision = killed_at;
    for (at, _, decision) in &during {
        if decision.decided() {
            longest_gap = longest_gap.max(at.duration_since(last_decision));
            last_decision = *at;
        }
    }
    let first_after = during
        .iter()
        .find(|(_, _, d)| d.decided())
        .map(|(at, _, _)| at.duration_since(killed_at));
    println!(
        "failover: sentinels named the replica {promoted_after:?} after the kill; first decision \
         after the kill at {first_after:?}; from the kill to the end: {} allowed, {} denied, \
         {errors} errors (503 from the controller), longest time without a decision \
         {longest_gap:?}",
        count(true),
        count(false),
    );
    // Every decision after the kill is what the counters that came over say: a new client
    // is admitted with 4 left; the spent client is denied with none left, from its first
    // decision on the new master on (a lost counter would admit it 5 times more).
    let fresh: Vec<Decision> = during
        .iter()
        .filter(|(_, hot, d)| !*hot && d.decided())
        .map(|(_, _, d)| *d)
        .collect();
    let hot: Vec<Decision> = during
        .iter()
        .filter(|(_, hot, d)| *hot && d.decided())
        .map(|(_, _, d)| *d)
        .collect();
    assert!(
        fresh.len() >= 40 && hot.len() >= 40,
        "decisions after the kill: {} for new clients, {} for the spent one",
        fresh.len(),
        hot.len()
    );
    assert!(
        fresh
            .iter()
            .all(|d| *d == Decision::Allowed { remaining: 4 }),
        "a new client is admitted with 4 left: {fresh:?}"
    );
    assert!(
        hot.iter().all(|d| *d == Decision::Denied { remaining: 0 }),
        "the spent client stays denied, with nothing left: {hot:?}"
    );
}

/// The answer to one check of `ip`, as it came.
fn check_answer(controller: &Controller, ip: &str) -> http::Response {
    let body = json!({"checks":[{"client":{"kind":"ip","value":ip},"host":"api.example.com",
        "method":"GET","path":"/items","cost":1,"ip":ip}]});
    http::post_check(&controller.url("/v1/check"), &body).expect("an answer")
}

/// `INFO replication` of the server at `port`, one field.
fn replication_field(port: u16, field: &str) -> Option<String> {
    let info: String = query(port, &["INFO", "replication"]).ok()?;
    let prefix = format!("{field}:");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map(|value| value.trim().to_owned())
}

/// A controller on the Sentinels' master whose counters' connection carries nothing but
/// checks: its configuration lives in a Redis of its own (`--config-redis-url`, so that
/// reading it and protection's blocks do not touch the master) and it keeps no stats (no
/// writes of its own). What reaches the master is the checks the test sends, so the first
/// check after the master changes is the first command to meet the change.
fn quiet_controller(world: &RedisSentinels, config: &RedisServer, fallback: &str) -> Controller {
    Controller::start_with(&ControllerOptions {
        extra_args: vec![
            "--redis-sentinels".into(),
            world.urls().join(","),
            "--redis-sentinel-master".into(),
            MASTER_NAME.into(),
            "--redis-timeout-ms".into(),
            "2000".into(),
            "--config-redis-url".into(),
            config.url(),
            "--stats".into(),
            "false".into(),
            "--store-fallback".into(),
            fallback.into(),
        ],
        ..ControllerOptions::new(RULES, None)
    })
}

/// The ports of the Sentinels.
fn sentinel_ports(world: &RedisSentinels) -> Vec<u16> {
    world
        .urls()
        .iter()
        .filter_map(|url| url.rsplit_once(':')?.1.parse().ok())
        .collect()
}

/// Makes the replica the master and has every Sentinel name it, without a failover: the old
/// master is left as it is (still a master, its clients connected), for the test to turn
/// into a replica. The replica has everything the old master wrote first.
fn promote_the_replica_behind_the_controllers_back(world: &RedisSentinels) {
    let old_master = world.master_port().expect("a master");
    let replica = world.replica_port();
    let written = replication_offset(old_master).expect("the master's offset");
    wait_until(
        "the replica caught up with the master",
        Duration::from_secs(10),
        || replication_offset(replica).is_some_and(|offset| offset >= written),
    );
    let _: String = query(replica, &["REPLICAOF", "NO", "ONE"]).expect("REPLICAOF NO ONE");
    for sentinel in sentinel_ports(world) {
        let _: String =
            query(sentinel, &["SENTINEL", "REMOVE", MASTER_NAME]).expect("SENTINEL REMOVE");
        let _: String = query(
            sentinel,
            &[
                "SENTINEL",
                "MONITOR",
                MASTER_NAME,
                "127.0.0.1",
                &replica.to_string(),
                "2",
            ],
        )
        .expect("SENTINEL MONITOR");
        let named: Vec<String> = query(
            sentinel,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        )
        .expect("the master's address");
        assert_eq!(named, ["127.0.0.1".to_owned(), replica.to_string()]);
    }
}

/// The addresses the controller was given by the Sentinels, in order (its log).
fn masters_named(controller: &Controller) -> Vec<String> {
    controller
        .log()
        .lines()
        .filter(|line| line.contains("sentinel names the master"))
        .filter_map(|line| {
            let (_, rest) = line.split_once("master=")?;
            Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
        })
        .collect()
}

/// The master the controller writes to comes back as a replica of the new one (what a
/// failover does to an old master that returns), and the controller is not told: its next
/// check's script meets `READONLY`. That check fails (`503`, naming `READONLY`: the filter
/// applies its failure mode); the controller forgets the master, asks the Sentinels, and the
/// next check is decided by the new master, exactly (the client's counter came over).
#[test]
fn a_master_turned_replica_answers_readonly_and_the_controller_asks_the_sentinels_again() {
    let world = RedisSentinels::start();
    let old_master = world.master_port().expect("a master");
    let new_master = world.replica_port();
    let config = RedisServer::start();
    let controller = quiet_controller(&world, &config, "fail");

    for remaining in [4, 3, 2] {
        assert_eq!(
            check(&controller, "client"),
            Decision::Allowed { remaining }
        );
    }
    assert!(calls(old_master, "evalsha") > 0, "the first master counted");
    assert_eq!(
        masters_named(&controller),
        [format!("127.0.0.1:{old_master}")]
    );

    promote_the_replica_behind_the_controllers_back(&world);
    let _: String = query(
        old_master,
        &["REPLICAOF", "127.0.0.1", &new_master.to_string()],
    )
    .expect("REPLICAOF");
    // Synced: it answers (not `LOADING`), as a replica.
    wait_until(
        "the old master is a replica of the new one",
        Duration::from_secs(20),
        || replication_field(old_master, "master_link_status").as_deref() == Some("up"),
    );
    let counted_before = evalsha_run(new_master);

    let failed = check_answer(&controller, "client");
    assert_eq!(failed.status, 503, "{failed:?}");
    assert_eq!(failed.json()["error"], "store_unavailable", "{failed:?}");
    // The kind the `redis` crate gives a `-READONLY` reply.
    assert!(failed.body.contains("ReadOnly"), "{failed:?}");

    // The next checks go to the new master, which has the client's counter.
    assert_eq!(
        check(&controller, "client"),
        Decision::Allowed { remaining: 1 }
    );
    assert_eq!(
        check(&controller, "client"),
        Decision::Allowed { remaining: 0 }
    );
    assert_eq!(
        check(&controller, "client"),
        Decision::Denied { remaining: 0 }
    );
    assert_eq!(
        evalsha_run(new_master) - counted_before,
        3,
        "the new master decided them"
    );
    assert_eq!(
        masters_named(&controller),
        [
            format!("127.0.0.1:{old_master}"),
            format!("127.0.0.1:{new_master}")
        ]
    );
}

/// The master the controller writes to becomes a replica of a master that is down, with
/// `replica-serve-stale-data no`: the next check's script meets `MASTERDOWN`. With
/// `--store-fallback deny` that check is refused by the fallback (counted in
/// `sluice_store_fallback_checks_total`), the controller asks the Sentinels again, and the
/// next check is decided by the master they name, exactly.
#[test]
fn a_master_turned_stale_replica_answers_masterdown_and_the_controller_asks_the_sentinels_again() {
    let world = RedisSentinels::start();
    let old_master = world.master_port().expect("a master");
    let new_master = world.replica_port();
    let config = RedisServer::start();
    let controller = quiet_controller(&world, &config, "deny");

    for remaining in [4, 3, 2] {
        assert_eq!(
            check(&controller, "client"),
            Decision::Allowed { remaining }
        );
    }
    promote_the_replica_behind_the_controllers_back(&world);
    // A master that accepts the connection and never answers: the link stays down.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("address").port().to_string();
    let _: String = query(
        old_master,
        &["CONFIG", "SET", "replica-serve-stale-data", "no"],
    )
    .expect("CONFIG SET");
    let _: String =
        query(old_master, &["REPLICAOF", "127.0.0.1", &silent_port]).expect("REPLICAOF");
    assert_eq!(
        replication_field(old_master, "master_link_status").as_deref(),
        Some("down")
    );
    let counted_before = evalsha_run(new_master);
    let fallback_before = fallback_checks(&controller);

    // Refused by the fallback: the client had 2 left, no store decided it.
    assert_eq!(
        check(&controller, "client"),
        Decision::Denied { remaining: 0 }
    );
    assert_eq!(fallback_checks(&controller) - fallback_before, 1);
    assert_eq!(evalsha_run(new_master), counted_before);

    assert_eq!(
        check(&controller, "client"),
        Decision::Allowed { remaining: 1 }
    );
    assert_eq!(
        check(&controller, "client"),
        Decision::Allowed { remaining: 0 }
    );
    assert_eq!(
        check(&controller, "client"),
        Decision::Denied { remaining: 0 }
    );
    assert_eq!(
        evalsha_run(new_master) - counted_before,
        3,
        "the new master decided them"
    );
    assert_eq!(fallback_checks(&controller) - fallback_before, 1);
    assert_eq!(
        masters_named(&controller),
        [
            format!("127.0.0.1:{old_master}"),
            format!("127.0.0.1:{new_master}")
        ]
    );
    drop(silent);
}

/// The scripts the server at `port` ran by digest: its `EVALSHA` calls less those refused
/// with `NOSCRIPT` (the controller then loads the script, `SCRIPT LOAD`, and sends it again).
fn evalsha_run(port: u16) -> u64 {
    calls(port, "evalsha") - calls(port, "script|load")
}

/// Checks the fallback answered (`sluice_store_fallback_checks_total`, every fallback).
fn fallback_checks(controller: &Controller) -> u64 {
    let scraped = http::get(&controller.admin_url("/metrics"))
        .expect("scrape")
        .body;
    scraped
        .lines()
        .filter(|line| line.starts_with("sluice_store_fallback_checks_total"))
        .filter_map(|line| line.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}
