//! The HTTP/2 client against the mock: stream limits, GOAWAY, refused streams, a cut
//! connection, JWT renewal, certificate auth, PINGs and backoff. Real TLS, real `h2`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use ringpush::apns::http2::{self, Client};
use ringpush::apns::jwt::{self, Signer};
use ringpush::apns::request::{Endpoint, Notification};
use ringpush::apns::{Answer, Environment, Reason, SendError};
use ringpush::mock::{self, Faults, GoAwayDebug, Mock, Script};
use ringpush::tls::{self, Identity};
use ringpush::token::random_hex;
use ringpush::token::DeviceToken;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

use crate::support::{KEY_ID, TEAM_ID, TOPIC};

/// A mock with its own certificates and a key the clients sign with.
struct Apns {
    mock: Mock,
    key_pem: String,
    cancel: CancellationToken,
    dir: std::path::PathBuf,
}

impl Drop for Apns {
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Apns {
    async fn start(edit: impl FnOnce(&mut mock::Settings)) -> Self {
        let dir = std::env::temp_dir().join(format!("ringpush-apns-{}", random_hex(6)));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let auth = mock::AuthCheck::key(
            mock::KeyCheck::from_pem(key.public_key_pem().as_bytes(), KEY_ID, TEAM_ID).unwrap(),
        );
        let mut settings = mock::Settings::local(dir.join("certs"), auth);
        edit(&mut settings);
        let cancel = CancellationToken::new();
        let mock = Mock::start(settings, cancel.clone()).await.unwrap();
        Self {
            mock,
            key_pem: key.serialize_pem(),
            cancel,
            dir,
        }
    }

    fn signer(&self, refresh: Duration) -> Arc<Signer> {
        Arc::new(
            Signer::from_pem(self.key_pem.as_bytes(), KEY_ID, TEAM_ID, refresh)
                .unwrap()
                .with_min_interval(Duration::ZERO),
        )
    }

    fn settings(&self, edit: impl FnOnce(&mut http2::Settings)) -> http2::Settings {
        let mut s = self.mock.client_settings();
        edit(&mut s);
        s
    }

    /// A token-auth client.
    fn client(&self, edit: impl FnOnce(&mut http2::Settings)) -> Client {
        let tls = tls::client_config(Some(self.mock.ca_file()), None).unwrap();
        Client::new(
            self.settings(edit),
            tls,
            Some(self.signer(jwt::DEFAULT_REFRESH)),
        )
    }
}

fn notification(token: &DeviceToken) -> Notification {
    Notification {
        push_type: ringpush::apns::request::PushType::Alert,
        token: token.clone(),
        topic: TOPIC.into(),
        collapse_id: random_hex(8),
        expiration: jwt::unix_now() + 60,
        payload: Bytes::from_static(br#"{"aps":{"alert":"ring"}}"#),
    }
}

fn tokens(n: usize) -> Vec<DeviceToken> {
    (0..n)
        .map(|_| DeviceToken::parse(&random_hex(32)).unwrap())
        .collect()
}

/// Sends one notification per token, all at once.
async fn send_all(client: &Client, tokens: &[DeviceToken]) -> Vec<Result<Answer, SendError>> {
    join_all(
        tokens
            .iter()
            .map(|t| async move { client.send(Environment::Production, &notification(t)).await }),
    )
    .await
}

/// How many times the mock processed each token.
fn processed(mock: &Mock) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in mock.received() {
        *counts.entry(r.token.unwrap()).or_default() += 1;
    }
    counts
}

fn assert_each_processed_once(mock: &Mock, tokens: &[DeviceToken]) {
    let counts = processed(mock);
    for t in tokens {
        assert_eq!(
            counts.get(t.as_hex()),
            Some(&1),
            "token {t} processed {:?} times",
            counts.get(t.as_hex())
        );
    }
    assert_eq!(counts.len(), tokens.len(), "nothing else was processed");
}

#[tokio::test]
async fn concurrency_never_exceeds_what_the_mock_announces() {
    let apns = Apns::start(|s| {
        s.initial_streams = 1;
        s.max_concurrent_streams = 5;
        s.response_delay = Duration::from_millis(20);
    })
    .await;
    let client = apns.client(|s| s.connections = 1);
    let tokens = tokens(60);
    let results = send_all(&client, &tokens).await;
    assert!(
        results.iter().all(|r| matches!(r, Ok(Answer::Accepted))),
        "{results:?}"
    );
    let stats = apns.mock.stats();
    assert_eq!(stats.limit_violations, 0, "{stats:?}");
    assert_eq!(stats.connections, 1);
    assert!(
        stats.max_in_flight > 1 && stats.max_in_flight <= 5,
        "{stats:?}"
    );
    // The first request went alone: APNs allows one stream before the first accepted one.
    let first: Vec<_> = apns
        .mock
        .received()
        .into_iter()
        .filter(|r| r.stream_id == 1)
        .collect();
    assert_eq!(first.len(), 1);
}

#[tokio::test]
async fn the_stream_limit_falls_after_a_rejection_and_the_client_follows_it() {
    let apns = Apns::start(|s| {
        s.max_concurrent_streams = 8;
        s.drop_streams_after_rejection = true;
        s.response_delay = Duration::from_millis(10);
    })
    .await;
    let client = apns.client(|s| s.connections = 1);
    let tokens = tokens(40);
    for t in tokens.iter().step_by(5) {
        apns.mock.script(
            t,
            Script {
                status: 400,
                reason: Reason::BadDeviceToken,
                timestamp_ms: None,
            },
        );
    }
    let results = send_all(&client, &tokens).await;
    let rejected = results
        .iter()
        .filter(|r| matches!(r, Ok(Answer::Rejected(_))))
        .count();
    assert_eq!(rejected, 8);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(apns.mock.stats().limit_violations, 0);
}

#[tokio::test]
async fn after_goaway_every_notification_is_processed_exactly_once() {
    for debug in [GoAwayDebug::Json, GoAwayDebug::Text, GoAwayDebug::Empty] {
        let apns = Apns::start(|s| {
            s.response_delay = Duration::from_millis(5);
            s.faults = Faults {
                goaway_after: Some(7),
                goaway_debug: debug,
                ..Faults::default()
            };
        })
        .await;
        let client = apns.client(|s| s.connections = 2);
        let tokens = tokens(100);
        let results = send_all(&client, &tokens).await;
        assert!(
            results.iter().all(|r| matches!(r, Ok(Answer::Accepted))),
            "{debug:?}: {results:?}"
        );
        assert_each_processed_once(&apns.mock, &tokens);
        let stats = apns.mock.stats();
        assert!(
            stats.goaways >= 10 && stats.connections >= 10,
            "{debug:?}: {stats:?}"
        );
    }
}

#[tokio::test]
async fn refused_streams_are_resent_and_processed_once() {
    let apns = Apns::start(|s| {
        s.faults = Faults {
            refuse_every: Some(3),
            ..Faults::default()
        }
    })
    .await;
    let client = apns.client(|_| {});
    let tokens = tokens(50);
    let results = send_all(&client, &tokens).await;
    assert!(
        results.iter().all(|r| matches!(r, Ok(Answer::Accepted))),
        "{results:?}"
    );
    assert_each_processed_once(&apns.mock, &tokens);
    assert!(apns.mock.stats().refused >= 16);
}

#[tokio::test]
async fn shutdown_is_answered_then_the_client_moves_to_a_new_connection() {
    let apns = Apns::start(|s| {
        s.faults = Faults {
            shutdown_after: Some(3),
            ..Faults::default()
        }
    })
    .await;
    let client = apns.client(|s| s.connections = 1);
    let mut answers = Vec::new();
    for t in tokens(8) {
        answers.push(
            client
                .send(Environment::Production, &notification(&t))
                .await
                .unwrap(),
        );
    }
    let shutdowns: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, Answer::Rejected(r) if r.reason == Reason::Shutdown && r.status == 503))
        .map(|(i, _)| i)
        .collect();
    // The 4th request on each connection is answered 503 Shutdown: requests 4 and 8.
    assert_eq!(shutdowns, [3, 7], "{answers:?}");
    let stats = apns.mock.stats();
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.goaways, 2);
}

