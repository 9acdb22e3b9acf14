//! How one flag's text becomes a value, with an error that names its variable, and where each
//! default comes from: the library's own defaults (`worker::Settings::new`,
//! `http2::Settings::new`, `mock::Settings::local`, …), written as `--help` shows them. A
//! default only the command line has is written beside its flag, once.

#[cfg(feature = "kit")]
use std::path::PathBuf;
use std::time::Duration;

use crate::apns::request::Endpoint;
use crate::apns::{self, binary, http2};
use crate::broker::Names;
#[cfg(feature = "kit")]
use crate::mock::{self, GoAwayDebug};
use crate::worker;

/// A value parser for durations (`60s`, `500ms`, `2m`) whose error names the variable.
pub(super) fn duration(
    var: &'static str,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        humantime::parse_duration(s)
            .map_err(|e| format!("{var}: {s:?} is not a duration like 60s or 500ms ({e})"))
    }
}

/// A value parser for `on`/`off` (or `true`/`false`) whose error names the variable.
pub(super) fn switch(
    var: &'static str,
) -> impl Fn(&str) -> Result<bool, String> + Clone + Send + Sync + 'static {
    move |s| match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{var}: {s:?} is neither on nor off")),
    }
}

/// A value parser for positive integers whose error names the variable.
pub(super) fn positive<T: std::str::FromStr + PartialOrd + Default>(
    var: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s| match s.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(format!("{var}: {s:?} is not a positive whole number")),
    }
}

/// A value parser for APNs base URLs whose error names the variable.
pub(super) fn endpoint(
    var: &'static str,
) -> impl Fn(&str) -> Result<Endpoint, String> + Clone + Send + Sync + 'static {
    move |s| Endpoint::parse(s).map_err(|e| format!("{var}: {e}"))
}

/// A value parser for `host:port` addresses whose error names the variable.
pub(super) fn address(
    var: &'static str,
) -> impl Fn(&str) -> Result<binary::Address, String> + Clone + Send + Sync + 'static {
    move |s| binary::Address::parse(s).map_err(|e| format!("{var}: {e}"))
}

/// A value parser for a listen address, `host:port`, whose error names the variable.
pub(super) fn listen(
    var: &'static str,
) -> impl Fn(&str) -> Result<std::net::SocketAddr, String> + Clone + Send + Sync + 'static {
    move |s| {
        s.parse().map_err(|_| {
            format!(
                "{var}: {s:?} is not an IP address and port like 127.0.0.1:9464 or 0.0.0.0:9464"
            )
        })
    }
}

/// A value parser for queue prefixes.
pub(super) fn prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "RINGPUSH_QUEUE_PREFIX: {s:?} must be 1-100 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Which APNs interface to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApnsProtocol {
    /// Today's HTTP/2 API.
    Http2,
    /// The legacy binary interface (certificate auth only).
    Binary,
}

impl ApnsProtocol {
    const ALL: [ApnsProtocol; 2] = [ApnsProtocol::Http2, ApnsProtocol::Binary];

    pub fn as_str(self) -> &'static str {
        match self {
            ApnsProtocol::Http2 => "http2",
            ApnsProtocol::Binary => "binary",
        }
    }
}

impl std::fmt::Display for ApnsProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value parser for `RINGPUSH_APNS_PROTOCOL`.
pub(super) fn protocol(s: &str) -> Result<ApnsProtocol, String> {
    ApnsProtocol::ALL
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| format!("RINGPUSH_APNS_PROTOCOL: {s:?} is not http2 or binary"))
}

/// The mock's GOAWAY debug data as the command line names it.
#[cfg(feature = "kit")]
const GOAWAY_DEBUG: [(&str, GoAwayDebug); 3] = [
    ("json", GoAwayDebug::Json),
    ("text", GoAwayDebug::Text),
    ("empty", GoAwayDebug::Empty),
];

/// A value parser for `RINGPUSH_MOCK_GOAWAY_DEBUG`.
#[cfg(feature = "kit")]
pub(super) fn goaway_debug(s: &str) -> Result<GoAwayDebug, String> {
    GOAWAY_DEBUG
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, debug)| *debug)
        .ok_or_else(|| format!("RINGPUSH_MOCK_GOAWAY_DEBUG: {s:?} is not json, text or empty"))
}

/// The name `goaway_debug` reads as `debug`.
#[cfg(feature = "kit")]
pub(super) fn goaway_debug_name(debug: GoAwayDebug) -> &'static str {
    GOAWAY_DEBUG
        .iter()
        .find(|(_, d)| *d == debug)
        .map_or("json", |(name, _)| name)
}

