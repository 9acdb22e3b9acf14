//! `ringpush queues`: every ringpush queue's depth, unacked count (from the management API)
//! and consumers, with rates; and tearing the topology down (`ringpush queues --delete`).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Names};

/// One queue as `ringpush queues` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLine {
    pub queue: String,
    pub ready: u32,
    /// Delivered and not yet acked (from the management API; `None` without it).
    pub unacked: Option<u64>,
    pub consumers: u32,
    /// The queue does not exist (no ringpush process has declared it yet).
    pub missing: bool,
}

/// Reads every ringpush queue's depth and consumer count (passive declares).
pub(crate) async fn queue_lines(
    connection: &lapin::Connection,
    names: &Names,
) -> Result<Vec<QueueLine>, lapin::Error> {
    let mut lines = Vec::new();
    for queue in names.queues() {
        // A missing queue closes the channel: one channel per queue keeps the others readable.
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => {
                lines.push(QueueLine {
                    queue: queue.to_owned(),
                    ready: q.message_count(),
                    unacked: None,
                    consumers: q.consumer_count(),
                    missing: false,
                });
                let _ = channel.close(200, "done".into()).await;
            }
            Err(_) => lines.push(QueueLine {
                queue: queue.to_owned(),
                ready: 0,
                unacked: None,
                consumers: 0,
                missing: true,
            }),
        }
    }
    Ok(lines)
}

/// RabbitMQ's management API (`http(s)://user:pass@host:port`) and how it is reached.
#[derive(Debug, Clone)]
pub struct ManagementApi {
    pub url: String,
    pub http: crate::http::Client,
}

/// Every ringpush queue's depth, unacked and consumer counts from RabbitMQ's management API
/// alone — what a `monitor` identity reads (`ringpush service add monitor`), which may not
/// open an AMQP connection at all. One GET for the whole vhost, bounded by 10 s. The API's
/// numbers are the broker's statistics, refreshed every few seconds (5 s by default).
pub async fn management_lines(
    management: &ManagementApi,
    vhost: &str,
    names: &Names,
) -> anyhow::Result<Vec<QueueLine>> {
    let base = management.url.trim_end_matches('/');
    let url = format!(
        "{base}/api/queues/{vhost}?columns=name,messages_ready,messages_unacknowledged,consumers"
    );
    let response = management
        .http
        .get(&url, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("RINGPUSH_MANAGEMENT_URL: {e}"))?;
    anyhow::ensure!(
        response.status == 200,
        "management API: status {}",
        response.status
    );
    let listed: Vec<serde_json::Value> = serde_json::from_str(&response.body)?;
    Ok(names
        .queues()
        .into_iter()
        .map(|queue| {
            let found = listed.iter().find(|q| q["name"].as_str() == Some(queue));
            let count = |k: &str| found.and_then(|q| q[k].as_u64()).unwrap_or(0);
            QueueLine {
                queue: queue.to_owned(),
                ready: count("messages_ready").min(u64::from(u32::MAX)) as u32,
                unacked: found.map(|_| count("messages_unacknowledged")),
                consumers: count("consumers").min(u64::from(u32::MAX)) as u32,
                missing: found.is_none(),
            }
        })
        .collect())
}

/// The vhost of an AMQP URL (the first, for a list), percent-encoded as the management API
/// wants it (`%2f` for the default vhost).
pub fn vhost_of(amqp_url: &str) -> String {
    let first = amqp_url.split(',').next().unwrap_or_default().trim();
    let vhost = url::Url::parse(first)
        .ok()
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .unwrap_or_default();
    if vhost.is_empty() {
        "%2f".into()
    } else {
        vhost
    }
}

/// The table `ringpush queues` prints; `rates` are messages per second since the last look.
pub(crate) fn queue_table(lines: &[QueueLine], rates: Option<&[f64]>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36} {:>9} {:>9} {:>9} {:>12}",
        "queue", "ready", "unacked", "consumers", "rate/s"
    );
    for (i, l) in lines.iter().enumerate() {
        let rate = rates
            .and_then(|r| r.get(i))
            .map_or("-".to_owned(), |r| format!("{r:+.1}"));
        let unacked = l.unacked.map_or("-".to_owned(), |u| u.to_string());
        let name = match l.missing {
            true => format!("{} (missing)", l.queue),
            false => l.queue.clone(),
        };
        let _ = writeln!(
            out,
            "{:<36} {:>9} {:>9} {:>9} {:>12}",
            name, l.ready, unacked, l.consumers, rate
        );
    }
    if lines.iter().any(|l| l.unacked.is_none()) {
        out.push_str("(unacked: AMQP does not report it; set RINGPUSH_MANAGEMENT_URL to read it from the management API)\n");
    }
    out
}

