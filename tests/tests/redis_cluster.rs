//! The controller on a three-master Redis Cluster (real `redis-server --cluster-enabled yes`
//! processes joined by `redis-cli --cluster create`): where keys land, what a request whose
//! limits span slots does (as the README's "Redis Cluster and Sentinel" says), resets and
//! stats across masters, and the live configuration shared by two controllers.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use sluice_controller::keys;
use sluice_controller::store::{CheckSpec, LimitSpec, RedisStore, RedisTarget, Store};
use sluice_controller::strategy::Params;
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::{http, unique_name, wait_until, Controller, RedisCluster, RedisServer};
use sluice_protocol::{ClientId, Strategy};

fn client(kind: &str, value: &str) -> ClientId {
    ClientId {
        kind: kind.into(),
        value: value.into(),
    }
}

fn cluster_store(cluster: &RedisCluster) -> RedisStore {
    RedisStore::open(
        &RedisTarget::Cluster(cluster.urls()),
        Duration::from_secs(2),
    )
    .expect("cluster store")
}

fn fixed(key: String, limit: u64) -> LimitSpec {
    LimitSpec {
        key,
        params: Params {
            strategy: Strategy::FixedWindow,
            limit,
            period_ms: 3_600_000,
            extra: 0,
            penalty: None,
        },
        cost: 1,
    }
}

fn read(mut spec: LimitSpec) -> LimitSpec {
    spec.cost = 0;
    spec
}

#[test]
fn a_clients_keys_share_one_slot_that_the_client_cannot_choose() {
    let cluster = RedisCluster::start(3);
    let clients = [
        client("ip", "10.0.0.1"),
        client("user", "{foo}"),
        client("header", "a}{b"),
        client("header", "{sluice:{config}"),
        client("api_key", "}{"),
    ];
    for id in &clients {
        let mut keys_of_client: Vec<String> = Strategy::ALL
            .into_iter()
            .flat_map(|strategy| {
                ["per-client", "login"].map(|rule| keys::limit_key(strategy, rule, Some(id)))
            })
            .collect();
        keys_of_client.push(keys::penalty_key(&keys_of_client[0]));
        keys_of_client.push(keys::alert_count_key("per-client", id));
        let slots: BTreeSet<u16> = keys_of_client
            .iter()
            .map(|key| cluster.keyslot(key))
            .collect();
        assert_eq!(slots.len(), 1, "{id:?}: {keys_of_client:?}");
        for key in &keys_of_client {
            assert_eq!(keys::slot(key), cluster.keyslot(key), "{key}");
        }
        // The slot is the hash tag's the controller wrote (16 hex digits), never one the
        // client's braces name.
        let key = &keys_of_client[0];
        let tag = &key[key.find('{').unwrap() + 1..key.find('}').unwrap()];
        assert_eq!(tag.len(), 16, "{key}");
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
        for chosen in ["foo", "a", "b", "sluice:{config", "config"] {
            if id.value.contains(chosen) {
                assert_ne!(
                    cluster.keyslot(key),
                    cluster.keyslot(&format!("{{{chosen}}}")),
                    "{id:?} chose its slot"
                );
            }
        }
    }
    println!(
        "config keys in slot {}, stats keys in slot {}",
        cluster.keyslot(&keys::config_document_key()),
        cluster.keyslot(&keys::stats_controllers_key())
    );
    for family in [
        [
            keys::config_document_key(),
            keys::config_version_key(),
            keys::audit_key(),
        ]
        .to_vec(),
        [
            keys::stats_controllers_key(),
            keys::stats_key(10_000, 0, "a"),
            keys::stats_key(60_000, 60_000, "b"),
        ]
        .to_vec(),
    ] {
        let slots: BTreeSet<u16> = family.iter().map(|key| cluster.keyslot(key)).collect();
        assert_eq!(slots.len(), 1, "{family:?}");
    }
}

