//! The `ringpush` binary: parse configuration, start telemetry, run one command until it
//! ends or a signal asks it to stop. Everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ringpush::config::{Cli, Command};
use ringpush::{db, demo, mock, worker};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints a report for a person: keep the logs to errors unless asked.
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "error"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let cancel = shutdown_on_signals();
    match run(cli.command, cancel).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, cancel: CancellationToken) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => {
            let applied = db::migrate(&args.database_url).await?;
            if applied.is_empty() {
                println!("schema is up to date; nothing applied");
            } else {
                println!("applied {}", applied.join(", "));
            }
            Ok(())
        }
        Command::Worker(args) => {
            let settings = args.settings()?;
            let apns = args.apns.client()?;
            let pool = args.database.pool()?;
            let counters = Arc::new(worker::Counters::default());
            worker::run(
                settings,
                &args.broker.amqp_url,
                pool,
                apns,
                counters,
                cancel,
            )
            .await
        }
        Command::Feedback(args) => {
            let counters = Arc::new(ringpush::feedback::Counters::default());
            ringpush::feedback::run(args.settings(), &args.broker.amqp_url, counters, cancel).await
        }
        Command::Purge(args) => {
            let pool = args.database.pool()?;
            let counters = Arc::new(ringpush::purge::Counters::default());
            ringpush::purge::run(
                args.settings(),
                &args.broker.amqp_url,
                pool,
                counters,
                cancel,
            )
            .await
        }
        Command::MockApns(args) => {
            let (settings, unregistered) = args.settings()?;
            let now_ms = ringpush::apns::jwt::unix_now() * 1000;
            let scripts = unregistered
                .into_iter()
                .map(|t| {
                    (
                        t,
                        mock::Script {
                            status: 410,
                            reason: ringpush::apns::Reason::Unregistered,
                            timestamp_ms: Some(now_ms),
                        },
                    )
                })
                .collect();
            mock::run(settings, scripts, cancel).await
        }
        Command::Ring(args) => ring(args, cancel).await,
        Command::Demo(args) => {
            let report = demo::run(&args, cancel).await?;
            print!("{report}");
            Ok(())
        }
    }
}

/// `ringpush ring`: publishes rings as a gateway would, confirmed, at a steady rate.
async fn ring(args: ringpush::config::RingArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    use ringpush::ring::RingEvent;
    ringpush::ring::check_gateway_id(&args.gateway_id)?;
    let names = args.broker.names();
    let connection = ringpush::broker::connect(&args.broker.amqp_url, "ringpush ring").await?;
    let channel = ringpush::broker::confirm_channel(&connection).await?;
    ringpush::broker::declare(&channel, &names).await?;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1) / args.per_second);
    for _ in 0..args.count {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let ring = RingEvent {
            event_id: ringpush::demo::random_hex(16),
            gateway_id: args.gateway_id.clone(),
            pressed_at: time::OffsetDateTime::now_utc(),
            switch_id: None,
        };
        ringpush::broker::publish_ring(&channel, &names, &ring).await?;
        println!("rang {} (event {})", ring.gateway_id, ring.event_id);
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// The first SIGINT or SIGTERM cancels the token (finish what is in flight, then exit); a
/// second one exits at once.
fn shutdown_on_signals() -> CancellationToken {
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!("signal received: finishing in-flight work (again to exit at once)");
                token.cancel();
            } else {
                std::process::exit(130);
            }
        }
    });
    cancel
}
