//! Export and import for PostgreSQL (see `crate::dump`). The export holds one pooled
//! connection in a REPEATABLE READ, READ ONLY transaction (one snapshot for the whole dump,
//! without the statement timeout: its statements stream for as long as the dump takes) and
//! streams rows as they arrive. An import batch is one transaction; its progress lives in the
//! table `import_progress`, which the first batch creates (it belongs to the import, not to
//! the schema's migrations), and an advisory lock keeps two importers from interleaving.

use super::CallError;
use super::read::{to_i64, to_u64};
use crate::dump::{
    ApplyState, BatchOutcome, DUMP_DATASETS, DUMP_GRANTS, DUMP_IDENTITIES, DUMP_LOGINS,
    DUMP_READ_AHEAD, DUMP_SETTINGS, DumpDataset, DumpGrant, DumpIdentity, DumpItem, DumpLogin,
    DumpRecord, DumpSetting, DumpStream, GrantAccess, ImportBatch, ImportProgress, ImportStatus,
    in_step, live_bytes, progress_from_json, progress_json,
};
use crate::{DatasetKey, StoreError};
use deadpool_postgres::{ClientWrapper, GenericClient, Object};
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use tokio::sync::mpsc;
use tokio_postgres::Row;

/// The first key of the advisory lock an import batch takes (the second is a hash of the
/// schema's name); distinct from the migration and write locks.
const IMPORT_LOCK: i32 = 0x5444_4d01;

const PROGRESS_TABLE: &str = "CREATE TABLE IF NOT EXISTS import_progress (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    state    text    NOT NULL
)";

type ItemsTx = mpsc::Sender<Result<DumpItem, StoreError>>;

/// Starts the export on `client`, which it keeps until the dump ends.
pub(super) fn spawn_dump(client: Object) -> DumpStream {
    let (items_tx, items_rx) = mpsc::channel(DUMP_READ_AHEAD);
    tokio::spawn(async move {
        match dump_all(&client, &items_tx).await {
            Ok(()) => {
                if client.batch_execute("COMMIT").await.is_err() {
                    drop(Object::take(client));
                }
            }
            Err(e) => {
                // Mid-transaction: never hand this connection back to the pool.
                drop(Object::take(client));
                let _ = items_tx.send(Err(into_store_error(e))).await;
            }
        }
    });
    items_rx
}

fn into_store_error(e: CallError) -> StoreError {
    match e {
        CallError::Store(e) => e,
        CallError::Db(e) => super::map_db_error(&e),
    }
}

/// Sends every item; stops early (Ok) when the receiver is gone.
async fn dump_all(client: &ClientWrapper, items_tx: &ItemsTx) -> Result<(), CallError> {
    client
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET LOCAL statement_timeout = 0",
        )
        .await?;
    for (sql, convert) in [
        (DUMP_IDENTITIES, identity_of as Convert),
        (DUMP_LOGINS, login_of),
    ] {
        if !stream(client, sql, items_tx, convert).await? {
            return Ok(());
        }
    }
    let mut current: Option<DatasetKey> = None;
    let datasets = stream(client, DUMP_DATASETS, items_tx, |row| {
        let dataset = dataset_of(row)?;
        let key = dataset.key();
        let mut items = Vec::with_capacity(2);
        if current.as_ref() != Some(&key) {
            current = Some(key.clone());
            items.push(DumpItem::Dataset(dataset));
        }
        if let Some(record) = record_of(row)? {
            items.push(DumpItem::Record {
                dataset: key,
                record,
            });
        }
        Ok(items)
    })
    .await?;
    if !datasets {
        return Ok(());
    }
    for (sql, convert) in [
        (DUMP_GRANTS, grant_of as Convert),
        (DUMP_SETTINGS, setting_of),
    ] {
        if !stream(client, sql, items_tx, convert).await? {
            return Ok(());
        }
    }
    Ok(())
}