#[tokio::test]
async fn a_mid_stream_tcp_close_loses_nothing_the_client_reports_accepted() {
    let apns = Apns::start(|s| {
        s.response_delay = Duration::from_millis(30);
        s.faults = Faults {
            close_after: Some(10),
            ..Faults::default()
        };
    })
    .await;
    let client = apns.client(|s| s.connections = 1);
    let tokens = tokens(40);
    let results = send_all(&client, &tokens).await;
    let counts = processed(&apns.mock);
    let mut failed = Vec::new();
    for (token, result) in tokens.iter().zip(&results) {
        match result {
            Ok(Answer::Accepted) => assert_eq!(
                counts.get(token.as_hex()),
                Some(&1),
                "accepted but not processed: {token}"
            ),
            Ok(other) => panic!("unexpected answer {other:?}"),
            Err(_) => failed.push(token.clone()),
        }
    }
    assert!(!failed.is_empty(), "the close cut some streams");
    assert!(apns.mock.stats().cut > 0);
    // What failed is reported as failed, so the caller retries it; a later try gets through.
    apns.mock.set_faults(Faults::default());
    let retried = send_all(&client, &failed).await;
    assert!(
        retried.iter().all(|r| matches!(r, Ok(Answer::Accepted))),
        "{retried:?}"
    );
}

