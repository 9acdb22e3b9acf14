//! Device tokens: the string a phone registered, parsed once for its [`Platform`], the APNs
//! [`Environment`] that issued it, and the [`Kind`] of ring the phone wants (all stored in
//! `push_tokens`; token and environment on the wire too).
//!
//! An APNs token is lower-case hex: APNs says not to assume a token size (protocol sheet
//! X3), so any even number of hex digits up to 200 (100 bytes) is accepted; the binary
//! protocol narrows this to 32 bytes. An FCM registration token is 1 to 512 characters of
//! `A–Z a–z 0–9 _ - : .` (schema v2's CHECK says the same).

use std::fmt;
use std::str::FromStr;

/// The longest token accepted, in bytes (Apple's 2018 documentation allows up to 100).
pub(crate) const MAX_TOKEN_BYTES: usize = 100;

/// The longest FCM registration token accepted, in characters (the schema's bound).
pub(crate) const MAX_FCM_TOKEN_CHARS: usize = 512;

/// The longest token of another provider's platform, in bytes (the schema's bound).
pub(crate) const MAX_OTHER_TOKEN_BYTES: usize = 4096;

/// A device token: APNs lower-case hex, or an FCM registration token. Exists only through
/// [`DeviceToken::parse`] (APNs), [`DeviceToken::parse_fcm`] or [`DeviceToken::parse_for`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceToken {
    text: String,
    platform: Platform,
}

/// Why a string is not a device token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("device token is empty")]
    Empty,
    #[error("device token has an odd number of hex digits ({0})")]
    OddLength(usize),
    #[error("device token is longer than {MAX_TOKEN_BYTES} bytes ({0} hex digits)")]
    TooLong(usize),
    #[error("device token has a character that is not a hex digit at position {0}")]
    NotHex(usize),
    #[error("FCM token is longer than {MAX_FCM_TOKEN_CHARS} characters ({0})")]
    FcmTooLong(usize),
    #[error("FCM token has a character other than A-Z a-z 0-9 _ - : . at position {0}")]
    FcmCharacter(usize),
    #[error("device token is longer than {MAX_OTHER_TOKEN_BYTES} bytes ({0})")]
    OtherTooLong(usize),
    #[error(
        "device token has a character that is not printable ASCII (or a space) at position {0}"
    )]
    OtherCharacter(usize),
}

impl DeviceToken {
    /// Parses an APNs token: hex in either case, stored lower-case.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if let Some(pos) = s.bytes().position(|b| !b.is_ascii_hexdigit()) {
            return Err(TokenError::NotHex(pos));
        }
        if !s.len().is_multiple_of(2) {
            return Err(TokenError::OddLength(s.len()));
        }
        if s.len() > MAX_TOKEN_BYTES * 2 {
            return Err(TokenError::TooLong(s.len()));
        }
        Ok(Self {
            text: s.to_ascii_lowercase(),
            platform: Platform::APNS,
        })
    }

    /// Parses an FCM registration token, kept as it is (FCM's tokens are case-sensitive).
    pub fn parse_fcm(s: &str) -> Result<Self, TokenError> {
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if let Some(pos) = s
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.')))
        {
            return Err(TokenError::FcmCharacter(pos));
        }
        if s.len() > MAX_FCM_TOKEN_CHARS {
            return Err(TokenError::FcmTooLong(s.len()));
        }
        Ok(Self {
            text: s.to_owned(),
            platform: Platform::FCM,
        })
    }

    /// Parses a token of `platform`: APNs and FCM by their own rules; another provider's as
    /// 1 to [`MAX_OTHER_TOKEN_BYTES`] printable ASCII characters without spaces (schema v3's
    /// CHECK says the same), kept as it is.
    pub fn parse_for(platform: Platform, s: &str) -> Result<Self, TokenError> {
        match platform {
            Platform::APNS => Self::parse(s),
            Platform::FCM => Self::parse_fcm(s),
            other => {
                if s.is_empty() {
                    return Err(TokenError::Empty);
                }
                if let Some(pos) = s.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
                    return Err(TokenError::OtherCharacter(pos));
                }
                if s.len() > MAX_OTHER_TOKEN_BYTES {
                    return Err(TokenError::OtherTooLong(s.len()));
                }
                Ok(Self {
                    text: s.to_owned(),
                    platform: other,
                })
            }
        }
    }

    /// The full token (for the wire and the database only, never for logs).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The full token: [`DeviceToken::as_str`] under the name it had when every token was
    /// APNs hex (kept for the call sites that still use it).
    pub fn as_hex(&self) -> &str {
        &self.text
    }

    /// Which service the token belongs to.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// The first eight characters and an ellipsis: what logs and reports show.
    pub fn short(&self) -> String {
        let end = self.text.len().min(8);
        format!("{}…", &self.text[..end])
    }
}

