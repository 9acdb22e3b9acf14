//! How values read where a person reads them — log lines, errors, tables: a duration in
//! human units (`181ms`, `2.5s`, `12m 30s`), never Rust's debug form (`180.881817ms`,
//! `Some(1s)`), and the known name nearest a misspelt one (for a likely typo). Depends on
//! nothing of ringpush, so every module may use it.

use std::fmt;
use std::time::Duration;

/// A duration for a person: whole milliseconds below a second (`0ms`, `181ms`), seconds with
/// at most one decimal below ten minutes (`1s`, `2.5s`, `60s`, as the settings are written),
/// then minutes and seconds (`12m 30s`, `15m`) and hours and minutes (`1h`, `2h 5m`). Rounded,
/// never longer than a few characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let ms = d.as_millis();
        if ms < 1000 {
            return write!(f, "{ms}ms");
        }
        // Tenths of a second, rounded.
        let tenths = (ms + 50) / 100;
        if tenths < 6000 {
            return match tenths % 10 {
                0 => write!(f, "{}s", tenths / 10),
                t => write!(f, "{}.{t}s", tenths / 10),
            };
        }
        let s = (ms + 500) / 1000;
        let (h, m, s) = (s / 3600, s % 3600 / 60, s % 60);
        match (h, m, s) {
            (0, m, 0) => write!(f, "{m}m"),
            (0, m, s) => write!(f, "{m}m {s}s"),
            (h, 0, _) => write!(f, "{h}h"),
            (h, m, _) => write!(f, "{h}h {m}m"),
        }
    }
}

/// [`Human`] as a `String`.
pub fn duration(d: Duration) -> String {
    Human(d).to_string()
}

/// The name of `known` nearest to `name` (fewest single-character edits), when it is near
/// enough to be a likely misspelling: at most a third of the name's length, and at most 4.
pub fn nearest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).clamp(1, 4);
    known
        .into_iter()
        .map(|k| (edits(name, k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance: insertions, deletions and substitutions, one character each.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_human_units() {
        let cases = [
            (Duration::ZERO, "0ms"),
            (Duration::from_micros(180_881), "180ms"),
            (Duration::from_nanos(180_881_817), "180ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_millis(1000), "1s"),
            (Duration::from_millis(1049), "1s"),
            (Duration::from_millis(2460), "2.5s"),
            (Duration::from_secs(59), "59s"),
            (Duration::from_millis(59_960), "60s"),
            (Duration::from_secs(200), "200s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(750), "12m 30s"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(7500), "2h 5m"),
        ];
        for (d, text) in cases {
            assert_eq!(duration(d), text, "{d:?}");
        }
    }

    #[test]
    fn the_nearest_name_is_a_likely_typo_or_none() {
        let known = [
            "RINGPUSH_PREFETCH",
            "RINGPUSH_RING_TTL",
            "RINGPUSH_AMQP_URL",
        ];
        assert_eq!(
            nearest("RINGPUSH_PREFECH", known),
            Some("RINGPUSH_PREFETCH")
        );
        assert_eq!(
            nearest("RINGPUSH_AMPQ_URL", known),
            Some("RINGPUSH_AMQP_URL")
        );
        assert_eq!(nearest("RINGPUSH_SOMETHING_ELSE", known), None);
        assert_eq!(edits("kitten", "sitting"), 3);
        assert_eq!(edits("", "abc"), 3);
    }
}
