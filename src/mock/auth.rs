//! A connection's JWT, as APNs holds it: locked to the team and key of its first token, and
//! allowed to change at most once per window. (Each request's own checks are [`validate`].)
//!
//! [`validate`]: super::validate

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::apns::Reason;

#[derive(Default)]
pub(super) struct JwtState {
    team_id: Option<String>,
    key_id: Option<String>,
    token: Option<(String, Instant)>,
}

/// APNs binds a connection to the team and key of its first JWT and lets the JWT change
/// at most once per window.
pub(super) fn check_connection_jwt(
    connection: &Mutex<JwtState>,
    jwt: Option<(String, crate::apns::jwt::Claims)>,
    window: Duration,
) -> Result<(), (u16, Reason)> {
    let Some((token, claims)) = jwt else {
        return Ok(());
    };
    let mut state = connection.lock().unwrap();
    if state.key_id.as_ref().is_some_and(|k| *k != claims.key_id) {
        return Err((403, Reason::UnrelatedKeyIdInToken));
    }
    if state.team_id.as_ref().is_some_and(|t| *t != claims.team_id) {
        return Err((403, Reason::InvalidProviderToken));
    }
    state.key_id = Some(claims.key_id);
    state.team_id = Some(claims.team_id);
    match &state.token {
        Some((current, _)) if *current == token => {}
        Some((_, since)) if since.elapsed() < window => {
            return Err((429, Reason::TooManyProviderTokenUpdates));
        }
        _ => state.token = Some((token, Instant::now())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::jwt::Claims;

    fn jwt(token: &str, key: &str, team: &str) -> Option<(String, Claims)> {
        let claims = Claims {
            key_id: key.into(),
            team_id: team.into(),
            issued_at: 0,
        };
        Some((token.into(), claims))
    }

    #[test]
    fn a_connection_is_locked_to_its_first_key_and_team_and_its_token_changes_slowly() {
        // A window no test run outlasts; waiting it out is a zero window (no sleeping, so a
        // slow machine cannot let the window pass early).
        let window = Duration::from_secs(3600);
        let conn = Mutex::default();
        assert_eq!(
            check_connection_jwt(&conn, jwt("t1", "K1", "T1"), window),
            Ok(())
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t1", "K1", "T1"), window),
            Ok(())
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t2", "K2", "T1"), window),
            Err((403, Reason::UnrelatedKeyIdInToken))
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t2", "K1", "T2"), window),
            Err((403, Reason::InvalidProviderToken))
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t2", "K1", "T1"), window),
            Err((429, Reason::TooManyProviderTokenUpdates))
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t2", "K1", "T1"), Duration::ZERO),
            Ok(())
        );
        assert_eq!(
            check_connection_jwt(&conn, None, window),
            Ok(()),
            "certificate connections carry no JWT"
        );
    }
}
