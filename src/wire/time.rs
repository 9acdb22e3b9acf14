//! Times on the wire: RFC 3339, read with any offset, written in UTC with milliseconds, and
//! kept to the years 1 to 9999 in UTC — what RFC 3339 can write and PostgreSQL's
//! `timestamptz` can hold.

use ::time::format_description::well_known::Rfc3339;
use ::time::{OffsetDateTime, UtcOffset};

/// Why a string is not a time ringpush accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TimeError {
    /// Not RFC 3339 at all (the `time` crate's words).
    #[error("{0}")]
    Rfc3339(String),
    /// RFC 3339, but outside [`in_range`].
    #[error("outside the years 1 to 9999 in UTC")]
    OutOfRange,
}

/// `t` in UTC, if that falls in the years 1 to 9999: what RFC 3339 can write and PostgreSQL's
/// `timestamptz` can hold. RFC 3339 also reads the year 0000, and an offset can carry a time
/// past either end; such a time from outside (a message, a header, an APNs answer) is refused
/// or replaced where it comes in, so nothing downstream fails on it every time it comes back.
pub(crate) fn in_range(t: OffsetDateTime) -> Option<OffsetDateTime> {
    let utc = t.checked_to_offset(UtcOffset::UTC)?;
    (1..=9999).contains(&utc.year()).then_some(utc)
}

/// Parses an RFC 3339 time into UTC, refusing one outside [`in_range`].
pub(crate) fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, TimeError> {
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| TimeError::Rfc3339(e.to_string()))?;
    in_range(t).ok_or(TimeError::OutOfRange)
}

/// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-28T09:15:02.120Z`.
pub fn format_rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let t = t
        .replace_nanosecond(t.millisecond() as u32 * 1_000_000)
        .unwrap_or(t);
    t.format(&Rfc3339).expect("a UTC time formats as RFC 3339")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::time::macros::datetime;

    #[test]
    fn times_from_outside_are_kept_to_the_years_1_to_9999_in_utc() {
        assert_eq!(
            in_range(datetime!(2026-11-28 10:15:02 +01:00)),
            Some(datetime!(2026-11-28 09:15:02 UTC))
        );
        assert_eq!(in_range(datetime!(9999-12-31 23:59:59 -00:01)), None);
        assert_eq!(in_range(datetime!(0000-12-31 23:59:59 UTC)), None);
        assert_eq!(in_range(datetime!(-0001-01-01 00:00:00 UTC)), None);
        assert!(in_range(datetime!(0001-01-01 00:00:00 UTC)).is_some());
        assert!(parse_rfc3339("0000-01-01T00:00:00Z").is_err());
        assert!(parse_rfc3339("0001-01-01T00:30:00+01:00").is_err());
        assert!(parse_rfc3339("someday").is_err());
    }
}
