//! Commands for a person at a terminal: `ringpush queues`, `ringpush who`, `ringpush ring`
//! and `ringpush seed`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Names};
use crate::config::{QueuesArgs, RingArgs, SeedArgs, WhoArgs};
use crate::ring::RingEvent;

/// One queue as `ringpush queues` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLine {
    pub queue: String,
    pub ready: u32,
    pub consumers: u32,
}

/// Reads every ringpush queue's depth and consumer count (passive declares).
pub async fn queue_lines(
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
                    consumers: q.consumer_count(),
                });
                let _ = channel.close(200, "done".into()).await;
            }
            Err(_) => lines.push(QueueLine {
                queue: format!("{queue} (missing)"),
                ready: 0,
                consumers: 0,
            }),
        }
    }
    Ok(lines)
}

/// The table `ringpush queues` prints; `rates` are messages per second since the last look.
pub fn queue_table(lines: &[QueueLine], rates: Option<&[f64]>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36} {:>9} {:>9} {:>12}",
        "queue", "ready", "consumers", "rate/s"
    );
    for (i, l) in lines.iter().enumerate() {
        let rate = rates
            .and_then(|r| r.get(i))
            .map_or("-".to_owned(), |r| format!("{r:+.1}"));
        let _ = writeln!(
            out,
            "{:<36} {:>9} {:>9} {:>12}",
            l.queue, l.ready, l.consumers, rate
        );
    }
    out.push_str("(unacked messages are not visible over AMQP: see the management UI or\n `rabbitmqctl list_queues name messages_unacknowledged`)\n");
    out
}

/// `ringpush queues [--watch]`.
pub async fn queues(args: QueuesArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let names = args.broker.names();
    let connection = broker::connect(&args.broker.amqp_url, "ringpush queues").await?;
    let mut last: Option<(Instant, Vec<QueueLine>)> = None;
    loop {
        let lines = queue_lines(&connection, &names).await?;
        let rates: Option<Vec<f64>> = last.as_ref().map(|(at, before)| {
            let secs = at.elapsed().as_secs_f64().max(0.001);
            lines
                .iter()
                .zip(before)
                .map(|(now, then)| (f64::from(now.ready) - f64::from(then.ready)) / secs)
                .collect()
        });
        let table = queue_table(&lines, rates.as_deref());
        if args.watch {
            // Clear the screen and draw in place.
            print!("\x1b[2J\x1b[H{table}");
        } else {
            print!("{table}");
            break;
        }
        last = Some((Instant::now(), lines));
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// `ringpush who <gateway_id>`: the answer to "why did my phone not ring?".
pub async fn who(args: WhoArgs) -> anyhow::Result<String> {
    let pool = args.database.pool()?;
    let mut out = String::new();
    match crate::db::who(&pool, &args.gateway_id).await? {
        None => {
            let _ = writeln!(
                out,
                "no gateway {:?}: its rings are acked and counted as unknown_gateway",
                args.gateway_id
            );
        }
        Some((name, reach)) => {
            let _ = writeln!(
                out,
                "gateway {:?} ({name}): a ring now reaches {} phone(s)",
                args.gateway_id,
                reach.len()
            );
            let _ = writeln!(
                out,
                "{:>8}  {:<7} {:<11} {:<11} {:<28} registered",
                "user", "role", "token", "environment", "topic"
            );
            for r in &reach {
                let topic = r.topic.as_deref().unwrap_or("(RINGPUSH_APNS_TOPIC)");
                let _ = writeln!(
                    out,
                    "{:>8}  {:<7} {:<11} {:<11} {:<28} {}",
                    r.user_id,
                    r.role,
                    r.token.short(),
                    r.environment,
                    topic,
                    r.registered
                );
            }
        }
    }
    Ok(out)
}

/// `ringpush ring`: publishes rings as a gateway would, confirmed, at a steady rate.
pub async fn ring(args: RingArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    crate::ring::check_gateway_id(&args.gateway_id)?;
    let names = args.broker.names();
    let connection = broker::connect(&args.broker.amqp_url, "ringpush ring").await?;
    let channel = broker::confirm_channel(&connection).await?;
    broker::declare(&channel, &names).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.per_second);
    for _ in 0..args.count {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let ring = RingEvent {
            event_id: crate::token::random_hex(16),
            gateway_id: args.gateway_id.clone(),
            pressed_at: time::OffsetDateTime::now_utc(),
            switch_id: None,
        };
        broker::publish_ring(&channel, &names, &ring).await?;
        println!("rang {} (event {})", ring.gateway_id, ring.event_id);
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// `ringpush seed`: a gateway with an owner and phones, unless it exists.
pub async fn seed(args: SeedArgs) -> anyhow::Result<String> {
    let pool = args.database.pool()?;
    let created = crate::db::seed(&pool, &args.gateway_id, args.phones, &args.topic).await?;
    Ok(if created {
        format!(
            "created gateway {} with {} phone(s)\n",
            args.gateway_id, args.phones
        )
    } else {
        format!("gateway {} exists; nothing changed\n", args.gateway_id)
    })
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
                consumers: 3,
            },
            QueueLine {
                queue: "ringpush.rings.dead".into(),
                ready: 2,
                consumers: 0,
            },
        ];
        let table = queue_table(&lines, Some(&[-150.0, 0.5]));
        let rows: Vec<&str> = table.lines().collect();
        assert!(
            rows[1].starts_with("ringpush.rings ")
                && rows[1].contains(" 1200 ")
                && rows[1].ends_with("-150.0"),
            "{table}"
        );
        assert!(rows[2].ends_with("+0.5"), "{table}");
        assert!(queue_table(&lines, None)
            .lines()
            .nth(1)
            .unwrap()
            .ends_with('-'));
    }
}