/// Runs `sql` and sends what `convert` makes of each row as it arrives; `false` when the
/// receiver is gone.
async fn stream(
    client: &ClientWrapper,
    sql: &str,
    items_tx: &ItemsTx,
    mut convert: impl FnMut(&Row) -> Result<Vec<DumpItem>, CallError>,
) -> Result<bool, CallError> {
    let no_params: [&str; 0] = [];
    let rows = client.query_raw(sql, no_params).await?;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = rows.next().await {
        for item in convert(&row?)? {
            if items_tx.send(Ok(item)).await.is_err() {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Turns a row into the items it holds.
type Convert = fn(&Row) -> Result<Vec<DumpItem>, CallError>;

fn identity_of(row: &Row) -> Result<Vec<DumpItem>, CallError> {
    Ok(vec![DumpItem::Identity(DumpIdentity {
        pool: row.try_get(0)?,
        id: row.try_get(1)?,
        guest: row.try_get(2)?,
        merged_into: row.try_get(3)?,
        created_at: row.try_get(4)?,
    })])
}

fn login_of(row: &Row) -> Result<Vec<DumpItem>, CallError> {
    Ok(vec![DumpItem::Login(DumpLogin {
        pool: row.try_get(0)?,
        provider: row.try_get(1)?,
        subject: row.try_get(2)?,
        identity: row.try_get(3)?,
        linked_at: row.try_get(4)?,
    })])
}

fn grant_of(row: &Row) -> Result<Vec<DumpItem>, CallError> {
    let access: String = row.try_get(4)?;
    Ok(vec![DumpItem::Grant(DumpGrant {
        pool: row.try_get(0)?,
        owner: row.try_get(1)?,
        name: row.try_get(2)?,
        grantee: row.try_get(3)?,
        access: GrantAccess::parse(&access)?,
        granted_at: row.try_get(5)?,
    })])
}

fn setting_of(row: &Row) -> Result<Vec<DumpItem>, CallError> {
    Ok(vec![DumpItem::Setting(DumpSetting {
        pool: row.try_get(0)?,
        name: row.try_get(1)?,
        value: row.try_get(2)?,
        updated_at: row.try_get(3)?,
    })])
}

fn dataset_of(row: &Row) -> Result<DumpDataset, CallError> {
    Ok(DumpDataset {
        pool: row.try_get(0)?,
        owner: row.try_get(1)?,
        name: row.try_get(2)?,
        sync_count: to_u64(row.try_get(3)?)?,
        deleted: row.try_get(4)?,
        last_deleted_sync_count: to_u64(row.try_get(5)?)?,
        merge_root: row.try_get(6)?,
        created_at: row.try_get(7)?,
        last_modified: row.try_get(8)?,
    })
}

fn record_of(row: &Row) -> Result<Option<DumpRecord>, CallError> {
    let Some(key) = row.try_get::<_, Option<String>>(9)? else {
        return Ok(None);
    };
    Ok(Some(DumpRecord {
        key,
        value: row.try_get(10)?,
        sync_count: to_u64(row.try_get(11)?)?,
        last_modified: row.try_get(12)?,
        last_modified_by: row.try_get(13)?,
        device_id: row.try_get(14)?,
        device_last_modified: row.try_get(15)?,
    }))
}

/// Whether the store holds data, and the held import progress.
pub(super) async fn status(client: &impl GenericClient) -> Result<ImportStatus, CallError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM identities) OR EXISTS (SELECT 1 FROM logins)
                 OR EXISTS (SELECT 1 FROM datasets) OR EXISTS (SELECT 1 FROM grants)
                 OR EXISTS (SELECT 1 FROM pool_settings),
                    to_regclass('import_progress') IS NOT NULL",
            &[],
        )
        .await?;
    let data: bool = row.try_get(0)?;
    let table: bool = row.try_get(1)?;
    let progress = if table { held(client).await? } else { None };
    Ok(ImportStatus {
        empty: !data,
        progress,
    })
}

async fn held(client: &impl GenericClient) -> Result<Option<ImportProgress>, CallError> {
    let row = client
        .query_opt("SELECT state FROM import_progress", &[])
        .await?;
    match row {
        Some(row) => Ok(Some(progress_from_json(&row.try_get::<_, String>(0)?)?)),
        None => Ok(None),
    }
}

/// Applies a batch in one transaction, committed only when every item is in.
pub(super) async fn import_batch(
    client: &mut ClientWrapper,
    batch: &ImportBatch,
) -> Result<BatchOutcome, CallError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
        &[&IMPORT_LOCK],
    )
    .await?;
    // Created only when missing: IF NOT EXISTS alone would log a notice every batch.
    let table: bool = tx
        .query_one("SELECT to_regclass('import_progress') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !table {
        tx.batch_execute(PROGRESS_TABLE).await?;
    }
    let held = held(&tx).await?;
    if !in_step(held.as_ref(), batch) {
        return Ok(BatchOutcome::OutOfStep {
            held: held.map(|p| p.checkpoint),
        });
    }
    let mut state = ApplyState::new(held, batch);
    let mut ids: HashMap<DatasetKey, i64> = HashMap::new();
    let mut aggregates: HashMap<i64, (i64, i64)> = HashMap::new();
    let items = &batch.items;
    let mut index = 0;
    while index < items.len() {
        let item = &items[index];
        if let Err(reason) = item.validate() {
            return Ok(BatchOutcome::Rejected { index, reason });
        }
        let inserted = match item {
            DumpItem::Record { dataset, record } => {
                if state.skipping(dataset) {
                    state.skipped_record(item);
                    index += 1;
                    continue;
                }
                let id = match ids.get(dataset) {
                    Some(id) => Some(*id),
                    None => dataset_id(&tx, dataset).await?,
                };
                let Some(id) = id else {
                    return Ok(BatchOutcome::Rejected {
                        index,
                        reason: format!(
                            "record {:?} of {dataset}, which is not in the target",
                            record.key
                        ),
                    });
                };
                ids.insert(dataset.clone(), id);
                // The run of this dataset's records goes in one statement: a round trip
                // per record made imports ten times slower.
                let end = items[index..]
                    .iter()
                    .position(|i| !matches!(i, DumpItem::Record { dataset: d, .. } if d == dataset))
                    .map_or(items.len(), |n| index + n);
                let mut run = Vec::with_capacity(end - index);
                for (at, item) in items.iter().enumerate().take(end).skip(index) {
                    if let Err(reason) = item.validate() {
                        return Ok(BatchOutcome::Rejected { index: at, reason });
                    }
                    if let DumpItem::Record { record, .. } = item {
                        run.push(record);
                    }
                }
                let mut inserted = insert_records(&tx, id, &run).await?;
                for (at, record) in (index..end).zip(run) {
                    if inserted.remove(&record.key) {
                        if let Some(bytes) = live_bytes(record) {
                            let entry = aggregates.entry(id).or_default();
                            entry.0 += 1;
                            entry.1 += to_i64(bytes)?;
                        }
                        state.imported(&items[at]);
                    } else if let Err(reason) = state.exists(&items[at]) {
                        return Ok(BatchOutcome::Rejected { index: at, reason });
                    }
                }
                index = end;
                continue;
            }
            other => insert(&tx, other).await?,
        };
        if inserted {
            state.imported(item);
        } else if let Err(reason) = state.exists(item) {
            return Ok(BatchOutcome::Rejected { index, reason });
        }
        index += 1;
    }
    for (id, (count, bytes)) in aggregates {
        tx.execute(
            "UPDATE datasets SET record_count = record_count + $1, byte_size = byte_size + $2
             WHERE id = $3",
            &[&count, &bytes, &id],
        )
        .await?;
    }
    let progress = state.finish(batch);
    tx.execute(
        "INSERT INTO import_progress (only_row, state) VALUES (true, $1)
         ON CONFLICT (only_row) DO UPDATE SET state = excluded.state",
        &[&progress_json(&progress)],
    )
    .await?;
    tx.commit().await?;
    Ok(BatchOutcome::Committed(progress))
}

