//! Device tokens: the lower-case hex string a phone registered, parsed once, and the APNs
//! [`Environment`] that issued it (both stored in `push_tokens`, both on the wire).
//!
//! APNs says not to assume a token size (protocol sheet X3), so any even number of hex
//! digits up to 200 (100 bytes) is accepted; the binary protocol narrows this to 32 bytes.

use std::fmt;
use std::str::FromStr;

/// The longest token accepted, in bytes (Apple's 2018 documentation allows up to 100).
pub const MAX_TOKEN_BYTES: usize = 100;

/// A device token as lower-case hex. Exists only through [`DeviceToken::parse`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceToken(String);

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
}

impl DeviceToken {
    /// Parses hex in either case and stores it lower-case.
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
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The full hex token (for the wire and the database only, never for logs).
    pub fn as_hex(&self) -> &str {
        &self.0
    }

    /// The first eight hex digits and an ellipsis: what logs and reports show.
    pub fn short(&self) -> String {
        let end = self.0.len().min(8);
        format!("{}…", &self.0[..end])
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
