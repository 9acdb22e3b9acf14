//! Every hop encrypted and verified, against real TLS servers the tests start on ports of
//! their own ([`crate::servers`]): a RabbitMQ node that speaks AMQP only over TLS and asks
//! every client for a certificate, its management API over https, a PostgreSQL instance that
//! takes TLS connections only, and one without TLS. The certificates are the tests' own; the
//! servers' name only `localhost`, so `127.0.0.1` is a name they are not valid for.

use std::path::Path;
use std::time::Duration;

use ringpush::broker::{self, Endpoint, Names};
use ringpush::local::{Key, Local};
use ringpush::mock::Mock;
use ringpush::tls::Identity;
use ringpush::token::{random_hex, DeviceToken};
use ringpush::wire::ring::RingEvent;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::servers::{self, TlsWorld, SCRAM_PASSWORD, SCRAM_USER, SERVER_NAME};
use crate::support::{KEY_ID, TEAM_ID, TOPIC};

/// The TLS node's URL at `host`, trusting the tests' CA (`ca`) and presenting the tests'
/// client certificate when `client_cert`.
fn endpoint(world: &TlsWorld, host: &str, ca: &Path, client_cert: bool) -> Endpoint {
    let identity = client_cert
        .then(|| Identity::from_pem_files(&world.client_cert, &world.client_key).unwrap());
    Endpoint::with_tls(world.amqps_url(host), Some(ca), identity).unwrap()
}

