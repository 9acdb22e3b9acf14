//! Why PostgreSQL could not be used, told for a person: the cause as far as the process can
//! know it — by SQLSTATE class: a database that does not exist (3D000), a role or password
//! refused (28000, 28P01), a missing schema (42P01: run `ringpush migrate`), a missing
//! privilege (42501); or no server there at all — where it tried (`host:port/database`, never
//! the password), and what to do about it.

use super::{target, DbError};

/// What went wrong, as far as the process can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// No server answered: refused, unreachable, a name that does not resolve.
    Unreachable,
    /// The server has no database of that name (3D000).
    WrongDatabase,
    /// The server refused the role or its password (class 28).
    Login,
    /// A table (or another object) the statement needs does not exist (42P01, 42703, 42883,
    /// 3F000): the schema is not migrated, or the URL picks another schema.
    SchemaMissing,
    /// The role may not do what the statement does (42501).
    Privilege,
    /// The server's certificate was refused (a CA not trusted, a wrong host name, …).
    Tls,
    /// No answer in time.
    Timeout,
    /// Anything else: the server's own words are kept.
    Other,
}

impl Trouble {
    /// A few words for the cause: a log field, `/readyz`.
    pub fn label(self) -> &'static str {
        match self {
            Trouble::Unreachable => "database unreachable",
            Trouble::WrongDatabase => "no such database",
            Trouble::Login => "role or password refused",
            Trouble::SchemaMissing => "schema missing",
            Trouble::Privilege => "privilege missing",
            Trouble::Tls => "TLS refused",
            Trouble::Timeout => "database not answering",
            Trouble::Other => "database error",
        }
    }
}

impl DbError {
    /// What went wrong, by the server's SQLSTATE or the driver's error.
    pub fn trouble(&self) -> Trouble {
        if let Some(code) = self.sqlstate() {
            return match code {
                "3D000" => Trouble::WrongDatabase,
                c if c.starts_with("28") => Trouble::Login,
                "42P01" | "42703" | "42883" | "3F000" => Trouble::SchemaMissing,
                "42501" => Trouble::Privilege,
                _ => Trouble::Other,
            };
        }
        match self {
            DbError::Timeout(_) => Trouble::Timeout,
            DbError::Pool(deadpool_postgres::PoolError::Timeout(_)) => Trouble::Timeout,
            DbError::Postgres(e) | DbError::Pool(deadpool_postgres::PoolError::Backend(e))
                if io_error(e).is_some_and(crate::tls::is_handshake_failure) =>
            {
                Trouble::Tls
            }
            DbError::Postgres(e) | DbError::Pool(deadpool_postgres::PoolError::Backend(e))
                if io_error(e).is_some() =>
            {
                Trouble::Unreachable
            }
            _ => Trouble::Other,
        }
    }

    /// One line without the URL, for `/readyz` and log lines that name the database beside
    /// it: the cause's label, the server's words, and what to do (`schema missing (42P01
    /// relation "gateways" does not exist): run `ringpush migrate``).
    pub fn summary(&self) -> String {
        let said = self.said();
        let trouble = self.trouble();
        match trouble {
            Trouble::SchemaMissing => {
                format!("{} ({said}): run `ringpush migrate`", trouble.label())
            }
            _ => format!("{} ({said})", trouble.label()),
        }
    }

    /// What a person reads when PostgreSQL at `url` (the value of the variable `var`) cannot
    /// be used: the cause, where (`host:port/database`, no password) and what to check.
    pub fn explain(&self, url: &str, var: &str) -> String {
        if let DbError::Url(_) = self {
            return format!("{var}: {self}");
        }
        let at = target(url);
        let server = at.rsplit_once('/').map_or(at.as_str(), |(s, _)| s);
        let config = url.parse::<tokio_postgres::Config>().ok();
        let role = config
            .as_ref()
            .and_then(|c| c.get_user())
            .unwrap_or("(the OS user)")
            .to_owned();
        let database = config
            .as_ref()
            .and_then(|c| c.get_dbname())
            .map_or_else(|| role.clone(), str::to_owned);
        let said = self.said();
        match self.trouble() {
            Trouble::Unreachable => format!(
                "cannot reach PostgreSQL at {server} ({said}): is PostgreSQL running there, and is that its address in {var}? Locally: pg_ctlcluster --skip-systemctl-redirect <version> main start"
            ),
            Trouble::WrongDatabase => format!(
                "PostgreSQL at {server} has no database {database:?} ({said}): check the database name in {var}, or create it (createdb {database})"
            ),
            Trouble::Login if self.sqlstate() == Some("28P01") => format!(
                "PostgreSQL at {server} refused the password of role {role:?} ({said}): check the password in {var}"
            ),
            Trouble::Login => format!(
                "PostgreSQL at {server} refused role {role:?} ({said}): check the user name in {var}, and that the role exists and may log in"
            ),
            Trouble::SchemaMissing => format!(
                "the schema is missing in {at} ({said}): run `ringpush migrate` against this database ({var})"
            ),
            Trouble::Privilege => format!(
                "role {role:?} lacks a privilege in {at} ({said}): grant it, or use the role `ringpush migrate` ran as"
            ),
            Trouble::Tls => {
                let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
                let io = self.io().expect("a TLS failure is an IO error");
                let var = format!("sslrootcert in {var}");
                format!("PostgreSQL at {server}: {}", crate::tls::failure(io, host, Some(&var)))
            }
            Trouble::Timeout => format!("PostgreSQL at {at} did not answer ({said})"),
            Trouble::Other => format!("PostgreSQL at {at}: {said}"),
        }
    }

    /// The IO error under the driver's error, if any.
    fn io(&self) -> Option<&std::io::Error> {
        match self {
            DbError::Postgres(e) | DbError::Pool(deadpool_postgres::PoolError::Backend(e)) => {
                io_error(e)
            }
            _ => None,
        }
    }

    /// The error's own words without the `PostgreSQL pool:` wrapping: the server's SQLSTATE
    /// and message, or the connection's trouble in a few plain words.
    fn said(&self) -> String {
        let driver = match self {
            DbError::Postgres(e) | DbError::Pool(deadpool_postgres::PoolError::Backend(e)) => e,
            DbError::Pool(deadpool_postgres::PoolError::Timeout(_)) => {
                return "no connection from the pool in time".into()
            }
            other => return other.to_string(),
        };
        match io_error(driver) {
            Some(io) if driver.as_db_error().is_none() => io_reason(io),
            _ => super::describe(driver),
        }
    }
}

/// The IO error under a driver error (connecting, or a connection that broke).
fn io_error(e: &tokio_postgres::Error) -> Option<&std::io::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = s.source();
    }
    None
}

/// An IO error in a few plain words (`connection refused`), or its own text without the
/// errno.
fn io_reason(io: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match io.kind() {
        K::ConnectionRefused => "connection refused: nothing listens on that port".into(),
        K::TimedOut => "timed out".into(),
        K::ConnectionReset => "connection reset".into(),
        K::UnexpectedEof => "the server closed the connection".into(),
        _ => {
            let text = io.to_string();
            match text.find(" (os error") {
                Some(at) => text[..at].to_lowercase(),
                None => text,
            }
        }
    }
}