#[tokio::test]
async fn an_expired_provider_token_is_re_signed_and_sent_once_more_on_a_new_connection() {
    let apns = Apns::start(|s| s.auth.max_age = Duration::from_secs(1)).await;
    let tls = tls::client_config(Some(apns.mock.ca_file()), None).unwrap();
    let signer = apns.signer(Duration::from_secs(3600));
    let client = Client::new(
        apns.settings(|s| s.connections = 1),
        tls,
        Some(signer.clone()),
    );
    let [early, late] = <[DeviceToken; 2]>::try_from(tokens(2)).unwrap();
    assert_eq!(
        client
            .send(Environment::Production, &notification(&early))
            .await
            .unwrap(),
        Answer::Accepted
    );
    let first_jwt = signer.token();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        client
            .send(Environment::Production, &notification(&late))
            .await
            .unwrap(),
        Answer::Accepted
    );
    assert!(!Arc::ptr_eq(&first_jwt, &signer.token()), "re-signed");
    let stats = apns.mock.stats();
    assert_eq!(stats.rejected.get("ExpiredProviderToken"), Some(&1));
    assert_eq!(
        stats.connections, 2,
        "the connection that saw the expired token was replaced"
    );
}

#[tokio::test]
async fn a_connection_whose_token_changes_too_often_is_refused() {
    let apns = Apns::start(|_| {}).await;
    let tls = tls::client_config(Some(apns.mock.ca_file()), None).unwrap();
    // A signer that re-signs for every request, against APNs's advice.
    let eager = Arc::new(
        Signer::from_pem(apns.key_pem.as_bytes(), KEY_ID, TEAM_ID, Duration::ZERO).unwrap(),
    );
    let client = Client::new(apns.settings(|s| s.connections = 1), tls, Some(eager));
    let [a, b] = <[DeviceToken; 2]>::try_from(tokens(2)).unwrap();
    assert_eq!(
        client
            .send(Environment::Production, &notification(&a))
            .await
            .unwrap(),
        Answer::Accepted
    );
    tokio::time::sleep(Duration::from_millis(1100)).await; // a different iat, so a different token
    let answer = client
        .send(Environment::Production, &notification(&b))
        .await
        .unwrap();
    assert!(
        matches!(&answer, Answer::Rejected(r) if r.status == 429 && r.reason == Reason::TooManyProviderTokenUpdates),
        "{answer:?}"
    );
}

