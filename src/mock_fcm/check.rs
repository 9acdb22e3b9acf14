//! What `mock-fcm` checks, apart from serving: the token endpoint's form and its assertion
//! (RS256 signature with the service account's key, `iss`, `scope` (`firebase.messaging` or
//! `cloud-platform`, as Google takes either), `aud` (the `token_uri`, or Google's token
//! endpoint as Google's libraries write it), `iat`/`exp`), and a message's shape
//! (docs/design.md "FCM, alert" / "FCM, call"). Pure, table-tested.

use crate::fcm::credentials::{verify_assertion, ASSERTION_LIFETIME_SECS, SCOPE};

/// The broader scope Google's token endpoint also grants `messages:send` for (FCM HTTP v1
/// takes `firebase.messaging` or `cloud-platform`); `firebase-admin` for Python asks for
/// this one and not `firebase.messaging`.
pub(crate) const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The audience Google's own OAuth libraries write into every assertion, whatever the
/// service account's `token_uri` says (google-auth for Python: `service_account.py`,
/// `_GOOGLE_OAUTH2_TOKEN_ENDPOINT`), and which Google's token endpoint — the one the mock
/// stands in for — takes. ringpush writes the `token_uri` (checked in its own tests).
pub(crate) const GOOGLE_TOKEN_AUDIENCE: &str = "https://oauth2.googleapis.com/token";

/// The service account the mock accepts assertions from.
#[derive(Debug, Clone)]
pub struct Account {
    pub client_email: String,
    pub token_uri: String,
    pub project_id: String,
    /// DER `RSAPublicKey` the assertion must verify with.
    pub public_key: Vec<u8>,
}

/// Checks a token request's form body at `now` (Unix seconds); `Err` is the OAuth error
/// (`invalid_request`, `unsupported_grant_type`, `invalid_grant`) and its description.
pub(crate) fn token_request(
    form: &[u8],
    account: &Account,
    now: u64,
) -> Result<(), (&'static str, String)> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(form)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if get("grant_type") != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return Err((
            "unsupported_grant_type",
            "grant_type must be jwt-bearer".into(),
        ));
    }
    let assertion = get("assertion").ok_or(("invalid_request", "no assertion".to_owned()))?;
    let claims = verify_assertion(assertion, &account.public_key)
        .ok_or(("invalid_grant", "Invalid JWT Signature.".to_owned()))?;
    let text = |name: &str| claims[name].as_str().unwrap_or_default().to_owned();
    if text("iss") != account.client_email {
        return Err((
            "invalid_grant",
            format!("iss {:?} is not the account", text("iss")),
        ));
    }
    if !text("scope")
        .split(' ')
        .any(|s| s == SCOPE || s == CLOUD_PLATFORM_SCOPE)
    {
        return Err((
            "invalid_scope",
            format!(
                "scope {:?} lacks firebase.messaging and cloud-platform",
                text("scope")
            ),
        ));
    }
    if text("aud") != account.token_uri && text("aud") != GOOGLE_TOKEN_AUDIENCE {
        return Err((
            "invalid_grant",
            format!("aud {:?} is not the token URI", text("aud")),
        ));
    }
    let (iat, exp) = (claims["iat"].as_u64(), claims["exp"].as_u64());
    let (Some(iat), Some(exp)) = (iat, exp) else {
        return Err(("invalid_grant", "iat and exp are required".into()));
    };
    if exp <= now || iat > now + 60 || exp < iat || exp - iat > ASSERTION_LIFETIME_SECS {
        return Err(("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.".into()));
    }
    Ok(())
}

/// The `iss` of a token request's assertion, read without verifying it: which account's
/// key to verify it with.
pub(crate) fn assertion_issuer(form: &[u8]) -> Option<String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let (_, assertion) = url::form_urlencoded::parse(form).find(|(k, _)| k == "assertion")?;
    let claims = B64.decode(assertion.split('.').nth(1)?).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    claims["iss"].as_str().map(str::to_owned)
}