/// Debug shows the shortened form so a token never reaches a log by accident.
impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceToken({})", self.short())
    }
}

impl fmt::Display for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// Which push service a token belongs to (the `platform` column): `apns`, `fcm`, or the name
/// of another provider registered with the worker (1 to 32 of `a-z 0-9 _`, starting with a
/// letter). Copy, compared by name; names are interned once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform(&'static str);

/// The platform names seen so far (a handful: the column's distinct values).
static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

impl Platform {
    /// Apple Push Notification service (iPhones).
    pub const APNS: Platform = Platform("apns");
    /// Firebase Cloud Messaging HTTP v1 (Android phones).
    pub const FCM: Platform = Platform("fcm");
    /// The longest platform name.
    pub(crate) const MAX_NAME: usize = 32;

    /// The platform called `name`.
    pub fn named(name: &str) -> Result<Platform, String> {
        match name {
            "apns" => return Ok(Platform::APNS),
            "fcm" => return Ok(Platform::FCM),
            _ => {}
        }
        let valid = !name.is_empty()
            && name.len() <= Self::MAX_NAME
            && name.as_bytes()[0].is_ascii_lowercase()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            let shown: String = name.chars().take(40).collect();
            return Err(format!(
                "unknown platform {shown:?}: a platform is apns, fcm or another provider's name (1 to {} of a-z 0-9 _, starting with a letter)",
                Self::MAX_NAME
            ));
        }
        let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&known) = names.iter().find(|n| **n == name) {
            return Ok(Platform(known));
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        names.push(leaked);
        Ok(Platform(leaked))
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// The push service's name, for people: `APNs`, `FCM`, else the platform's own name.
    pub(crate) fn provider_name(self) -> &'static str {
        match self {
            Platform::APNS => "APNs",
            Platform::FCM => "FCM",
            other => other.0,
        }
    }
}