#[tokio::test]
async fn certificate_auth_works_with_a_p12_made_in_the_test() {
    let apns = Apns::start(|_| {}).await;
    let (cert_pem, key_pem) = apns
        .mock
        .issue_client_certificate("com.example.doorbell")
        .unwrap();
    // A .p12 as Keychain would export it, with a password.
    let cert = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let key = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let chain = p12_keystore::PrivateKeyChain::new(
        random_hex(4).into_bytes(),
        p12_keystore::PrivateKey::from_der(key.secret_pkcs8_der()).unwrap(),
        vec![p12_keystore::Certificate::from_der(cert.as_ref()).unwrap()],
    );
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("apns", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    let p12 = apns.dir.join("apns.p12");
    std::fs::write(&p12, store.writer("s3cret").write().unwrap()).unwrap();
    let pem = apns.dir.join("apns.pem");
    std::fs::write(&pem, format!("{cert_pem}{key_pem}")).unwrap();

    let wrong = Identity::from_file(&p12, "wrong").unwrap_err().to_string();
    assert!(wrong.contains("password"), "{wrong}");
    for file in [&p12, &pem] {
        let identity = Identity::from_file(file, "s3cret").unwrap();
        let tls = tls::client_config(Some(apns.mock.ca_file()), Some(identity)).unwrap();
        let client = Client::new(apns.settings(|_| {}), tls, None);
        let token = DeviceToken::parse(&random_hex(32)).unwrap();
        let answer = client
            .send(Environment::Production, &notification(&token))
            .await
            .unwrap();
        assert_eq!(answer, Answer::Accepted, "{}", file.display());
    }
    let received = apns.mock.received();
    assert_eq!(received.len(), 2);
    assert!(received
        .iter()
        .all(|r| r.certificate && !r.headers.contains_key("authorization")));
    // Without a certificate or a JWT the mock refuses, as APNs does.
    let tls = tls::client_config(Some(apns.mock.ca_file()), None).unwrap();
    let anonymous = Client::new(apns.settings(|_| {}), tls, None);
    let answer = anonymous
        .send(
            Environment::Production,
            &notification(&DeviceToken::parse("abcd").unwrap()),
        )
        .await
        .unwrap();
    assert!(matches!(answer, Answer::Rejected(r) if r.reason == Reason::MissingProviderToken));
}

#[tokio::test]
async fn an_idle_connection_is_pinged() {
    let apns = Apns::start(|_| {}).await;
    let client = apns.client(|s| {
        s.connections = 1;
        s.ping_interval = Some(Duration::from_millis(100));
    });
    let started = Instant::now();
    client
        .send(Environment::Production, &notification(&tokens(1)[0]))
        .await
        .unwrap();
    // Pinged while idle: wait (bounded) for a few pings, then check they were not sent more
    // often than every 100 ms. A slow machine only delays pings, it cannot add any.
    let deadline = started + Duration::from_secs(30);
    while apns.mock.stats().pings < 3 {
        assert!(
            Instant::now() < deadline,
            "an idle connection was not pinged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pings = apns.mock.stats().pings;
    let most = started.elapsed().as_millis() as u64 / 100 + 1;
    assert!(pings <= most, "{pings} pings in {:?}", started.elapsed());
}

/// How many tries a backoff allows within `elapsed`: one at once, then one after each wait
/// (`first`, doubling up to `cap`, one after the other), each at its shortest (jitter × 0.5).
fn tries_within(elapsed: Duration, first: Duration, cap: Duration) -> u64 {
    let (mut tries, mut at, mut wait) = (1, Duration::ZERO, first);
    loop {
        at += wait.min(cap) / 2;
        if at > elapsed {
            return tries;
        }
        tries += 1;
        wait *= 2;
    }
}

#[tokio::test]
async fn an_unreachable_apns_is_probed_with_backoff_not_hammered() {
    // Something that takes connections and drops them at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    let accepting = tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let apns = Apns::start(|_| {}).await;
    let endpoint = Endpoint::parse(&format!("https://localhost:{port}")).unwrap();
    let mut settings = http2::Settings::new(endpoint.clone(), endpoint);
    settings.connections = 2;
    settings.backoff_min = Duration::from_millis(200);
    let (first, cap) = (settings.backoff_min, settings.backoff_max);
    let tls = tls::client_config(Some(apns.mock.ca_file()), None).unwrap();
    let client = Client::new(settings, tls, Some(apns.signer(jwt::DEFAULT_REFRESH)));
    let started = Instant::now();
    let sends = 40;
    for _ in 0..sends {
        let result = client
            .send(Environment::Production, &notification(&tokens(1)[0]))
            .await;
        assert!(
            matches!(
                result,
                Err(SendError::Connect { .. } | SendError::Backoff { .. })
            ),
            "{result:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let attempts = accepted.load(Ordering::SeqCst);
    // Two connections, each tried once and then once per backoff period (200 ms, 400 ms…,
    // jittered): 4 in the usual 250 ms of this loop; without backoff, one per send.
    let most = 2 * tries_within(elapsed, first, cap);
    assert!(
        attempts <= most,
        "{attempts} connection attempts for {sends} sends in {elapsed:?} (at most {most})"
    );
    accepting.abort();
}

#[tokio::test]
async fn connections_that_end_before_answering_are_backed_off_not_hammered() {
    // The mock drops each connection as its first request arrives, before answering it.
    let apns = Apns::start(|s| {
        s.faults = Faults {
            close_after: Some(0),
            ..Faults::default()
        };
    })
    .await;
    let client = apns.client(|s| {
        s.connections = 1;
        s.backoff_min = Duration::from_millis(200);
        s.backoff_max = Duration::from_secs(1);
    });
    let started = Instant::now();
    let (sends, mut backed_off) = (60, 0);
    for _ in 0..sends {
        let result = client
            .send(Environment::Production, &notification(&tokens(1)[0]))
            .await;
        assert!(result.is_err(), "nothing is answered: {result:?}");
        if matches!(result, Err(SendError::Backoff { .. })) {
            backed_off += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let handshakes = apns.mock.stats().connections;
    assert!(backed_off > 0, "{sends} sends, none backed off");
    // A new connection per send would be one handshake per send; the second unanswered
    // connection in a row is replaced at once, then each waits 200 ms, 400 ms… (jittered,
    // capped at 1 s): 5 in the usual 700 ms of this loop.
    let most = 1 + tries_within(elapsed, Duration::from_millis(200), Duration::from_secs(1));
    assert!(
        handshakes <= most,
        "{handshakes} handshakes for {sends} sends in {elapsed:?} (at most {most})"
    );

    apns.mock.set_faults(Faults::default());
    let recovered = async {
        loop {
            let result = client
                .send(Environment::Production, &notification(&tokens(1)[0]))
                .await;
            if matches!(result, Ok(Answer::Accepted)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), recovered)
        .await
        .expect("accepted again once connections are answered");
}