/// The README: on a cluster, a request whose limits live in different slots is checked one
/// slot at a time, each slot's part atomically; a part that admits counts even when another
/// part denies. On a single Redis the same requests count nothing when denied.
#[tokio::test]
async fn a_request_spanning_slots_is_all_or_nothing_per_slot_only() {
    let cluster = RedisCluster::start(3);
    let single = RedisServer::start();
    let on_cluster = cluster_store(&cluster);
    let on_single = RedisStore::new(&single.url(), Duration::from_secs(2)).expect("redis");
    let rule = unique_name("r");
    let global_rule = unique_name("g");
    let own = fixed(
        keys::limit_key(
            Strategy::FixedWindow,
            &rule,
            Some(&client("ip", "10.0.0.9")),
        ),
        5,
    );
    let global = fixed(
        keys::limit_key(Strategy::FixedWindow, &global_rule, None),
        1,
    );
    assert_ne!(cluster.keyslot(&own.key), cluster.keyslot(&global.key));
    let both = [own.clone(), global.clone()];
    for (name, store, over_count) in [
        ("single redis", &on_single, false),
        ("cluster", &on_cluster, true),
    ] {
        let first = store.check(&both, "").await.expect("check");
        assert!(first.allowed(), "{name}: {first:?}");
        let second = store.check(&both, "").await.expect("check");
        assert_eq!(second.denied_by, Some(1), "{name}: the global limit denies");
        assert!(second.verdicts[0].ok && !second.verdicts[1].ok, "{name}");
        let own_now = store.check(&[read(own.clone())], "").await.expect("read");
        let remaining = own_now.verdicts[0].remaining;
        if over_count {
            assert_eq!(
                remaining, 3,
                "{name}: the client's part counted the denied request"
            );
        } else {
            assert_eq!(remaining, 4, "{name}: the denied request counted nowhere");
        }
        println!("{name}: after one admitted and one denied request, {remaining} of 5 left");
    }

    // A batch over two slots: one EVALSHA per slot, each slot's parts in batch order, the
    // outcomes back in the batch's order.
    let own = fixed(
        keys::limit_key(
            Strategy::FixedWindow,
            &rule,
            Some(&client("ip", "10.0.0.10")),
        ),
        2,
    );
    let global = fixed(
        keys::limit_key(Strategy::FixedWindow, &unique_name("g"), None),
        1,
    );
    assert_ne!(cluster.keyslot(&own.key), cluster.keyslot(&global.key));
    let both = [own.clone(), global.clone()];
    let alone = [own.clone()];
    let batch = [
        CheckSpec {
            limits: &both,
            lease_id: "",
        },
        CheckSpec {
            limits: &alone,
            lease_id: "",
        },
        CheckSpec {
            limits: &both,
            lease_id: "",
        },
    ];
    let before = cluster.calls("evalsha");
    let outcomes = on_cluster.check_batch(&batch).await.expect("batch");
    assert_eq!(
        cluster.calls("evalsha") - before,
        2,
        "one script call per slot"
    );
    type Summary = (Option<usize>, Vec<(bool, u64)>);
    let summary: Vec<Summary> = outcomes
        .iter()
        .map(|o| {
            (
                o.denied_by,
                o.verdicts.iter().map(|v| (v.ok, v.remaining)).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (None, vec![(true, 1), (true, 0)]),
            (None, vec![(true, 0)]),
            // Denied by its first limit (the client's is spent), and by the global one.
            (Some(0), vec![(false, 0), (false, 0)]),
        ]
    );
}

#[tokio::test]
async fn counters_are_reset_on_every_master() {
    let cluster = RedisCluster::start(3);
    let store = cluster_store(&cluster);
    let (reset, kept) = (unique_name("reset"), unique_name("kept"));
    let mut reset_keys = Vec::new();
    for n in 0..30 {
        let id = client("ip", &format!("10.1.0.{n}"));
        let key = keys::limit_key(Strategy::FixedWindow, &reset, Some(&id));
        assert!(store
            .check(&[fixed(key.clone(), 5)], "")
            .await
            .unwrap()
            .allowed());
        reset_keys.push(key);
    }
    let kept_key = keys::limit_key(Strategy::FixedWindow, &kept, Some(&client("ip", "x")));
    assert!(store
        .check(&[fixed(kept_key.clone(), 5)], "")
        .await
        .unwrap()
        .allowed());
    let masters: BTreeSet<u16> = reset_keys.iter().map(|key| cluster.port_of(key)).collect();
    assert!(masters.len() >= 2, "the counters span masters: {masters:?}");
    let deleted = store.delete_counters(Some(&reset)).await.expect("reset");
    assert_eq!(deleted, 30, "every master scanned");
    assert!(reset_keys.iter().all(|key| !cluster.exists(key)));
    assert!(cluster.exists(&kept_key), "another rule's counter stays");
    assert_eq!(
        store
            .delete_keys(std::slice::from_ref(&kept_key))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn stats_are_shared_through_the_cluster() {
    let cluster = RedisCluster::start(3);
    let (a, b) = (cluster_store(&cluster), cluster_store(&cluster));
    a.publish_stats("ctl-a", 10_000, 50_000, b"from a".to_vec(), 60_000)
        .await
        .expect("publish");
    b.publish_stats("ctl-b", 10_000, 50_000, b"from b".to_vec(), 60_000)
        .await
        .expect("publish");
    let read = a
        .read_stats(10_000, &[50_000, 60_000], "ctl-a")
        .await
        .unwrap();
    assert_eq!(read, [b"from b".to_vec()]);
    a.ping().await.expect("every node answers PING");
}

const RULES: &str = r#"
[[rules]]
name = "per-client"
limit = 3
window = "1h"

[[rules]]
name = "everyone"
limit = 1000
window = "1h"
scope = "global"
"#;

/// One check of `ip`: its decision (`allowed`, the rule that speaks for it and what that
/// rule has left).
fn decide(controller: &Controller, ip: &str) -> (bool, String, u64) {
    let body = json!({"checks":[{"client":{"kind":"ip","value":ip},"host":"api.example.com",
        "method":"GET","path":"/items","cost":1,"ip":ip}]});
    let answer = http::post_check(&controller.url("/v1/check"), &body).expect("check call");
    assert_eq!(answer.status, 200, "{answer:?}");
    let decision = &answer.json()["decisions"][0];
    (
        decision["allowed"].as_bool().expect("a decision"),
        decision["policy"]["rule"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        decision["policy"]["remaining"]
            .as_u64()
            .expect("a remaining count"),
    )
}

fn check_status(controller: &Controller, ip: &str) -> bool {
    decide(controller, ip).0
}

#[test]
fn the_live_configuration_is_shared_on_the_cluster() {
    let cluster = RedisCluster::start(3);
    let nodes = cluster.urls().join(",");
    let options = ControllerOptions {
        extra_args: vec![
            "--redis-cluster-nodes".into(),
            nodes,
            "--redis-timeout-ms".into(),
            "2000".into(),
        ],
        ..ControllerOptions::new(RULES, None)
    };
    let first = Controller::start_with(&options);
    let second = Controller::start_with(&options);
    let ready = http::get(&first.url("/readyz")).expect("readyz").json();
    println!("readyz: {ready}");
    let admitted: Vec<bool> = (0..4).map(|_| check_status(&second, "192.0.2.1")).collect();
    assert_eq!(admitted, [true, true, true, false], "per-client and global");

    let version = first.config_version();
    let raised = first.admin(
        "PUT",
        "/v1/admin/rules/per-client",
        Some(&json!({ "name": "per-client", "limit": 5, "window": "1h" })),
    );
    assert_eq!(raised.status, 200, "{raised:?}");
    wait_until(
        "the second controller sees the change",
        Duration::from_secs(10),
        || second.config_version() > version,
    );
    // Three of five counted, the fourth denied by the old limit (a denial counts nothing):
    // the raised limit admits two more, then the client is spent.
    let spent: Vec<(bool, String, u64)> = (0..3).map(|_| decide(&second, "192.0.2.1")).collect();
    let per_client = |allowed: bool, remaining: u64| (allowed, "per-client".to_owned(), remaining);
    assert_eq!(
        spent,
        [
            per_client(true, 1),
            per_client(true, 0),
            per_client(false, 0)
        ],
        "the raised limit admits up to 5, then denies"
    );

    // A reset scans every master and is recorded in the audit log (MULTI in `{config}`).
    let reset = first.admin("DELETE", "/v1/admin/counters?rule=per-client", None);
    assert_eq!(reset.status, 200, "{reset:?}");
    let audit = second.admin("GET", "/v1/admin/audit", None).json();
    let text = audit.to_string();
    assert!(text.contains("rule:per-client"), "{text}");
    // Without the reset the spent client would be denied; with it, its counter starts over.
    assert_eq!(
        decide(&second, "192.0.2.1"),
        per_client(true, 4),
        "reset: admitted again, with the whole limit but this request left"
    );
}
