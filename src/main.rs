//! The `ringpush` binary: parse configuration, start telemetry, run one command until it
//! ends or a signal asks it to stop. Everything else lives in the library.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use ringpush::cli::{Cli, Command, GatewayCommand, LogFormat, ServiceCommand};
use ringpush::{db, feedback, ops, purge, worker};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_env();
    // Reports for a person: keep the logs to errors unless asked (lapin reports a channel
    // it is closing at the end as an error, which is noise there).
    let default_level = match cli.command {
        #[cfg(feature = "kit")]
        Command::Demo(_) | Command::Bench(_) => "error,ringpush::cli=warn,lapin=off",
        // A queue not declared yet is a line in the table, not lapin's channel-close error.
        // (An unknown `RINGPUSH_*` variable is still said: `ringpush::cli` at warn.)
        Command::Queues(_)
        | Command::Who(_)
        | Command::History(_)
        | Command::Gateway(_)
        | Command::Service(_) => "error,ringpush::cli=warn,lapin=off",
        // rustls warns when a peer closes without close_notify (ordinary for servers that
        // just drop idle connections), and tokio-postgres logs every server NOTICE (each
        // `migrate` run's "already exists, skipping") at info: noise for an operator.
        _ => "info,rustls=error,tokio_postgres=warn",
    };
    // lapin's own lines about a lost connection repeat ringpush's one line per event.
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::new(ringpush::broker::log_directives(
        rust_log.as_deref(),
        default_level,
    ));
    // Colour only for a person at a terminal, never into a file or a pipe.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    ringpush::cli::warn_unknown_variables();
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
    #[cfg(feature = "kit")]
    let command = match kit::run(command, cancel.clone()).await {
        Ok(done) => return done,
        Err(command) => command,
    };
    match command {
        Command::Migrate(args) => {
            let applied = db::migrate(&args.database_url)
                .await
                .map_err(|e| args.explain(e.into()))?;
            if applied.is_empty() {
                println!("schema is up to date; nothing applied");
            } else {
                println!("applied {}", applied.join(", "));
            }
            Ok(())
        }
        Command::Worker(args) => {
            let pool = args.database.pool()?;
            let read_pool = args.database.read_pool()?;
            let url = &args.database.database_url;
            preflight(&pool, url, "RINGPUSH_DATABASE_URL", "the token lookup runs").await;
            if let (Some(read), Some(url)) = (&read_pool, &args.database.database_read_url) {
                let var = "RINGPUSH_DATABASE_READ_URL";
                preflight(read, url, var, "the token lookup runs").await;
            }
            let settings = args.settings()?;
            let apps = args.apps()?;
            let process = worker::Process {
                settings,
                amqp_url: args.broker.endpoint()?,
                pools: worker::Pools {
                    lookups: read_pool.unwrap_or_else(|| pool.clone()),
                    primary: pool,
                },
                providers: apps.providers().clone(),
                counters: Arc::default(),
                apps: Some(worker::Apps {
                    apps,
                    poll: args.apps_poll,
                }),
            };
            process.observe(&args.metrics.serve(), &cancel).await?;
            process.run(cancel).await
        }
        Command::Feedback(args) => {
            let process = feedback::Process {
                settings: args.settings()?,
                amqp_url: args.broker.endpoint()?,
                counters: Arc::default(),
            };
            process.observe(&args.metrics.serve(), &cancel).await?;
            process.run(cancel).await
        }
        Command::Purge(args) => {
            let pool = args.database.pool()?;
            let url = &args.database.database_url;
            preflight(&pool, url, "RINGPUSH_DATABASE_URL", "the schema is there").await;
            let process = purge::Process {
                settings: args.settings(),
                amqp_url: args.broker.endpoint()?,
                pool,
                counters: Arc::default(),
            };
            process.observe(&args.metrics.serve(), &cancel).await?;
            process.run(cancel).await
        }
        Command::Ring(args) => {
            let names = args.broker.names();
            let (amqp_url, via) = args.target()?;
            ops::ring(
                amqp_url,
                &names,
                &args.gateway_id,
                args.count,
                args.per_second,
                &via,
                args.end_event(),
                cancel,
            )
            .await
        }
        Command::History(args) => {
            let pool = args.database.pool()?;
            let history = ops::history(&pool, &args.gateway_id, args.limit).await;
            print!("{}", history.map_err(|e| args.database.explain(e))?);
            Ok(())
        }
        Command::Gateway(command) => gateway(command).await,
        Command::Service(command) => service(command).await,
        Command::Queues(args) if args.delete => {
            let names = args.broker.names();
            print!(
                "{}",
                ops::delete_topology(&args.broker.amqp_url, &names).await?
            );
            Ok(())
        }
        Command::Queues(args) => {
            let names = args.broker.names();
            let management = args.management()?;
            ops::queues(
                &args.broker.endpoint()?,
                &names,
                management.as_ref(),
                args.every(),
                cancel,
            )
            .await
        }
        Command::Who(args) => {
            let pool = args.database.pool()?;
            let who = ops::who(&pool, &args.gateway_id).await;
            print!("{}", who.map_err(|e| args.database.explain(e))?);
            Ok(())
        }
        Command::Seed(args) => {
            let pool = args.database.pool()?;
            let report = ops::seed(&pool, &args.gateway_id, args.phones()?, &args.topic).await;
            print!("{}", report.map_err(|e| args.database.explain(e))?);
            Ok(())
        }
        #[cfg(feature = "kit")]
        Command::MockApns(_) | Command::MockFcm(_) | Command::Demo(_) | Command::Bench(_) => {
            unreachable!("kit::run runs the kit's commands")
        }
    }
}

