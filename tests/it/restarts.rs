//! A broker's bad minute: a RabbitMQ node of this test's own (never the shared one, which the
//! other tests use) has its app restarted five times, 15–20 s apart (stopped for 4 s each
//! time), while a gateway rings.
//! After each restart every worker consumes again within 2 s of the node accepting
//! connections (from the workers' own log lines, timestamped), no ring waits more than the
//! outage plus 5 s, no phone rings twice, and each restart is one `broker connection lost`
//! line per worker, with none of lapin's error lines repeating it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringpush::broker::{self, Names};
use ringpush::token::random_hex;
use ringpush::wire::ring::RingEvent;
use time::OffsetDateTime;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::support::{gateway, App};

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
const RESTARTS: usize = 5;
/// How long the node's app stays stopped each time.
const DOWN: Duration = Duration::from_secs(4);

/// A RabbitMQ node of this test's own, on free loopback ports, with its own data, logs,
/// config and cookie; killed and removed when dropped (also when the test fails).
struct Node {
    name: String,
    port: u16,
    dir: PathBuf,
    home: PathBuf,
    server: Option<std::process::Child>,
    os_pid: Option<u32>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Node {
    fn start() -> Node {
        let id = random_hex(4);
        let dir = std::env::temp_dir().join(format!("ringpush-node-{id}"));
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, random_hex(16).to_uppercase()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        let (port, dist) = (free_port(), free_port());
        let conf = dir.join("rabbitmq.conf");
        std::fs::write(
            &conf,
            format!(
                "listeners.tcp.default = {port}\nloopback_users.guest = true\n\
                 vm_memory_high_watermark.absolute = 512MB\ndisk_free_limit.absolute = 50MB\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        let name = format!("rpt{id}@localhost");
        let out = std::fs::File::create(dir.join("server.out")).unwrap();
        use std::os::unix::process::CommandExt;
        let server = std::process::Command::new(format!("{RABBIT_BIN}/rabbitmq-server"))
            .env("HOME", &home)
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", &conf)
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("rabbitmq-server starts");
        let mut node = Node {
            name,
            port,
            dir,
            home,
            server: Some(server),
            os_pid: None,
        };
        let deadline = Instant::now() + Duration::from_secs(240);
        while node.ctl(&["await_startup"]).is_err() {
            let exited = node.server.as_mut().unwrap().try_wait().unwrap().is_some();
            if exited || Instant::now() > deadline {
                let out = std::fs::read_to_string(node.dir.join("server.out")).unwrap_or_default();
                panic!(
                    "the test's RabbitMQ node did not start:\n{}",
                    &out[out.len().saturating_sub(3000)..]
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let pid = node.ctl(&["eval", "os:getpid()."]).unwrap();
        node.os_pid = pid.trim().trim_matches('"').parse().ok();
        node
    }

    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new(format!("{RABBIT_BIN}/rabbitmqctl"))
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .env("HOME", &self.home)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The node's own process (the pid rabbitmqctl reported), then what is left of the
        // process group the server script started; the shared epmd is neither.
        if let Some(pid) = self.os_pid {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        if let Some(mut server) = self.server.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", server.id())])
                .status();
            let _ = server.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs rabbitmqctl off the runtime's threads.
async fn ctl(node: &Arc<Node>, args: &'static [&'static str]) {
    let node = node.clone();
    tokio::task::spawn_blocking(move || node.ctl(args))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?}: {e}"));
}

/// When the node's port accepts a TCP connection again (polled every 10 ms).
async fn accepting(port: u16) -> OffsetDateTime {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), connect).await {
            return OffsetDateTime::now_utc();
        }
        assert!(Instant::now() < deadline, "the node never accepted again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gateway whose doorbell is pressed every 100 ms, publishing each press with a confirm on
/// the test's node, in order; a press it could not publish (the broker away) is published,
/// as it was pressed, once the broker is back.
async fn ring_throughout(
    url: String,
    names: Names,
    confirmed: Arc<Mutex<Vec<RingEvent>>>,
    stop: CancellationToken,
) {
    let mut channel: Option<(lapin::Connection, lapin::Channel)> = None;
    let mut pressed = std::collections::VecDeque::new();
    let mut due = Instant::now();
    while !stop.is_cancelled() {
        while Instant::now() >= due {
            pressed.push_back(App::ring("gw-restart", Duration::ZERO));
            due += Duration::from_millis(100);
        }
        if channel
            .as_ref()
            .is_none_or(|(_, c)| !c.status().connected())
        {
            channel = None;
            if let Ok(connection) = broker::connect(&url, "ringpush test gateway").await {
                if let Ok(c) = broker::confirm_channel(&connection).await {
                    channel = Some((connection, c));
                }
            }
            if channel.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let Some(ring) = pressed.front() else {
            tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
            continue;
        };
        let (_, c) = channel.as_ref().unwrap();
        match broker::publish_ring(c, &names, ring).await {
            Ok(()) => confirmed.lock().unwrap().push(pressed.pop_front().unwrap()),
            Err(_) => {
                channel = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A worker process's stderr, line by line, kept.
fn keep_lines(child: &mut tokio::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut reader = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let kept = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = reader.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    lines
}

/// The timestamps of a worker's log lines that contain `what`.
fn logged(lines: &Mutex<Vec<String>>, what: &str) -> Vec<OffsetDateTime> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let ts = l.split_whitespace().next()?;
            OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()
        })
        .collect()
}

#[tokio::test]
async fn five_broker_restarts_keep_no_worker_off_the_queue_for_more_than_2_s() {
    let node = Arc::new(
        tokio::task::spawn_blocking(Node::start)
            .await
            .expect("the node starts"),
    );
    let record = std::env::temp_dir().join(format!("ringpush-restarts-{}.record", random_hex(4)));
    let app = App::spawn_with(|o| {
        o.run_worker = false;
        o.run_purger = false;
        o.mock.record = Some(record.clone());
    })
    .await;
    let tokens = gateway(&app, "gw-restart", 2).await;
    let url = node.url();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let mut child = app
            .worker_command(&[("RINGPUSH_AMQP_URL", &url), ("RUST_LOG", "info")])
            .stderr(Stdio::piped())
            .spawn()
            .expect("the worker binary starts");
        let lines = keep_lines(&mut child);
        workers.push((child, lines));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !workers
        .iter()
        .all(|(_, l)| !logged(l, "consuming with coalesced acks").is_empty())
    {
        assert!(Instant::now() < deadline, "the workers did not consume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let gateway_task = tokio::spawn(ring_throughout(
        url.clone(),
        app.names.clone(),
        confirmed.clone(),
        stop.clone(),
    ));
    // (stopped, accepting again) per restart.
    let mut outages = Vec::new();
    let began = Instant::now();
    let mut last = Instant::now();
    for i in 0..RESTARTS {
        let apart = Duration::from_millis(15_000 + rand_below(5_000));
        tokio::time::sleep(apart.saturating_sub(last.elapsed())).await;
        last = Instant::now();
        let stopped = OffsetDateTime::now_utc();
        let at = began.elapsed().as_secs_f64();
        ctl(&node, &["stop_app"]).await;
        // Down a few seconds, long enough for the workers' backoff to reach its cap.
        tokio::time::sleep(DOWN).await;
        let back = tokio::spawn(accepting(node.port));
        ctl(&node, &["start_app"]).await;
        let back = back.await.unwrap();
        eprintln!(
            "restart {}: stop_app at +{at:.1} s, accepting connections again {:.2} s later",
            i + 1,
            (back - stopped).as_seconds_f64()
        );
        outages.push((stopped, back));
    }
    // A last stretch of rings after the fifth restart, then the gateway stops.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    gateway_task.await.unwrap();
    let rings = confirmed.lock().unwrap().clone();
    app.wait_for("every confirmed ring at every phone", || {
        app.unaccepted(&rings, &tokens) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Back on the queue: each worker's first "consuming again" after each stop, against the
    // moment the node accepted connections again.
    let mut worst = Duration::ZERO;
    let mut report = Vec::new();
    for (w, (_, lines)) in workers.iter().enumerate() {
        let again = logged(
            lines,
            "consuming again after the broker connection was lost",
        );
        for (i, (stopped, back)) in outages.iter().enumerate() {
            // The first after this stop (before the next one).
            let first = again
                .iter()
                .find(|t| *t > stopped && outages.get(i + 1).is_none_or(|(next, _)| *t < next));
            let Some(first) = first else {
                report.push(format!(
                    "worker {} restart {}: not consuming again",
                    w + 1,
                    i + 1
                ));
                // A worker that never came back.
                worst = Duration::MAX;
                continue;
            };
            let after = (*first - *back).as_seconds_f64();
            report.push(format!(
                "worker {} restart {}: consuming {:.2} s after the node accepted connections",
                w + 1,
                i + 1,
                after
            ));
            worst = worst.max(Duration::from_secs_f64(after.max(0.0)));
        }
    }
    for line in &report {
        eprintln!("{line}");
    }
    eprintln!("slowest return to the queue: {:.2} s", worst.as_secs_f64());

    // Each ring's wait, from its press to its first phone's 200 (the mock's record).
    let mut first_accepted: HashMap<String, i64> = HashMap::new();
    let mut pairs: HashMap<(String, String), usize> = HashMap::new();
    for line in std::fs::read_to_string(&record).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Rings nobody answered end missed: their follow-ups share the ring's collapse id.
        if f.len() == 5 && f[1] == "200" && f[4] == "ring" {
            let ms: i64 = f[0].parse().unwrap();
            let e = first_accepted.entry(f[2].to_owned()).or_insert(ms);
            *e = (*e).min(ms);
            *pairs.entry((f[2].to_owned(), f[3].to_owned())).or_default() += 1;
        }
    }
    let _ = std::fs::remove_file(&record);
    let longest_outage = outages
        .iter()
        .map(|(s, b)| (*b - *s).as_seconds_f64())
        .fold(0.0, f64::max);
    let longest_wait = rings
        .iter()
        .map(|r| {
            let pressed = (r.pressed_at.unix_timestamp_nanos() / 1_000_000) as i64;
            match first_accepted.get(&r.event_id) {
                Some(at) => (at - pressed) as f64 / 1000.0,
                None => f64::INFINITY,
            }
        })
        .fold(0.0, f64::max);
    let twice = pairs.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} rings confirmed; longest outage {longest_outage:.2} s; longest press-to-phone \
         {longest_wait:.2} s; pairs accepted twice: {twice}",
        rings.len()
    );

    // One line per event: a loss is one `broker connection lost` per worker and restart, and
    // lapin does not repeat it.
    for (w, (_, lines)) in workers.iter().enumerate() {
        let lines = lines.lock().unwrap();
        let lapin: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(" lapin"))
            .take(5)
            .collect();
        assert!(
            lapin.is_empty(),
            "worker {}: lapin's lines: {lapin:#?}",
            w + 1
        );
        let lost = lines
            .iter()
            .filter(|l| l.contains("broker connection lost"))
            .count();
        assert_eq!(lost, RESTARTS, "worker {}: one line per restart", w + 1);
    }
    assert!(
        worst <= Duration::from_secs(2),
        "a worker stayed off the queue {:.2} s after the node accepted connections: {report:#?}",
        worst.as_secs_f64()
    );
    assert!(
        longest_wait <= longest_outage + 5.0,
        "a ring waited {longest_wait:.2} s (longest outage {longest_outage:.2} s)"
    );
    assert_eq!(twice, 0, "a phone rang twice");
    assert!(
        rings.len() > 100,
        "rings flowed throughout ({})",
        rings.len()
    );
    for (mut child, _) in workers {
        crate::support::terminate(&mut child).await;
    }
    drop(node);
}

fn rand_below(n: u64) -> u64 {
    u64::from_str_radix(&random_hex(4), 16).unwrap() % n
}
