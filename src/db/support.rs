//! Support queries: whom a ring from a gateway reaches now (`ringpush who`), and seeding a
//! gateway with phones (`ringpush seed`, the demo and the benchmark).

use deadpool_postgres::Pool;

use crate::token::{DeviceToken, Kind, Platform};

use super::DbError;

/// One phone a ring from a gateway would reach, as support sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub user_id: i64,
    /// `owner` or `sharee`.
    pub role: &'static str,
    /// The token, with its platform.
    pub token: DeviceToken,
    pub kind: Kind,
    pub environment: String,
    pub topic: Option<String>,
    /// The app the token belongs to (whose credentials push it).
    pub app: String,
    /// When the phone last registered the token (RFC 3339).
    pub registered: String,
}

/// Whom a ring from `gateway_id` reaches now: `None` if there is no such gateway.
pub async fn who(pool: &Pool, gateway_id: &str) -> Result<Option<(String, Vec<Reach>)>, DbError> {
    let client = pool.get().await?;
    let Some(gateway) = client
        .query_opt(
            "SELECT coalesce(name, id), owner_id FROM gateways WHERE id = $1",
            &[&gateway_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let (name, owner): (String, i64) = (gateway.get(0), gateway.get(1));
    let rows = client
        .query(
            "SELECT t.user_id, t.token, t.environment, t.topic,
                    to_char(t.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    t.platform, t.kind, t.app
             FROM push_tokens t
             WHERE t.user_id = $2
                OR t.user_id IN (SELECT s.user_id FROM gateway_shares s WHERE s.gateway_id = $1)
             ORDER BY t.user_id <> $2, t.user_id, t.token",
            &[&gateway_id, &owner],
        )
        .await?;
    let reach = rows
        .iter()
        .filter_map(|row| {
            let user_id: i64 = row.get(0);
            let platform: Platform = row.get::<_, String>(5).parse().ok()?;
            Some(Reach {
                user_id,
                role: if user_id == owner { "owner" } else { "sharee" },
                token: DeviceToken::parse_for(platform, row.get(1)).ok()?,
                kind: row.get::<_, String>(6).parse().ok()?,
                environment: row.get(2),
                topic: row.get(3),
                app: row.get(7),
                registered: row.get(4),
            })
        })
        .collect();
    Ok(Some((name, reach)))
}

/// How many phones of each platform and kind a seeded gateway's owner has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phones {
    /// iPhones that ring as an alert.
    pub apns_alert: u32,
    /// iPhones that ring as a call (PushKit).
    pub apns_call: u32,
    /// Android phones that ring as an alert.
    pub fcm_alert: u32,
    /// Android phones that ring as a call (a high-priority data message).
    pub fcm_call: u32,
}

impl Phones {
    /// Each phone's platform and kind, in that order.
    pub fn each(&self) -> impl Iterator<Item = (Platform, Kind)> {
        let counts = [
            (Platform::APNS, Kind::Alert, self.apns_alert),
            (Platform::APNS, Kind::Call, self.apns_call),
            (Platform::FCM, Kind::Alert, self.fcm_alert),
            (Platform::FCM, Kind::Call, self.fcm_call),
        ];
        counts
            .into_iter()
            .flat_map(|(p, k, n)| std::iter::repeat_n((p, k), n as usize))
    }

    pub fn total(&self) -> u32 {
        self.apns_alert + self.apns_call + self.fcm_alert + self.fcm_call
    }
}

/// A random token of `platform`, as a phone would register it (tests, seeds, the demo).
pub fn random_token(platform: Platform) -> String {
    match platform {
        Platform::APNS => crate::token::random_hex(32),
        // FCM's shape: an instance id, a colon, and a long opaque part.
        Platform::FCM => format!(
            "{}:APA91b{}",
            crate::token::random_hex(11),
            crate::token::random_hex(64)
        ),
        // Another provider's: opaque printable text.
        _ => format!("{platform}/{}", crate::token::random_hex(16)),
    }
}

/// Creates `gateway_id` with a new owner and `phones` random tokens, unless the gateway
/// exists. Returns whether it created anything.
pub async fn seed(
    pool: &Pool,
    gateway_id: &str,
    phones: Phones,
    topic: &str,
) -> Result<bool, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if tx
        .query_opt("SELECT 1 FROM gateways WHERE id = $1", &[&gateway_id])
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let owner: i64 = tx
        .query_one("INSERT INTO users DEFAULT VALUES RETURNING id", &[])
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO gateways (id, owner_id, name) VALUES ($1, $2, $1)",
        &[&gateway_id, &owner],
    )
    .await?;
    for (platform, kind) in phones.each() {
        let token = random_token(platform);
        let topic = (platform == Platform::APNS).then_some(topic);
        tx.execute(
            "INSERT INTO push_tokens (token, user_id, environment, topic, platform, kind) VALUES ($1, $2, 'production', $3, $4, $5)",
            &[&token, &owner, &topic, &platform.as_str(), &kind.as_str()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}
