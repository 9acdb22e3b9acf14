//! A private world on the local RabbitMQ and PostgreSQL, as `ringpush demo`, `ringpush
//! bench` and the integration tests stand it up: a queue prefix of its own
//! ([`broker::Names`]), a schema of its own (created, migrated, pooled), a directory for its
//! files, an ES256 key the client signs JWTs with and the mock checks them against, the
//! mock APNs's settings and an HTTP/2 client (or, for the legacy interface, a client
//! certificate) that trusts the mock's CA; and [`Local::clean_up`], which leaves the broker,
//! the database and the disk as they were. [`write_app`] and [`write_cert_app`] make the
//! folders of an apps directory (`RINGPUSH_APPS_DIR`) against running mocks.
//!
//! What each caller does with its world stays with it: the demo's seeding and report, the
//! bench's worker and mock processes, the tests' fault proxies and clean-up on drop.

mod apps;

pub use apps::{write_app, write_cert_app, AppApns, AppFcm, AppFolder, Layout};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::options::QueueDeleteOptions;
use tokio_rustls::rustls::ClientConfig;

use crate::apns::http2;
use crate::apns::jwt::{self, JwtError, Signer};
use crate::apns::request::Endpoint;
use crate::broker::{self, Names};
use crate::db::{self, DbError};
use crate::mock::{self, Mock};
use crate::tls;
use crate::token::random_hex;

/// Where a private world lives: its queues, its schema and its files. Nothing exists until
/// it is created ([`Local::create_schema`], [`broker::declare`]); [`Local::clean_up`]
/// removes whatever was.
#[derive(Debug, Clone)]
pub struct Local {
    /// The local RabbitMQ, where the world's exchanges and queues are declared.
    pub amqp_url: broker::Endpoint,
    /// The local PostgreSQL (its URL without the world's schema).
    pub database_url: String,
    /// The prefix of every exchange and queue of the world.
    pub names: Names,
    /// The world's schema; [`Local::db_url`] selects it.
    pub schema: String,
    /// The world's files (keys, certificates, logs); created by whoever writes first.
    pub dir: PathBuf,
}

impl Local {
    /// A world named after `tool` and a random id: queues `ringpush-<tool>-<id>`, schema
    /// `ringpush_<tool>_<id>`, files in `<temp>/ringpush-<tool>-<id>`.
    pub fn new(tool: &str, amqp_url: impl Into<broker::Endpoint>, database_url: &str) -> Self {
        let id = random_hex(4);
        Self::named(
            Names::new(&format!("ringpush-{tool}-{id}")),
            format!("ringpush_{tool}_{id}"),
            std::env::temp_dir().join(format!("ringpush-{tool}-{id}")),
            amqp_url,
            database_url,
        )
    }

    /// A world with names of the caller's choosing (the tests' `t-…` and `t_…`).
    pub fn named(
        names: Names,
        schema: String,
        dir: PathBuf,
        amqp_url: impl Into<broker::Endpoint>,
        database_url: &str,
    ) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            database_url: database_url.to_owned(),
            names,
            schema,
            dir,
        }
    }

    /// The database URL that selects the world's schema.
    pub fn db_url(&self) -> String {
        db::url_with_schema(&self.database_url, &self.schema)
    }

    /// Creates the world's schema, empty.
    pub async fn create_schema(&self) -> Result<(), DbError> {
        db::create_schema(&self.database_url, &self.schema).await
    }

    /// Applies `migrations/` to the world's schema.
    pub async fn migrate(&self) -> Result<(), DbError> {
        db::migrate(&self.db_url()).await.map(drop)
    }

    /// Creates the world's schema and migrates it.
    pub(crate) async fn create_migrated_schema(&self) -> Result<(), DbError> {
        self.create_schema().await?;
        self.migrate().await
    }

    /// A pool on the world's schema.
    pub fn pool(&self, max_size: usize, timeout: Duration) -> Result<Pool, DbError> {
        db::pool(&self.db_url(), max_size, timeout)
    }

    /// A mock APNs on an ephemeral loopback port, its certificates in the world's
    /// `mock-certs`, checking JWTs against `key`.
    pub fn mock_settings(&self, key: &Key) -> Result<mock::Settings, JwtError> {
        Ok(mock::Settings::local(
            self.dir.join("mock-certs"),
            key.auth_check()?,
        ))
    }

    /// TLS for the mock's legacy binary gateway and feedback service, which know only
    /// certificate auth: a client certificate issued by the mock's CA (written to the
    /// world's `client.pem`), trusting that CA.
    pub fn binary_tls(&self, mock: &Mock) -> anyhow::Result<Arc<ClientConfig>> {
        let (cert, key) = mock.issue_client_certificate("com.example.doorbell")?;
        std::fs::create_dir_all(&self.dir)?;
        let pem = self.dir.join("client.pem");
        std::fs::write(&pem, format!("{cert}{key}"))?;
        let identity = tls::Identity::from_file(&pem, "")?;
        Ok(tls::client_config(Some(mock.ca_file()), Some(identity))?)
    }

    /// Deletes the world's exchanges and queues (and `other_queues`, declared by the caller
    /// outside the topology), drops its schema and removes its files. Every step is tried
    /// whatever happened before; the first failure is the answer.
    pub(crate) async fn clean_up(&self, other_queues: &[String]) -> anyhow::Result<()> {
        let queues = delete_queues(&self.amqp_url, &self.names, other_queues).await;
        let schema = db::drop_schema(&self.database_url, &self.schema).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        queues?;
        schema?;
        Ok(())
    }
}