/// `ringpush gateway add|rotate|remove|list`: what changed goes to stderr; stdout carries
/// only a generated password (one line) or the list.
async fn gateway(command: GatewayCommand) -> anyhow::Result<()> {
    match command {
        GatewayCommand::Add(args) => {
            let id_args = &args.password.id;
            let (id, names) = (&id_args.gateway_id, id_args.management.broker.names());
            ringpush::gateway::check_id(id)?;
            args.prepare_password_file()?;
            let (password, generated) = args.password.password()?;
            let management = id_args.management.management()?;
            match management.add(&names, id, &password).await? {
                ringpush::gateway::Added::Exists => {
                    eprintln!("gateway {id} exists; nothing changed (`ringpush gateway rotate {id}` gives it a new password)");
                }
                ringpush::gateway::Added::Created => {
                    eprintln!("created the broker identity of gateway {id}: it may publish ring.{id} only");
                    if generated {
                        println!("{password}");
                    }
                }
            }
            Ok(())
        }
        GatewayCommand::Rotate(args) => {
            let id = &args.id.gateway_id;
            ringpush::gateway::check_id(id)?;
            let (password, generated) = args.password()?;
            args.id
                .management
                .management()?
                .rotate(id, &password)
                .await?;
            eprintln!("gateway {id} has a new password; its open connections were closed");
            if generated {
                println!("{password}");
            }
            Ok(())
        }
        GatewayCommand::Remove(args) => {
            let id = &args.gateway_id;
            if args.management.management()?.remove(id).await? {
                eprintln!(
                    "removed the broker identity of gateway {id}; its connections were closed"
                );
            } else {
                eprintln!("no gateway identity {id}; nothing changed");
            }
            Ok(())
        }
        GatewayCommand::List(args) => {
            let identities = args.management()?.list().await?;
            print!("{}", ringpush::gateway::list_table(&identities));
            Ok(())
        }
    }
}

