//! A pool's developer views and settings in PostgreSQL (see `crate::admin`). Each read is
//! one statement, so it comes from one snapshot. A setting's compare-and-swap is one
//! statement too: an upsert or a delete whose condition PostgreSQL evaluates on the newest
//! committed row after any wait for its lock, so of nodes racing with the same expectation,
//! exactly one writes.

use super::CallError;
use super::read::to_u64;
use crate::admin::{Expect, IdentitySummary, PoolUsage};
use crate::now_ms;
use deadpool_postgres::GenericClient;
use deadpool_postgres::tokio_postgres::Row;

const SUMMARY: &str = "
    SELECT i.id, i.created_at,
           greatest(i.created_at, coalesce((SELECT max(l.linked_at) FROM logins l
                                            WHERE l.pool = i.pool AND l.identity = i.id), 0)),
           ARRAY(SELECT DISTINCT l.provider FROM logins l
                 WHERE l.pool = i.pool AND l.identity = i.id ORDER BY l.provider)
    FROM identities i";

fn summary(row: &Row) -> Result<IdentitySummary, CallError> {
    Ok(IdentitySummary {
        id: row.try_get(0)?,
        created_at: row.try_get(1)?,
        last_modified: row.try_get(2)?,
        providers: row.try_get(3)?,
    })
}

/// See `Store::identities`.
pub(super) async fn identities(
    client: &impl GenericClient,
    pool: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<IdentitySummary>, CallError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let stmt = client
        .prepare_cached(&format!(
            "{SUMMARY} WHERE i.pool = $1 AND i.merged_into IS NULL AND i.id > $2
             ORDER BY i.id LIMIT $3"
        ))
        .await?;
    let rows = client
        .query(&stmt, &[&pool, &after.unwrap_or(""), &limit])
        .await?;
    rows.iter().map(summary).collect()
}

/// See `Store::identity_summary`.
pub(super) async fn identity_summary(
    client: &impl GenericClient,
    pool: &str,
    id: &str,
) -> Result<Option<IdentitySummary>, CallError> {
    let stmt = client
        .prepare_cached(&format!(
            "{SUMMARY} WHERE i.pool = $1 AND i.id = $2 AND i.merged_into IS NULL"
        ))
        .await?;
    client
        .query_opt(&stmt, &[&pool, &id])
        .await?
        .as_ref()
        .map(summary)
        .transpose()
}

/// See `Store::pool_usage`: both counts in one statement.
pub(super) async fn pool_usage(
    client: &impl GenericClient,
    pool: &str,
) -> Result<PoolUsage, CallError> {
    let stmt = client
        .prepare_cached(
            "SELECT (SELECT count(*) FROM identities WHERE pool = $1 AND merged_into IS NULL),
                    count(*), coalesce(sum(byte_size), 0)::bigint, max(last_modified)
             FROM datasets WHERE pool = $1 AND NOT deleted",
        )
        .await?;
    let row = client.query_one(&stmt, &[&pool]).await?;
    Ok(PoolUsage {
        identities: to_u64(row.try_get(0)?)?,
        datasets: to_u64(row.try_get(1)?)?,
        bytes: to_u64(row.try_get(2)?)?,
        last_modified: row.try_get(3)?,
    })
}

/// See `Store::pool_setting`.
pub(super) async fn setting(
    client: &impl GenericClient,
    pool: &str,
    name: &str,
) -> Result<Option<String>, CallError> {
    let stmt = client
        .prepare_cached("SELECT value FROM pool_settings WHERE pool = $1 AND name = $2")
        .await?;
    Ok(client
        .query_opt(&stmt, &[&pool, &name])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?)
}

const PUT_ANY: &str = "
    INSERT INTO pool_settings (pool, name, value, updated_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (pool, name) DO UPDATE SET
        value = EXCLUDED.value, updated_at = EXCLUDED.updated_at";
const PUT_IF_UNSET: &str = "
    INSERT INTO pool_settings (pool, name, value, updated_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (pool, name) DO NOTHING";
const PUT_IF_VALUE: &str = "
    UPDATE pool_settings SET value = $3, updated_at = $4
    WHERE pool = $1 AND name = $2 AND value = $5";
const CLEAR_ANY: &str = "DELETE FROM pool_settings WHERE pool = $1 AND name = $2";
const CLEAR_IF_VALUE: &str = "
    DELETE FROM pool_settings WHERE pool = $1 AND name = $2 AND value = $3";

/// See `Store::put_pool_setting`: each case is one statement.
pub(super) async fn put_setting(
    client: &impl GenericClient,
    pool: &str,
    name: &str,
    value: Option<&str>,
    expect: Expect<'_>,
) -> Result<bool, CallError> {
    let now = now_ms();
    Ok(match (value, expect) {
        (Some(value), Expect::Any) => {
            let stmt = client.prepare_cached(PUT_ANY).await?;
            client.execute(&stmt, &[&pool, &name, &value, &now]).await?;
            true
        }
        (Some(value), Expect::Value(None)) => {
            let stmt = client.prepare_cached(PUT_IF_UNSET).await?;
            client.execute(&stmt, &[&pool, &name, &value, &now]).await? > 0
        }
        (Some(value), Expect::Value(Some(expected))) => {
            let stmt = client.prepare_cached(PUT_IF_VALUE).await?;
            client
                .execute(&stmt, &[&pool, &name, &value, &now, &expected])
                .await?
                > 0
        }
        (None, Expect::Any) => {
            let stmt = client.prepare_cached(CLEAR_ANY).await?;
            client.execute(&stmt, &[&pool, &name]).await?;
            true
        }
        // Clearing what must be unset leaves it unset: done if it is.
        (None, Expect::Value(None)) => setting(client, pool, name).await?.is_none(),
        (None, Expect::Value(Some(expected))) => {
            let stmt = client.prepare_cached(CLEAR_IF_VALUE).await?;
            client.execute(&stmt, &[&pool, &name, &expected]).await? > 0
        }
    })
}