/// The value parser of `ringpush queues --interval`: seconds, as `--help` says (`1`, `0.5`),
/// or a duration with its unit (`2s`, `500ms`); more than zero.
pub fn interval(s: &str) -> Result<Duration, String> {
    let parsed = match s.trim().parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|e| e.to_string()),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("--interval: {s:?} must be more than zero")),
        Err(e) => Err(format!(
            "--interval: {s:?} is not seconds like 1 or 0.5, nor a duration like 2s or 500ms ({e})"
        )),
    }
}

/// A duration as `--help` and the documentation write it: `300ms`, `25s`, `60s`, `10m`, `1h` —
/// seconds below ten minutes, then whole minutes, hours or days. `duration` reads it back.
pub(super) fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 600 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// A duration default as clap wants it (`&'static str`), computed once from the library's
/// own default: `default_value = shown!(defaults::worker().ring_ttl)`.
macro_rules! shown {
    ($duration:expr) => {{
        static SHOWN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        SHOWN
            .get_or_init(|| $crate::cli::values::duration_text($duration))
            .as_str()
    }};
}
pub(super) use shown;

/// The library's defaults the flags show and start from.
pub(super) mod defaults {
    use super::*;

    /// The queue prefix when none is given.
    pub(crate) const QUEUE_PREFIX: &str = "ringpush";
    /// The local RabbitMQ of the README's setup.
    pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    /// The local PostgreSQL of the README's setup.
    pub(crate) const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    /// What `ringpush worker` runs with when no flag says otherwise.
    pub fn worker() -> worker::Settings {
        worker::Settings::new(Names::new(QUEUE_PREFIX))
    }

    /// The feedback consumer's and the purger's defaults.
    pub fn feedback() -> crate::feedback::Settings {
        crate::feedback::Settings::new(Names::new(QUEUE_PREFIX))
    }

    pub fn purge() -> crate::purge::Settings {
        crate::purge::Settings::new(Names::new(QUEUE_PREFIX))
    }

    /// The HTTP/2 client's defaults (Apple's endpoints).
    pub fn http2() -> http2::Settings {
        let production = Endpoint::parse(apns::PRODUCTION_URL).expect("Apple's URL parses");
        let sandbox = Endpoint::parse(apns::SANDBOX_URL).expect("Apple's URL parses");
        http2::Settings::new(production, sandbox)
    }

    /// The binary client's defaults (Apple's legacy gateway).
    pub fn binary() -> binary::Settings {
        binary::Settings::new(
            binary::Address::parse(binary::GATEWAY).expect("Apple's gateway parses"),
        )
    }

    /// The mock's defaults.
    #[cfg(feature = "kit")]
    pub fn mock() -> mock::Settings {
        mock::Settings::local(PathBuf::new(), mock::AuthCheck::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_as_the_readme_writes_them_and_read_back() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(300), "300ms"),
            (Duration::from_secs(25), "25s"),
            (Duration::from_secs(60), "60s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(3000), "50m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(30 * 86_400), "30d"),
        ];
        for (d, text) in cases {
            assert_eq!(duration_text(d), text);
            assert_eq!(duration("X")(text), Ok(d), "{text}");
        }
    }

    #[test]
    #[cfg(feature = "kit")]
    fn goaway_debug_names_read_back() {
        for (name, debug) in GOAWAY_DEBUG {
            assert_eq!(goaway_debug(name), Ok(debug));
            assert_eq!(goaway_debug_name(debug), name);
        }
        let err = goaway_debug("yaml").unwrap_err();
        assert_eq!(
            err,
            "RINGPUSH_MOCK_GOAWAY_DEBUG: \"yaml\" is not json, text or empty"
        );
    }

    #[test]
    fn the_interval_is_seconds_or_a_duration() {
        assert_eq!(interval("1"), Ok(Duration::from_secs(1)));
        assert_eq!(interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(interval("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["0", "0s", "-1", "soon", "", "NaN", "inf"] {
            let err = interval(bad).unwrap_err();
            assert!(err.starts_with("--interval: "), "{bad:?}: {err}");
        }
    }

    #[test]
    fn flags_both_protocols_share_default_alike_in_both() {
        let (http2, binary) = (defaults::http2(), defaults::binary());
        assert_eq!(http2.request_timeout, binary.request_timeout);
        assert_eq!(http2.connect_timeout, binary.connect_timeout);
    }
}