/// `ringpush service add|remove|list`: what changed goes to stderr; stdout carries only a
/// generated password (one line) or the list.
async fn service(command: ServiceCommand) -> anyhow::Result<()> {
    use ringpush::service::{self, Added};
    match command {
        ServiceCommand::Add(args) => {
            let (role, name) = (args.role, &args.name.name);
            service::check_name(name)?;
            let (password, generated) = args.password()?;
            let m = &args.name.management;
            let (management, names) = (m.management()?, m.broker.names());
            match service::add(&management, &names, role, name, &password).await? {
                Added::Exists => {
                    eprintln!("service identity {name} ({role}) exists with its role's permissions; nothing changed");
                }
                Added::Repaired => {
                    eprintln!("service identity {name} ({role}) exists; its tags, limits or permissions were not the role's and were set again (its password is unchanged)");
                }
                Added::Created => {
                    eprintln!("declared the topology of {} and created the broker identity {name}: it may do what a {role} does and nothing else", names.prefix);
                    if generated {
                        println!("{password}");
                    }
                }
            }
            Ok(())
        }
        ServiceCommand::Remove(args) => {
            let name = &args.name;
            if service::remove(&args.management.management()?, name).await? {
                eprintln!("removed the service identity {name}; its connections were closed");
            } else {
                eprintln!("no service identity {name}; nothing changed");
            }
            Ok(())
        }
        ServiceCommand::List(args) => {
            let identities = service::list(&args.management()?).await?;
            print!("{}", service::list_table(&identities));
            Ok(())
        }
    }
}

/// Says at start where the database is, and — when it cannot be used — why (a wrong database,
/// role or password, a missing schema, no server there) and what to do about it. The process
/// goes on either way (it waits and retries). `ok` is what a working database means here.
async fn preflight(pool: &deadpool_postgres::Pool, url: &str, var: &str, ok: &str) {
    let database = db::target(url);
    match db::probe_lookup(pool).await {
        Ok(()) => tracing::info!(%database, "PostgreSQL answers; {ok}"),
        Err(e) if e.trouble() == db::Trouble::SchemaMissing => tracing::warn!(
            %database, error = %e.explain(url, var),
            "the schema is not there (yet); waiting for `ringpush migrate`"
        ),
        Err(e) => tracing::error!(
            %database, cause = e.trouble().label(), error = %e.explain(url, var),
            "cannot use PostgreSQL; waiting for it"
        ),
    }
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

/// The test kit's commands (feature `kit`): the mocks, the demo and the bench. Not in the
/// production binary (`--no-default-features`).
#[cfg(feature = "kit")]
mod kit {
    use ringpush::cli::{BenchArgs, Command, DemoArgs, MockArgs, MockFcmArgs};
    use ringpush::{demo, mock};
    use tokio_util::sync::CancellationToken;

    /// Runs a kit command, or gives any other command back.
    pub async fn run(
        command: Command,
        cancel: CancellationToken,
    ) -> Result<anyhow::Result<()>, Command> {
        Ok(match command {
            Command::MockApns(args) => mock_apns(args, cancel).await,
            Command::MockFcm(args) => mock_fcm(args, cancel).await,
            Command::Demo(args) => run_demo(args, cancel).await,
            Command::Bench(args) => bench(args).await,
            other => return Err(other),
        })
    }

    async fn mock_apns(args: MockArgs, cancel: CancellationToken) -> anyhow::Result<()> {
        let (settings, unregistered) = args.settings()?;
        let scripts = unregistered
            .into_iter()
            .map(|t| {
                let script = mock::Script {
                    status: 410,
                    reason: ringpush::apns::Reason::Unregistered,
                    // Dated when answered (a phone registered after the mock started is
                    // still stale when the mock rejects it).
                    timestamp_ms: None,
                };
                (t, script)
            })
            .collect();
        mock::run(settings, scripts, cancel).await
    }

    async fn mock_fcm(args: MockFcmArgs, cancel: CancellationToken) -> anyhow::Result<()> {
        let (settings, credentials) = args.settings()?;
        ringpush::mock_fcm::run(settings, credentials, cancel).await
    }

    async fn run_demo(args: DemoArgs, cancel: CancellationToken) -> anyhow::Result<()> {
        let report = demo::run(&args.settings()?, cancel).await?;
        print!("{report}");
        Ok(())
    }

    async fn bench(args: BenchArgs) -> anyhow::Result<()> {
        let report = ringpush::bench::run(&args.settings()).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            print!("{report}");
        }
        Ok(())
    }
}
