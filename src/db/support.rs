//! Support queries: whom a ring from a gateway reaches now (`ringpush who`), and seeding a
//! gateway with phones (`ringpush seed`, the demo and the benchmark).

use deadpool_postgres::Pool;

use crate::token::DeviceToken;

use super::DbError;

/// One phone a ring from a gateway would reach, as support sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub user_id: i64,
    /// `owner` or `sharee`.
    pub role: &'static str,
    pub token: DeviceToken,
    pub environment: String,
    pub topic: Option<String>,
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
                    to_char(t.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
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
            Some(Reach {
                user_id,
                role: if user_id == owner { "owner" } else { "sharee" },
                token: DeviceToken::parse(row.get(1)).ok()?,
                environment: row.get(2),
                topic: row.get(3),
                registered: row.get(4),
            })
        })
        .collect();
    Ok(Some((name, reach)))
}

/// Creates `gateway_id` with a new owner and `phones` random tokens, unless the gateway
/// exists. Returns whether it created anything.
pub async fn seed(
    pool: &Pool,
    gateway_id: &str,
    phones: u32,
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
    for _ in 0..phones {
        let token = crate::token::random_hex(32);
        tx.execute(
            "INSERT INTO push_tokens (token, user_id, environment, topic) VALUES ($1, $2, 'production', $3)",
            &[&token, &owner, &topic],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}