/// What connecting says: `Ok(())` or the error's text.
async fn connects(endpoint: &Endpoint) -> Result<(), String> {
    match broker::connect(endpoint, "ringpush tls test").await {
        Ok(connection) => {
            let _ = connection.close(200, "done".into()).await;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Runs one statement through `url` and says whether the session is encrypted.
async fn pg_session_is_tls(url: &str) -> Result<bool, String> {
    let pool = ringpush::db::pool(url, 1, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let client = pool
        .get()
        .await
        .map_err(|e| ringpush::db::DbError::from(e).to_string())?;
    let row = client
        .query_one(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// The management API's record of the connection named `name`, once it has one.
async fn connection_record(world: &TlsWorld, name: &str) -> serde_json::Value {
    let http = ringpush::http::Client::with_ca(&world.ca_file).unwrap();
    let url = format!("{}/api/connections", world.management_url());
    for _ in 0..60 {
        let r = http.get(&url, Duration::from_secs(10)).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let all: Vec<serde_json::Value> = serde_json::from_str(&r.body).unwrap();
        if let Some(c) = all.into_iter().find(|c| c["user_provided_name"] == name) {
            return c;
        }
        // The management API's view of connections lags a little.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("no connection named {name:?} in the management API");
}

#[tokio::test]
async fn rings_reach_phones_over_amqps_and_postgres_verify_full() {
    let world = servers::tls_world().await;
    let id = random_hex(6);
    let ca = world.ca_file.display().to_string();
    // verify-full against the tests' CA, the host name checked; SCRAM bound to the TLS
    // session (channel_binding=require fails unless the binding is the server's own).
    let db_url = format!(
        "postgres://{SCRAM_USER}:{SCRAM_PASSWORD}@{SERVER_NAME}:{}/postgres?sslmode=verify-full&sslrootcert={ca}&channel_binding=require",
        world.pg_tls_port
    );
    let amqp = endpoint(&world, SERVER_NAME, &world.ca_file, true);
    let local = Local::named(
        Names::new(&format!("t-{id}")),
        format!("t_{id}"),
        std::env::temp_dir().join(format!("ringpush-test-{id}")),
        amqp.clone(),
        &db_url,
    );
    local
        .create_schema()
        .await
        .expect("schema over verify-full");
    local.migrate().await.expect("migrated over verify-full");
    assert_eq!(pg_session_is_tls(&local.db_url()).await, Ok(true));

    // A gateway with one iPhone.
    let pool = local.pool(2, Duration::from_secs(10)).unwrap();
    let token = DeviceToken::parse(&random_hex(32)).unwrap();
    {
        let db = pool.get().await.unwrap();
        let user: i64 = db
            .query_one("INSERT INTO users DEFAULT VALUES RETURNING id", &[])
            .await
            .unwrap()
            .get(0);
        db.execute(
            "INSERT INTO gateways (id, owner_id, name) VALUES ('gw-tls', $1, 'Front door')",
            &[&user],
        )
        .await
        .unwrap();
        db.execute(
            "INSERT INTO push_tokens (token, user_id, environment, topic) VALUES ($1, $2, 'production', $3)",
            &[&token.as_hex(), &user, &TOPIC],
        )
        .await
        .unwrap();
    }

    // The mock APNs, and `ringpush worker` configured as an operator would.
    let cancel = CancellationToken::new();
    let key = Key::generate(KEY_ID, TEAM_ID).unwrap();
    let mock = Mock::start(local.mock_settings(&key).unwrap(), cancel.clone())
        .await
        .unwrap();
    std::fs::create_dir_all(&local.dir).unwrap();
    let key_file = local.dir.join("key.p8");
    std::fs::write(&key_file, &key.pem).unwrap();
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .arg("worker")
        .env("RINGPUSH_AMQP_URL", world.amqps_url(SERVER_NAME))
        .env("RINGPUSH_AMQP_CA_FILE", &world.ca_file)
        .env("RINGPUSH_AMQP_CERT_FILE", &world.client_cert)
        .env("RINGPUSH_AMQP_KEY_FILE", &world.client_key)
        .env("RINGPUSH_DATABASE_URL", local.db_url())
        .env("RINGPUSH_QUEUE_PREFIX", &local.names.prefix)
        .env("RINGPUSH_APNS_PRODUCTION_URL", mock.url())
        .env("RINGPUSH_APNS_SANDBOX_URL", mock.url())
        .env("RINGPUSH_APNS_CA_FILE", mock.ca_file())
        .env("RINGPUSH_APNS_KEY_FILE", &key_file)
        .env("RINGPUSH_APNS_KEY_ID", KEY_ID)
        .env("RINGPUSH_APNS_TEAM_ID", TEAM_ID)
        .env("RINGPUSH_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // A gateway rings over amqps (the topology declared first, as the worker does too).
    let connection = broker::connect(&amqp, "ringpush tls gateway")
        .await
        .unwrap();
    let channel = broker::confirm_channel(&connection).await.unwrap();
    broker::declare(&channel, &local.names).await.unwrap();
    let ring = RingEvent {
        event_id: random_hex(8),
        gateway_id: "gw-tls".into(),
        pressed_at: time::OffsetDateTime::now_utc(),
        switch_id: None,
    };
    broker::publish_ring(&channel, &local.names, &ring)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !mock
        .received()
        .iter()
        .any(|r| r.status == 200 && r.token.as_deref() == Some(token.as_hex()))
    {
        if let Some(status) = worker.try_wait().unwrap() {
            panic!("the worker exited: {status}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ring did not reach the phone"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The worker's broker connection is TLS and presented the client certificate.
    let record =
        connection_record(&world, &format!("ringpush worker {}", local.names.prefix)).await;
    assert_eq!(record["ssl"], true, "{record}");
    let subject = record["peer_cert_subject"].as_str().unwrap_or_default();
    assert!(subject.contains("ringpush test client"), "{record}");

    let _ = worker.kill().await;
    let _ = connection.close(200, "done".into()).await;
    cancel.cancel();
    let _ = std::fs::remove_dir_all(&local.dir);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let world = servers::tls_world().await;
    let other = world.other_ca_file.display().to_string();
    // The broker: trusting another CA, the node's certificate is refused; trusting ours, it
    // is accepted (the same client otherwise).
    let refused = connects(&endpoint(&world, SERVER_NAME, &world.other_ca_file, true)).await;
    let err = refused.expect_err("a certificate from another CA");
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );
    assert_eq!(
        connects(&endpoint(&world, SERVER_NAME, &world.ca_file, true)).await,
        Ok(())
    );
    // The public roots alone do not know the tests' CA either.
    let public = Endpoint::with_tls(
        world.amqps_url(SERVER_NAME),
        None,
        Some(Identity::from_pem_files(&world.client_cert, &world.client_key).unwrap()),
    )
    .unwrap();
    assert!(connects(&public).await.is_err());

    // PostgreSQL: every mode that uses TLS checks the chain.
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = world.pg_tls_url(SERVER_NAME, &format!("sslmode={mode}&sslrootcert={other}"));
        let err = pg_session_is_tls(&url).await.expect_err(mode);
        assert!(
            err.contains("certificate") || err.contains("UnknownIssuer"),
            "{mode}: {err}"
        );
    }
    // `prefer` never takes the unverified session: it tries plain, which this server refuses.
    let url = world.pg_tls_url(SERVER_NAME, &format!("sslmode=prefer&sslrootcert={other}"));
    let err = pg_session_is_tls(&url).await.expect_err("prefer");
    assert!(
        err.contains("pg_hba.conf") && err.contains("no encryption"),
        "{err}"
    );

    // The management API over https.
    let http = ringpush::http::Client::with_ca(&world.other_ca_file).unwrap();
    let err = http
        .get(
            &format!("{}/api/overview", world.management_url()),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    assert!(!err.contains("guest:guest"), "no password in errors: {err}");
}

#[tokio::test]
async fn under_verify_full_a_certificate_for_another_host_name_is_refused() {
    let world = servers::tls_world().await;
    let ca = world.ca_file.display().to_string();
    // The servers' certificates name `localhost` only; 127.0.0.1 is the same server by
    // another name.
    let full = |host| world.pg_tls_url(host, &format!("sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(pg_session_is_tls(&full(SERVER_NAME)).await, Ok(true));
    let err = pg_session_is_tls(&full("127.0.0.1")).await.unwrap_err();
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for"),
        "{err}"
    );
    // verify-ca checks the chain only: the same server by address is accepted.
    let ca_only = world.pg_tls_url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    assert_eq!(pg_session_is_tls(&ca_only).await, Ok(true));

    // amqps checks the name always.
    assert_eq!(
        connects(&endpoint(&world, SERVER_NAME, &world.ca_file, true)).await,
        Ok(())
    );
    let err = connects(&endpoint(&world, "127.0.0.1", &world.ca_file, true))
        .await
        .unwrap_err();
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for"),
        "{err}"
    );
}

#[tokio::test]
async fn sslmode_require_against_a_server_without_tls_is_refused() {
    let world = servers::tls_world().await;
    let ca = world.ca_file.display().to_string();
    let err = pg_session_is_tls(&world.pg_plain_url("sslmode=require"))
        .await
        .unwrap_err();
    assert!(err.contains("TLS"), "{err}");
    let full = world.pg_plain_url(&format!("sslmode=verify-full&sslrootcert={ca}"));
    assert!(pg_session_is_tls(&full).await.is_err());
    // `prefer` (the default) and `disable` connect, in plain.
    assert_eq!(
        pg_session_is_tls(&world.pg_plain_url("sslmode=prefer")).await,
        Ok(false)
    );
    assert_eq!(pg_session_is_tls(&world.pg_plain_url("")).await, Ok(false));
    assert_eq!(
        pg_session_is_tls(&world.pg_plain_url("sslmode=disable")).await,
        Ok(false)
    );
    // And `disable` against the TLS-only server: refused by it, never encrypted behind
    // the operator's back.
    let err = pg_session_is_tls(&world.pg_tls_url(SERVER_NAME, "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(err.contains("no encryption"), "{err}");
}

/// Accepts one connection on a listener of the test's own and records what the client sends
/// in its first two seconds (nothing is answered).
async fn first_bytes(url_for: impl FnOnce(u16) -> String) -> Vec<u8> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let recorder = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(n)) = tokio::time::timeout_at(until, socket.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let url = url_for(port);
    // The connection fails (nothing answers); what matters is what was sent.
    let _ = tokio::time::timeout(Duration::from_secs(10), broker::connect(url.as_str(), "t")).await;
    recorder.await.unwrap()
}

#[tokio::test]
async fn amqps_to_a_plain_listener_sends_no_plain_amqp_byte() {
    let header = b"AMQP\x00\x00\x09\x01";
    // amqp:// sends the protocol header first: the recorder sees it.
    let plain = first_bytes(|port| format!("amqp://guest:guest@127.0.0.1:{port}/%2f")).await;
    assert!(plain.starts_with(header), "{plain:?}");
    // amqps:// sends a TLS ClientHello (handshake record 0x16, TLS 0x03 0x0x) and nothing in
    // plain AMQP — also when the peer never answers.
    let tls = first_bytes(|port| format!("amqps://guest:guest@localhost:{port}/%2f")).await;
    assert!(tls.len() > 5, "{tls:?}");
    assert_eq!(
        (tls[0], tls[1]),
        (0x16, 0x03),
        "a TLS handshake record: {tls:?}"
    );
    assert_eq!(tls[5], 0x01, "a ClientHello: {tls:?}");
    assert!(!tls.windows(4).any(|w| w == b"AMQP"), "{tls:?}");
    assert!(!tls.windows(5).any(|w| w == b"guest"), "{tls:?}");
}

#[tokio::test]
async fn a_client_certificate_is_presented_to_rabbitmq_when_configured() {
    let world = servers::tls_world().await;
    // The node asks every client for a certificate and refuses one that has none.
    let without = connects(&endpoint(&world, SERVER_NAME, &world.ca_file, false)).await;
    assert!(without.is_err(), "the node requires a client certificate");
    let with = endpoint(&world, SERVER_NAME, &world.ca_file, true);
    let connection = broker::connect(&with, "ringpush tls client certificate")
        .await
        .expect("with the client certificate");
    let record = connection_record(&world, "ringpush tls client certificate").await;
    assert_eq!(record["ssl"], true, "{record}");
    assert!(
        record["peer_cert_subject"]
            .as_str()
            .unwrap_or_default()
            .contains("ringpush test client"),
        "{record}"
    );

    // The command line as an operator sets it: `ringpush queues` over amqps with the client
    // certificate, unacked counts from the management API over https.
    let names = Names::new(&format!("t-{}", random_hex(6)));
    broker::declare(&broker::confirm_channel(&connection).await.unwrap(), &names)
        .await
        .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .arg("queues")
        .env("RINGPUSH_AMQP_URL", world.amqps_url(SERVER_NAME))
        .env("RINGPUSH_AMQP_CA_FILE", &world.ca_file)
        .env("RINGPUSH_AMQP_CERT_FILE", &world.client_cert)
        .env("RINGPUSH_AMQP_KEY_FILE", &world.client_key)
        .env("RINGPUSH_QUEUE_PREFIX", &names.prefix)
        .env("RINGPUSH_MANAGEMENT_URL", world.management_url())
        .env("RINGPUSH_MANAGEMENT_CA_FILE", &world.ca_file)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&names.rings), "{stdout}");
    assert!(!stdout.contains("missing"), "{stdout}");
    assert!(
        !stdout.contains("AMQP does not report it"),
        "unacked came over https: {stdout}"
    );
    let _ = connection.close(200, "done".into()).await;
    // Without the key, the command stops at start naming the variable.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .arg("queues")
        .env("RINGPUSH_AMQP_URL", world.amqps_url(SERVER_NAME))
        .env("RINGPUSH_AMQP_CA_FILE", &world.ca_file)
        .env("RINGPUSH_AMQP_CERT_FILE", &world.client_cert)
        .env_remove("RINGPUSH_AMQP_KEY_FILE")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("RINGPUSH_AMQP_KEY_FILE"),
        "{stderr}"
    );
}

#[tokio::test]
async fn gateway_add_works_over_https_to_the_management_api() {
    let world = servers::tls_world().await;
    let names = Names::new(&format!("t-{}", random_hex(6)));
    let gateway = format!("t-gw-{}", random_hex(4));
    let ringpush = |args: &[&str], ca: Option<&Path>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringpush"));
        command
            .args(args)
            .env("RINGPUSH_AMQP_URL", world.amqps_url(SERVER_NAME))
            .env("RINGPUSH_QUEUE_PREFIX", &names.prefix)
            .env("RINGPUSH_MANAGEMENT_URL", world.management_url())
            .env_remove("RINGPUSH_MANAGEMENT_CA_FILE");
        if let Some(ca) = ca {
            command.env("RINGPUSH_MANAGEMENT_CA_FILE", ca);
        }
        command
    };
    // Without the CA the API's certificate is not trusted: nothing is sent.
    let out = ringpush(&["gateway", "add", &gateway], None)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("certificate") || stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    assert!(!stderr.contains("guest:guest"), "{stderr}");

    let out = ringpush(&["gateway", "add", &gateway], Some(&world.ca_file))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let password = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(password.len(), 40, "one generated password on stdout");

    // The gateway's own identity rings over amqps (with the client certificate the node
    // asks for): the topology first, as the workers declare it.
    let admin = endpoint(&world, SERVER_NAME, &world.ca_file, true);
    let connection = broker::connect(&admin, "t admin").await.unwrap();
    broker::declare(&broker::confirm_channel(&connection).await.unwrap(), &names)
        .await
        .unwrap();
    let own = admin.with_url(format!(
        "amqps://{gateway}:{password}@{SERVER_NAME}:{}/%2f",
        world.amqp_port
    ));
    let as_gateway = broker::connect(&own, "t gateway").await.unwrap();
    let channel = broker::confirm_channel(&as_gateway).await.unwrap();
    let ring = RingEvent {
        event_id: random_hex(8),
        gateway_id: gateway.clone(),
        pressed_at: time::OffsetDateTime::now_utc(),
        switch_id: None,
    };
    broker::publish_ring(&channel, &names, &ring)
        .await
        .expect("the gateway may publish its own ring");
    let _ = as_gateway.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;

    let out = ringpush(&["gateway", "remove", &gateway], Some(&world.ca_file))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
