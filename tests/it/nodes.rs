//! Past one machine, on this one: a broker URL naming several nodes (two fault proxies in
//! front of the local broker stand in for a cluster's nodes) and a database URL naming
//! several hosts. The three-node cluster and the standby's failover are `tests/cluster/run`.

use std::time::Duration;

use ringpush::worker::Counters;

use crate::faults::{publish_all, settled};
use crate::proxy::{Mode, Proxy};
use crate::support::{amqp_url, database_url, gateway, App};

#[tokio::test]
async fn a_worker_given_a_node_list_moves_to_another_node_when_its_node_goes() {
    let mut app = App::spawn_with(|o| o.run_worker = false).await;
    let local: std::net::SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let (a, b) = (Proxy::start(local).await, Proxy::start(local).await);
    let node = |p: &Proxy| amqp_url().replace("127.0.0.1:5672", &p.addr.to_string());
    // Node A is down at first: the worker connects to B, the next in the list.
    a.set(Mode::Down);
    app.start_worker_at(format!("{},{}", node(&a), node(&b)));
    let tokens = gateway(&app, "gw-nodes", 2).await;
    let mut rings = publish_all(&app, "gw-nodes", 20).await;
    app.wait_for("the first rings", || {
        Counters::get(&app.counters.rings_delivered) >= 20
    })
    .await;
    let name = format!("ringpush worker {}", app.names.prefix);
    assert_eq!(
        ringpush::broker::connected_nodes().get(&name),
        Some(&b.addr.to_string()),
        "on node B"
    );
    // A comes back and B goes: the worker moves to A.
    a.set(Mode::Pass);
    b.set(Mode::Down);
    rings.extend(publish_all(&app, "gw-nodes", 20).await);
    settled(&app, &rings, &tokens).await;
    assert_eq!(
        ringpush::broker::connected_nodes().get(&name),
        Some(&a.addr.to_string()),
        "on node A"
    );
    assert!(Counters::get(&app.counters.broker_sessions) >= 2);
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_database_url_naming_several_hosts_finds_the_primary() {
    // A host that refuses first, then the real server: `target_session_attrs=read-write`
    // takes the first writable one.
    let url = database_url().replace("127.0.0.1:5432", "127.0.0.1:1,127.0.0.1:5432");
    assert_ne!(
        url,
        database_url(),
        "RINGPUSH_DATABASE_URL must name 127.0.0.1:5432"
    );
    let sep = if url.contains('?') { '&' } else { '?' };
    let primary = format!("{url}{sep}target_session_attrs=read-write");
    let pool = ringpush::db::pool(&primary, 1, Duration::from_secs(5)).unwrap();
    ringpush::db::ping(&pool).await.unwrap();
    // The same connection is checked again before reuse (still the primary) and works.
    ringpush::db::ping(&pool).await.unwrap();
    // Asking for a standby where there is only a primary fails: a read URL must say `any`
    // when it may fall back to the primary.
    let standby = format!("{url}{sep}target_session_attrs=read-only");
    let pool = ringpush::db::pool(&standby, 1, Duration::from_secs(5)).unwrap();
    assert!(ringpush::db::ping(&pool).await.is_err());
}
