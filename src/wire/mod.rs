//! What crosses the broker: every message body and header ringpush reads or writes, and the
//! rules each format's version follows (docs/design.md is the contract; this is its code).
//!
//! - [`ring`]: **ring event v1**, gateway → rings exchange. `v` is the JSON number 1; any
//!   other `v` (the retry envelope's string included) is refused as an unknown version and
//!   the message dead-lettered. Unknown fields are ignored, so a gateway may add fields
//!   without a new version; changing or removing one needs docs/design.md's versioned successor.
//! - [`retry`]: **the retry envelope** `ringpush-retry/1`, worker → retry tiers → worker
//!   (and the dead queue). `v` is a string of the family `ringpush-retry/`; a body without
//!   the family is a gateway's ring event, a family member this worker does not know is
//!   refused by name. The ring event inside travels untouched. The previous release's retry
//!   headers ([`retry::ATTEMPT_HEADER`], [`retry::PENDING_HEADER`]) are still read, never
//!   written.
//! - [`feedback`]: **feedback event v1** (worker → feedback queue) and **purge request v1**
//!   (feedback consumer → purge queue): one JSON shape under two names. `v` is the number 1,
//!   anything else is dead-lettered; unknown fields (e.g. a later `platform`) are ignored.
//! - [`time`]: the times in all of them: RFC 3339, read with any offset, written in UTC with
//!   milliseconds; only the years 1 to 9999 in UTC are accepted.
//!
//! Headers ringpush sets on messages it publishes: [`ERROR_HEADER`] on every dead letter,
//! [`HANDBACK_HEADER`] on a ring handed back at shutdown.
//!
//! Text that came in a message — ids, routing keys, a parse error quoting the input — is cut
//! by [`logged`] before it reaches a log line.

pub mod feedback;
pub mod retry;
pub mod ring;
pub mod time;

/// Header carrying why a message was dead-lettered (cut to 1 KiB by the publisher).
pub const ERROR_HEADER: &str = "x-ringpush-error";
/// Header counting how often a ring was handed back at shutdown (published again).
pub const HANDBACK_HEADER: &str = "x-ringpush-handbacks";

/// Longest text from input that a log line carries, in bytes.
pub const LOGGED_BYTES: usize = 256;

/// `s` as a log line may carry it: cut to [`LOGGED_BYTES`] on a character boundary. Every
/// log field whose text came from a message (a gateway or event id, a switch id, a routing
/// key, a parse error that quotes the input, a reason) goes through here, so a sender cannot
/// fill the logs.
pub fn logged(s: &str) -> &str {
    if s.len() <= LOGGED_BYTES {
        return s;
    }
    let mut end = LOGGED_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_text_is_cut_to_256_bytes_on_a_character_boundary() {
        assert_eq!(logged("gw-042"), "gw-042");
        assert_eq!(logged(&"x".repeat(300)).len(), LOGGED_BYTES);
        // 255 ASCII bytes, then a two-byte character across the cut: it goes whole.
        let s = format!("{}é{}", "a".repeat(255), "b".repeat(10));
        assert_eq!(logged(&s), "a".repeat(255));
        let emoji = "🔔".repeat(100);
        assert_eq!(logged(&emoji).len(), 256);
        assert!(logged(&emoji).chars().all(|c| c == '🔔'));
    }
}