async fn dataset_id(
    client: &impl GenericClient,
    key: &DatasetKey,
) -> Result<Option<i64>, CallError> {
    let stmt = client
        .prepare_cached("SELECT id FROM datasets WHERE pool = $1 AND owner = $2 AND name = $3")
        .await?;
    let row = client
        .query_opt(&stmt, &[&key.pool, &key.owner, &key.name])
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Inserts the item unless its key exists; whether it did.
async fn insert(client: &impl GenericClient, item: &DumpItem) -> Result<bool, CallError> {
    let n = match item {
        DumpItem::Identity(i) => {
            let stmt = client
                .prepare_cached(
                    "INSERT INTO identities (pool, id, guest, merged_into, created_at)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .await?;
            client
                .execute(
                    &stmt,
                    &[&i.pool, &i.id, &i.guest, &i.merged_into, &i.created_at],
                )
                .await?
        }
        DumpItem::Login(l) => {
            let stmt = client
                .prepare_cached(
                    "INSERT INTO logins (pool, provider, subject, identity, linked_at)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .await?;
            client
                .execute(
                    &stmt,
                    &[&l.pool, &l.provider, &l.subject, &l.identity, &l.linked_at],
                )
                .await?
        }
        DumpItem::Dataset(d) => {
            // As a first write does, under the name's creation lock: a grant of a name
            // without a row either comes before (and its head is taken over) or after.
            let key = DatasetKey::new(&d.pool, &d.owner, &d.name);
            super::write::take_create_lock(client, &key).await?;
            let stmt = client
                .prepare_cached(
                    // Takes over the log head of a name that had none (a grant logged in
                    // the target before the import), as a dataset's first write does.
                    "WITH ins AS (
                         INSERT INTO datasets (pool, owner, name, sync_count, deleted,
                                               record_count, byte_size, created_at,
                                               last_modified, merge_root,
                                               last_deleted_sync_count, log_head, log_entries)
                         SELECT $1::text, $2::text, $3::text, $4::bigint, $5::boolean, 0, 0,
                                $6::bigint, $7::bigint, $8::text, $9::bigint, h.head,
                                coalesce(h.entries, 0)
                         FROM (SELECT 1) AS one
                              LEFT JOIN commit_log_heads h
                                ON h.pool = $1 AND h.owner = $2 AND h.name = $3
                         ON CONFLICT DO NOTHING
                         RETURNING 1
                     ), adopted AS (
                         DELETE FROM commit_log_heads
                         WHERE pool = $1 AND owner = $2 AND name = $3
                           AND EXISTS (SELECT 1 FROM ins)
                     )
                     SELECT 1 FROM ins",
                )
                .await?;
            client
                .execute(
                    &stmt,
                    &[
                        &d.pool,
                        &d.owner,
                        &d.name,
                        &to_i64(d.sync_count)?,
                        &d.deleted,
                        &d.created_at,
                        &d.last_modified,
                        &d.merge_root,
                        &to_i64(d.last_deleted_sync_count)?,
                    ],
                )
                .await?
        }
        DumpItem::Grant(g) => {
            let stmt = client
                .prepare_cached(
                    "INSERT INTO grants (pool, owner, name, grantee, access, granted_at)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                )
                .await?;
            client
                .execute(
                    &stmt,
                    &[
                        &g.pool,
                        &g.owner,
                        &g.name,
                        &g.grantee,
                        &g.access.as_str(),
                        &g.granted_at,
                    ],
                )
                .await?
        }
        // An existing setting is kept or refused like any existing item (the merge policy),
        // never overwritten: a copy does not change what the target holds.
        DumpItem::Setting(s) => {
            let stmt = client
                .prepare_cached(
                    "INSERT INTO pool_settings (pool, name, value, updated_at)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .await?;
            client
                .execute(&stmt, &[&s.pool, &s.name, &s.value, &s.updated_at])
                .await?
        }
        DumpItem::Record { .. } => return Ok(false),
    };
    Ok(n == 1)
}

/// Inserts the records whose keys do not exist yet; the keys it inserted (a key twice in
/// `records` is inserted once).
async fn insert_records(
    client: &impl GenericClient,
    dataset_id: i64,
    records: &[&DumpRecord],
) -> Result<HashSet<String>, CallError> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO records (dataset_id, key, value, sync_count, last_modified,
                                  last_modified_by, device_id, device_last_modified)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[],
                                      $6::text[], $7::text[], $8::bigint[])
             ON CONFLICT DO NOTHING
             RETURNING key",
        )
        .await?;
    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    let values: Vec<Option<&str>> = records.iter().map(|r| r.value.as_deref()).collect();
    let counts = records
        .iter()
        .map(|r| to_i64(r.sync_count))
        .collect::<Result<Vec<i64>, _>>()?;
    let times: Vec<i64> = records.iter().map(|r| r.last_modified).collect();
    let by: Vec<&str> = records
        .iter()
        .map(|r| r.last_modified_by.as_str())
        .collect();
    let devices: Vec<Option<&str>> = records.iter().map(|r| r.device_id.as_deref()).collect();
    let device_times: Vec<Option<i64>> = records.iter().map(|r| r.device_last_modified).collect();
    let rows = client
        .query(
            &stmt,
            &[
                &dataset_id,
                &keys,
                &values,
                &counts,
                &times,
                &by,
                &devices,
                &device_times,
            ],
        )
        .await?;
    rows.iter()
        .map(|row| Ok(row.try_get::<_, String>(0)?))
        .collect()
}