impl Default for Platform {
    /// Every v1 row is an APNs token.
    fn default() -> Self {
        Platform::APNS
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::named(s)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which app a token belongs to (the `app` column; contract v3): the app `default`, which
/// the single-app variables configure, or the name of a folder under `RINGPUSH_APPS_DIR`
/// (1 to 64 of `a-z 0-9 _ -`). Copy, compared by name; names are interned once (a
/// deployment has a handful of apps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppId(&'static str);

/// The app names seen so far.
static APPS: std::sync::RwLock<Vec<&'static str>> = std::sync::RwLock::new(Vec::new());

impl AppId {
    /// The app the single-app variables configure, and every token registered without one.
    pub const DEFAULT: AppId = AppId("default");
    /// The longest app id.
    pub const MAX_NAME: usize = 64;

    /// The app called `name`.
    pub fn named(name: &str) -> Result<AppId, String> {
        if name == "default" {
            return Ok(AppId::DEFAULT);
        }
        let valid = !name.is_empty()
            && name.len() <= Self::MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            let shown: String = name.chars().take(70).collect();
            return Err(format!(
                "{shown:?} is not an app id (1 to {} of a-z 0-9 _ -)",
                Self::MAX_NAME
            ));
        }
        if let Some(&known) = APPS
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|n| **n == name)
        {
            return Ok(AppId(known));
        }
        let mut names = APPS.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&known) = names.iter().find(|n| **n == name) {
            return Ok(AppId(known));
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        names.push(leaked);
        Ok(AppId(leaked))
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl Default for AppId {
    /// Every v2 row is the app `default`'s.
    fn default() -> Self {
        AppId::DEFAULT
    }
}

impl FromStr for AppId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AppId::named(s)
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a phone wants a ring (the `kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Kind {
    /// A banner with a sound.
    #[default]
    Alert,
    /// A full-screen incoming-call screen the app draws: PushKit (VoIP) on iOS, a
    /// high-priority data message on Android.
    Call,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Alert, Kind::Call];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Alert => "alert",
            Kind::Call => "call",
        }
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "alert" => Ok(Kind::Alert),
            "call" => Ok(Kind::Call),
            other => Err(format!("unknown kind {other:?} (alert|call)")),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which APNs environment a token was issued by (the `environment` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Production,
    Sandbox,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Sandbox => "sandbox",
        }
    }
}

impl FromStr for Environment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "production" => Ok(Environment::Production),
            "sandbox" => Ok(Environment::Sandbox),
            other => Err(format!(
                "unknown APNs environment {other:?} (production|sandbox)"
            )),
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `n` random bytes as lower-case hex (ids, and tokens for seeds and tests).
pub fn random_hex(n: usize) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system RNG works");
    hex(&bytes)
}

/// Bytes as lower-case hex, without an allocation per byte (the mock's binary gateway
/// encodes every token it receives).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_as_the_table_says() {
        let long = "ab".repeat(MAX_TOKEN_BYTES + 1);
        let cases: &[(&str, Result<&str, TokenError>)] = &[
            ("ABCDEF0123", Ok("abcdef0123")),
            (&"0f".repeat(32), Ok(&"0f".repeat(32))),
            ("", Err(TokenError::Empty)),
            ("abc", Err(TokenError::OddLength(3))),
            ("abzz", Err(TokenError::NotHex(2))),
            (" ab", Err(TokenError::NotHex(0))),
            (&long, Err(TokenError::TooLong(long.len()))),
        ];
        for (input, want) in cases {
            let got = DeviceToken::parse(input);
            match want {
                Ok(hex) => assert_eq!(got.unwrap().as_hex(), *hex, "input {input:?}"),
                Err(e) => assert_eq!(got.unwrap_err(), *e, "input {input:?}"),
            }
        }
    }

    #[test]
    fn fcm_tokens_parse_as_the_table_says() {
        let long = "a".repeat(MAX_FCM_TOKEN_CHARS + 1);
        let max = "A".repeat(MAX_FCM_TOKEN_CHARS);
        let cases: &[(&str, Result<&str, TokenError>)] = &[
            ("dGVzdA:APA91b-x_y.Z", Ok("dGVzdA:APA91b-x_y.Z")),
            (&max, Ok(&max)),
            ("", Err(TokenError::Empty)),
            ("abc def", Err(TokenError::FcmCharacter(3))),
            ("a/b", Err(TokenError::FcmCharacter(1))),
            ("tok\"en", Err(TokenError::FcmCharacter(3))),
            (&long, Err(TokenError::FcmTooLong(long.len()))),
        ];
        for (input, want) in cases {
            let got = DeviceToken::parse_fcm(input);
            match want {
                Ok(text) => {
                    let t = got.unwrap();
                    assert_eq!((t.as_str(), t.platform()), (*text, Platform::FCM));
                }
                Err(e) => assert_eq!(got.unwrap_err(), *e, "input {input:?}"),
            }
        }
        // The same text on two platforms is two tokens; APNs's is lower-cased.
        let apns = DeviceToken::parse_for(Platform::APNS, "ABCD").unwrap();
        let fcm = DeviceToken::parse_for(Platform::FCM, "ABCD").unwrap();
        assert_eq!((apns.as_str(), fcm.as_str()), ("abcd", "ABCD"));
        assert_ne!(DeviceToken::parse_fcm("abcd").unwrap(), apns);
    }

    #[test]
    fn platforms_and_kinds_read_back_what_they_write() {
        for p in [Platform::APNS, Platform::FCM] {
            assert_eq!(p.as_str().parse::<Platform>(), Ok(p));
        }
        // Another provider's platform: any name of a-z 0-9 _, interned once.
        let pigeon = "pigeon_2".parse::<Platform>().unwrap();
        assert_eq!(pigeon, Platform::named("pigeon_2").unwrap());
        assert_eq!(
            (pigeon.as_str(), pigeon.provider_name()),
            ("pigeon_2", "pigeon_2")
        );
        for bad in ["", "GCM", "2go", "a b", &"a".repeat(33)] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?}");
        }
        let token = DeviceToken::parse_for(pigeon, "Coo/Coo+1=").unwrap();
        assert_eq!((token.as_str(), token.platform()), ("Coo/Coo+1=", pigeon));
        assert_eq!(
            DeviceToken::parse_for(pigeon, "a b"),
            Err(TokenError::OtherCharacter(1))
        );
        for k in Kind::ALL {
            assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
        }
        assert!("GCM".parse::<Platform>().is_err() && "banner".parse::<Kind>().is_err());
    }

    #[test]
    fn hex_is_lower_case_and_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(hex(&[]), "");
        assert_eq!(random_hex(16).len(), 32);
    }

    #[test]
    fn display_and_debug_never_show_the_whole_token() {
        let t = DeviceToken::parse(&"ab".repeat(32)).unwrap();
        assert_eq!(t.to_string(), "abababab…");
        assert!(!format!("{t:?}").contains(&"ab".repeat(5)));
    }
}