/// Checks a message's shape; `Err` is what an INVALID_ARGUMENT says, and whether it is about
/// `message.token`. On success, the token.
pub fn message(body: &[u8]) -> Result<String, (String, bool)> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| (format!("Invalid JSON payload: {e}"), false))?;
    let m = &v["message"];
    let token = m["token"].as_str().unwrap_or_default();
    if token.is_empty()
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.'))
    {
        return Err((
            "The registration token is not a valid FCM registration token".into(),
            true,
        ));
    }
    let bad = |what: &str| Err((what.to_owned(), false));
    let android = &m["android"];
    // The enum's JSON name, in any case, as Google parses it (firebase-admin writes "high").
    if !android["priority"]
        .as_str()
        .is_some_and(|p| p.eq_ignore_ascii_case("HIGH"))
    {
        return bad("android.priority must be HIGH for a ring");
    }
    let ttl = android["ttl"].as_str().unwrap_or_default();
    match ttl.strip_suffix('s').and_then(|n| n.parse::<u64>().ok()) {
        Some(n) if n >= 1 => {}
        _ => return bad("android.ttl must be whole seconds, at least 1s"),
    }
    if android["collapse_key"].as_str().is_none_or(str::is_empty) {
        return bad("android.collapse_key must be the gateway id");
    }
    let data = &m["data"];
    for field in ["event_id", "gateway_id", "gateway_name", "pressed_at"] {
        if !data[field].is_string() {
            return bad(&format!("data.{field} must be a string"));
        }
    }
    if data
        .as_object()
        .is_some_and(|d| d.values().any(|v| !v.is_string()))
    {
        return bad("data values must be strings");
    }
    match data["kind"].as_str() {
        Some("alert") => {
            let n = &android["notification"];
            if !m["notification"]["title"].is_string()
                || n["channel_id"].as_str().is_none_or(str::is_empty)
                || n["tag"] != data["event_id"]
            {
                return bad("an alert needs notification.title, android.notification.channel_id and tag = event_id");
            }
        }
        Some("call") => {
            if !m["notification"].is_null() || !android["notification"].is_null() {
                return bad("a call is a data-only message");
            }
        }
        // A ring's follow-up: to an alert token with a notification on a channel, replacing
        // the ring's banner (tag = event_id), silent; to a call token data only.
        Some("ended") => {
            for field in ["state", "ended_at"] {
                if !data[field].is_string() {
                    return bad(&format!("a follow-up needs data.{field}"));
                }
            }
            let n = &android["notification"];
            if !n.is_null()
                && (!m["notification"]["title"].is_string()
                    || n["channel_id"].as_str().is_none_or(str::is_empty)
                    || n["tag"] != data["event_id"]
                    || !n["sound"].is_null()
                    || n["default_sound"] == true)
            {
                return bad("a follow-up's notification needs a title, a channel, tag = event_id and no sound");
            }
        }
        _ => return bad("data.kind must be alert, call or ended"),
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fcm::credentials::{generate, ServiceAccount};

    #[test]
    fn the_token_endpoint_takes_only_a_valid_assertion_of_its_account() {
        let json = generate("p", "svc@p.iam", "https://localhost:1/token").unwrap();
        let account = ServiceAccount::parse(json.as_bytes()).unwrap();
        let mine = Account {
            client_email: "svc@p.iam".into(),
            token_uri: "https://localhost:1/token".into(),
            project_id: "p".into(),
            public_key: account.public_key(),
        };
        let form = |assertion: &str| {
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
                .append_pair("assertion", assertion)
                .finish()
        };
        let now = 1_800_000_000;
        assert_eq!(
            token_request(form(&account.assertion_at(now)).as_bytes(), &mine, now),
            Ok(())
        );
        let expired = token_request(
            form(&account.assertion_at(now - 4000)).as_bytes(),
            &mine,
            now,
        );
        assert_eq!(expired.unwrap_err().0, "invalid_grant");
        // Google grants messages:send for cloud-platform too (what firebase-admin for Python
        // asks for, among others); a scope list without either is refused.
        let broad = "https://www.googleapis.com/auth/datastore https://www.googleapis.com/auth/cloud-platform";
        assert_eq!(
            token_request(
                form(&account.assertion_with_scope_at(now, broad)).as_bytes(),
                &mine,
                now
            ),
            Ok(())
        );
        let narrow = "https://www.googleapis.com/auth/datastore";
        let refused = token_request(
            form(&account.assertion_with_scope_at(now, narrow)).as_bytes(),
            &mine,
            now,
        );
        assert_eq!(refused.unwrap_err().0, "invalid_scope");
        let other_aud = Account {
            token_uri: "https://elsewhere/token".into(),
            ..mine.clone()
        };
        assert!(
            token_request(form(&account.assertion_at(now)).as_bytes(), &other_aud, now).is_err()
        );
        // Google's token endpoint as the audience (what google-auth writes whatever the
        // token_uri says) is taken too: the mock stands in for that endpoint.
        let mut same_key: serde_json::Value = serde_json::from_str(&json).unwrap();
        same_key["token_uri"] = GOOGLE_TOKEN_AUDIENCE.into();
        let googles = ServiceAccount::parse(same_key.to_string().as_bytes()).unwrap();
        assert_eq!(
            token_request(form(&googles.assertion_at(now)).as_bytes(), &mine, now),
            Ok(())
        );
        let other_iss = Account {
            client_email: "x@y".into(),
            ..mine.clone()
        };
        assert!(
            token_request(form(&account.assertion_at(now)).as_bytes(), &other_iss, now).is_err()
        );
        let stranger = ServiceAccount::parse(
            generate("p", "svc@p.iam", "https://localhost:1/token")
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        let forged = token_request(form(&stranger.assertion_at(now)).as_bytes(), &mine, now);
        assert_eq!(forged.unwrap_err().0, "invalid_grant");
        assert_eq!(
            token_request(b"grant_type=password", &mine, now)
                .unwrap_err()
                .0,
            "unsupported_grant_type"
        );
    }

    #[test]
    fn messages_are_checked_for_the_shape_design_gives_them() {
        let good = serde_json::json!({"message": {
            "token": "t:1", "notification": {"title": "Door", "body": "b"},
            "data": {"kind": "alert", "event_id": "e", "gateway_id": "g", "gateway_name": "Door", "pressed_at": "p"},
            "android": {"priority": "HIGH", "ttl": "5s", "collapse_key": "g",
                        "notification": {"channel_id": "doorbell", "tag": "e", "sound": "default"}}}});
        assert_eq!(message(good.to_string().as_bytes()), Ok("t:1".into()));
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            message(v.to_string().as_bytes())
        };
        assert!(
            edit(&|v| v["message"]["token"] = "a b".into())
                .unwrap_err()
                .1
        );
        // The enum's JSON name in lower case, as firebase-admin writes it.
        assert_eq!(
            edit(&|v| v["message"]["android"]["priority"] = "high".into()),
            Ok("t:1".into())
        );
        for broken in [
            edit(&|v| v["message"]["android"]["priority"] = "NORMAL".into()),
            edit(&|v| v["message"]["android"]["priority"] = "normal".into()),
            edit(&|v| v["message"]["android"]["ttl"] = "0s".into()),
            edit(&|v| v["message"]["android"]["ttl"] = "1.5s".into()),
            edit(&|v| v["message"]["android"]["notification"]["tag"] = "other".into()),
            edit(&|v| v["message"]["data"]["kind"] = "call".into()),
            edit(&|v| v["message"]["data"]["kind"] = "banner".into()),
            edit(&|v| v["message"]["data"]["event_id"] = 5.into()),
        ] {
            assert!(!broken.unwrap_err().1);
        }
        let call = edit(&|v| {
            let m = v["message"].as_object_mut().unwrap();
            m.remove("notification");
            m["android"].as_object_mut().unwrap().remove("notification");
            m["data"]["kind"] = "call".into();
        });
        assert_eq!(call, Ok("t:1".into()));
    }
}
