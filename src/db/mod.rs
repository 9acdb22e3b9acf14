//! PostgreSQL: the connection pool, `ringpush migrate`, and the one query a worker runs per
//! batch of rings.
//!
//! One concern a file: `pool` (the pool, migrations, pings and the demo's and tests'
//! schemas), `lookup` (the batched token lookup and its grouping, [`Lookups`]), `ledger` (which
//! tokens took which ring: [`Ledger`]), `claims` (a ring in one worker's hands at a time: [`Claims`]), `rings` (a ring's life: its
//! state from press to end, [`rings::Rings`]),
//! `support` (what support asks: `who`, `seed`), `tls` (the URL's `sslmode` and
//! `sslrootcert`, and the rustls connector: [`Target`]), `cause` (why the database could not
//! be used, told for a person: [`Trouble`], [`DbError::explain`]). This file holds [`DbError`]
//! and how a driver error reads in one line.

mod cause;
mod claims;
mod ledger;
mod lookup;
mod pool;
pub mod rings;
mod support;
mod tls;

pub use cause::Trouble;
pub use claims::{
    key as claim_key, waited as claims_waited, ClaimGuard, Claims, Held, LEASE as CLAIM_LEASE,
    RENEW_EVERY as CLAIM_RENEW_EVERY,
};
pub use ledger::{hash as ledger_hash, Ledger, RingKey, Seen, TokenHash, LEDGER_TIMEOUT};
pub use lookup::{
    lookup, probe_lookup, Found, Gateway, LookupError, Lookups, Recipient, QUERY_TIMEOUT,
};
pub use pool::{
    create_schema, drop_schema, migrate, migrate_to, ping, pool, target, url_with_schema,
};
pub use support::{random_token, seed, who, Phones, Reach};
pub use tls::{SslMode, Target};

/// The database cannot be reached or used. Its text says what an operator can act on: the
/// SQLSTATE, the server's message and, where the server names them, the table, column or
/// constraint — never a bare `db error`.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("not a PostgreSQL URL: {}", describe(.0))]
    Url(tokio_postgres::Error),
    /// The URL's TLS settings (`sslmode`, `sslrootcert`) cannot be used.
    #[error("RINGPUSH_DATABASE_URL: {0}")]
    Tls(String),
    #[error("PostgreSQL: {}", describe(.0))]
    Postgres(tokio_postgres::Error),
    #[error("{}", describe_pool(.0))]
    Pool(deadpool_postgres::PoolError),
    #[error("migration: {0}")]
    Migrate(refinery::Error),
    #[error("no answer within {}", crate::human::Human(*.0))]
    Timeout(std::time::Duration),
    #[error("building the pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
}

// By hand, not `#[from]`: the text already holds the cause once, and a `source` chain would
// print it again (`{:#}`).
impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Pool(e)
    }
}

impl From<refinery::Error> for DbError {
    fn from(e: refinery::Error) -> Self {
        DbError::Migrate(e)
    }
}

impl DbError {
    /// The server's SQLSTATE, when the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        let e = match self {
            DbError::Postgres(e) | DbError::Pool(deadpool_postgres::PoolError::Backend(e)) => e,
            _ => return None,
        };
        e.code().map(tokio_postgres::error::SqlState::code)
    }

    /// The statement failed because of the data it was given (SQLSTATE class 22, data
    /// exception, or 23, integrity constraint violation): the same input fails every time,
    /// so it is the input's fault, not the database's.
    pub(crate) fn is_data_error(&self) -> bool {
        self.sqlstate()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
    }

    /// A relation, column or function the statement needs is missing, or the role may not
    /// use it (SQLSTATE class 42): the schema is not migrated, or a grant is missing.
    pub fn is_schema_error(&self) -> bool {
        self.sqlstate().is_some_and(|c| c.starts_with("42"))
    }

    /// The server broke a deadlock by failing this statement (SQLSTATE 40P01): trying it
    /// again works.
    pub(crate) fn is_deadlock(&self) -> bool {
        self.sqlstate() == Some("40P01")
    }
}

/// One line for a driver error: for a server error its SQLSTATE, message and what it names
/// (`42P01 relation "push_tokens" does not exist`); otherwise the driver's text with its
/// cause once (`error connecting to server: Connection refused (os error 111)`).
fn describe(e: &tokio_postgres::Error) -> String {
    use std::fmt::Write;
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}", db.code().code(), db.message());
        for (what, value) in [
            ("table", db.table()),
            ("column", db.column()),
            ("constraint", db.constraint()),
        ] {
            if let Some(value) = value {
                let _ = write!(s, " ({what} {value})");
            }
        }
        if let Some(detail) = db.detail() {
            let _ = write!(s, "; {detail}");
        }
        if let Some(hint) = db.hint() {
            let _ = write!(s, "; hint: {hint}");
        }
        return s;
    }
    let text = e.to_string();
    match std::error::Error::source(e).map(ToString::to_string) {
        Some(cause) if !text.contains(&cause) => format!("{text}: {cause}"),
        _ => text,
    }
}

/// A pool's error: the driver's (a connection that could not be opened) as `PostgreSQL: …`,
/// like any other; the pool's own (a timeout) as `PostgreSQL pool: …`.
fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => format!("PostgreSQL: {}", describe(e)),
        other => format!("PostgreSQL pool: {other}"),
    }
}