/// Deletes a prefix's topology and `other_queues` from the broker, each whatever happened
/// to the others; the first failure is the answer.
pub async fn delete_queues(
    amqp_url: impl Into<broker::Endpoint>,
    names: &Names,
    other_queues: &[String],
) -> anyhow::Result<()> {
    let connection = broker::connect(amqp_url, "ringpush local cleanup").await?;
    let deleted = async {
        let channel = connection.create_channel().await?;
        let mut result = broker::delete(&channel, names)
            .await
            .map_err(anyhow::Error::from);
        for queue in other_queues {
            let options = QueueDeleteOptions::default();
            let deleted = channel.queue_delete(queue.as_str().into(), options).await;
            if let (Ok(()), Err(e)) = (&result, deleted) {
                result = Err(e.into());
            }
        }
        result
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    deleted
}

/// An ES256 key of the world's own, as Apple issues a team (a .p8), with its key and team
/// ids: the client signs JWTs with it, the mock checks them with its public half.
#[derive(Clone)]
pub struct Key {
    /// The private key, PEM PKCS#8 (a .p8 file's contents).
    pub pem: String,
    /// The public half, PEM SPKI.
    pub public_pem: String,
    pub key_id: String,
    pub team_id: String,
}

impl Key {
    /// A new P-256 key.
    pub fn generate(key_id: &str, team_id: &str) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        Ok(Self {
            pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
        })
    }

    /// A signer of JWTs with this key, re-signing at the default refresh interval.
    pub fn signer(&self) -> Result<Signer, JwtError> {
        Signer::from_pem(
            self.pem.as_bytes(),
            &self.key_id,
            &self.team_id,
            jwt::DEFAULT_REFRESH,
        )
    }

    /// The key as the mock accepts it. The mock reads the public half from PEM, as
    /// `mock-apns` does.
    pub fn check(&self) -> Result<mock::KeyCheck, JwtError> {
        mock::KeyCheck::from_pem(self.public_pem.as_bytes(), &self.key_id, &self.team_id)
    }

    /// The mock's JWT checks for this key alone.
    pub(crate) fn auth_check(&self) -> Result<mock::AuthCheck, JwtError> {
        Ok(mock::AuthCheck::key(self.check()?))
    }

    /// Writes the key as a .p8 file only its owner may read (for a worker process).
    pub(crate) fn write_p8(&self, path: &Path) -> std::io::Result<()> {
        mock::certs::write_private(path, &self.pem)
    }
}

/// An HTTP/2 client (token auth) that sends both environments to the mock — or, with
/// `via`, to a proxy in front of it on loopback — and trusts the mock's CA; the rest of
/// `settings` is the caller's.
pub fn http2_client(
    mock: &Mock,
    via: Option<SocketAddr>,
    settings: http2::Settings,
    signer: Arc<Signer>,
) -> Result<http2::Client, tls::TlsError> {
    let port = via.unwrap_or(mock.addr()).port();
    // The mock's certificate names localhost.
    let endpoint =
        Endpoint::parse(&format!("https://localhost:{port}")).expect("a loopback URL parses");
    let settings = http2::Settings {
        production: endpoint.clone(),
        sandbox: endpoint,
        ..settings
    };
    let tls = tls::client_config(Some(mock.ca_file()), None)?;
    Ok(http2::Client::new(settings, tls, Some(signer)))
}

/// Starts a mock FCM in the world (its certificates under `dir`), with a new service
/// account it accepts, and an FCM client for it (`settings` with the mock's URL; the account
/// file written to `dir/fcm-service-account.json` for processes).
pub async fn fcm_world(
    dir: &std::path::Path,
    settings: crate::fcm::Settings,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(crate::mock_fcm::MockFcm, crate::fcm::Client)> {
    let mock = crate::mock_fcm::MockFcm::start(
        crate::mock_fcm::Settings::local(dir.join("mock-fcm-certs")),
        cancel,
    )
    .await?;
    let json = mock.new_account("ringpush-local")?;
    std::fs::create_dir_all(dir)?;
    crate::mock::certs::write_private(&dir.join("fcm-service-account.json"), &json)?;
    let account = crate::fcm::ServiceAccount::parse(json.as_bytes())?;
    let tls = tls::client_config(Some(mock.ca_file()), None)?;
    let settings = crate::fcm::Settings {
        url: Endpoint::parse(&mock.url()).map_err(anyhow::Error::msg)?,
        ..settings
    };
    let client = crate::fcm::Client::new(settings, account, tls).map_err(anyhow::Error::msg)?;
    Ok((mock, client))
}