/// `ringpush queues [--watch]`: the table once, or — `every` given — redrawn in place at
/// that interval until `cancel`. With `management_url` every number comes from the
/// management API and no AMQP connection is opened (a `monitor` identity has none); without
/// it, from passive declares over AMQP (no unacked counts).
pub async fn queues(
    amqp_url: &broker::Endpoint,
    names: &Names,
    management: Option<&ManagementApi>,
    every: Option<Duration>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let vhost = vhost_of(amqp_url.url());
    // The management API (no AMQP connection: a monitor identity may open none), or AMQP.
    let source = match management {
        Some(management) => Err(management),
        None => Ok(broker::connect(amqp_url, "ringpush queues").await?),
    };
    let mut last: Option<(Instant, Vec<QueueLine>)> = None;
    loop {
        let lines = match &source {
            Ok(connection) => queue_lines(connection, names).await?,
            Err(management) => management_lines(management, &vhost, names).await?,
        };
        let rates: Option<Vec<f64>> = last.as_ref().map(|(at, before)| {
            let secs = at.elapsed().as_secs_f64().max(0.001);
            lines
                .iter()
                .zip(before)
                .map(|(now, then)| (f64::from(now.ready) - f64::from(then.ready)) / secs)
                .collect()
        });
        let table = queue_table(&lines, rates.as_deref());
        let Some(every) = every else {
            print!("{table}");
            break;
        };
        // Clear the screen and draw in place.
        print!("\x1b[2J\x1b[H{table}");
        last = Some((Instant::now(), lines));
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    if let Ok(connection) = source {
        let _ = connection.close(200, "done".into()).await;
    }
    Ok(())
}

/// `ringpush queues --delete`: removes every queue and the rings exchange of a prefix — what
/// a walkthrough or a trial deployment leaves behind — and says what each queue held.
/// Refuses, deleting nothing, while a queue has consumers (the prefix's processes still
/// run).
pub async fn delete_topology(amqp_url: &str, names: &Names) -> anyhow::Result<String> {
    let connection = broker::connect(amqp_url, "ringpush queues --delete").await?;
    let result = async {
        let lines = queue_lines(&connection, names).await?;
        if let Some(busy) = lines.iter().find(|l| l.consumers > 0) {
            anyhow::bail!(
                "{} has {} consumer(s): stop the processes of prefix {} first; nothing deleted",
                busy.queue,
                busy.consumers,
                names.prefix
            );
        }
        let channel = connection.create_channel().await?;
        let mut out = String::new();
        for line in lines.iter().filter(|l| !l.missing) {
            // (No `if_unused`: quorum queues refuse it; the consumers were checked above.)
            let held = channel
                .queue_delete(line.queue.as_str().into(), Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("{}: {}", line.queue, broker::cause::describe(&e)))?;
            let _ = writeln!(
                out,
                "deleted queue {} ({held} message(s) in it)",
                line.queue
            );
        }
        channel
            .exchange_delete(names.rings.as_str().into(), Default::default())
            .await?;
        let _ = writeln!(out, "deleted exchange {} (if it was there)", names.rings);
        if lines.iter().all(|l| l.missing) {
            let _ = writeln!(out, "no queue of prefix {} was there", names.prefix);
        }
        Ok(out)
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_table_lines_up_and_shows_rates() {
        let lines = [
            QueueLine {
                queue: "ringpush.rings".into(),
                ready: 1200,
                unacked: Some(256),
                consumers: 3,
                missing: false,
            },
            QueueLine {
                queue: "ringpush.rings.dead".into(),
                ready: 2,
                unacked: None,
                consumers: 0,
                missing: true,
            },
        ];
        let table = queue_table(&lines, Some(&[-150.0, 0.5]));
        let rows: Vec<&str> = table.lines().collect();
        assert!(
            rows[1].starts_with("ringpush.rings ")
                && rows[1].contains(" 1200 ")
                && rows[1].contains(" 256 ")
                && rows[1].ends_with("-150.0"),
            "{table}"
        );
        assert!(
            rows[2].ends_with("+0.5") && rows[2].contains("(missing)"),
            "{table}"
        );
        assert!(queue_table(&lines, None)
            .lines()
            .nth(1)
            .unwrap()
            .ends_with('-'));
        assert!(
            table.contains("RINGPUSH_MANAGEMENT_URL"),
            "says how to see unacked"
        );
    }

    #[test]
    fn vhosts_come_from_the_url_path_still_percent_encoded() {
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "%2f");
        assert_eq!(vhost_of("amqp://h:5672/doorbell?heartbeat=10"), "doorbell");
        assert_eq!(vhost_of("amqp://h:5672"), "%2f");
        assert_eq!(vhost_of("amqp://h/prod%20eu?heartbeat=5"), "prod%20eu");
        assert_eq!(vhost_of("amqp://h/v1,amqp://h2/v1"), "v1");
        // Not ASCII: encoded by the URL parser, never sliced through a character.
        assert_eq!(vhost_of("amqp://h/é%zz"), "%C3%A9%zz");
    }
}
