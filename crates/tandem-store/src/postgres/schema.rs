//! The PostgreSQL schema and its migrations, applied in order at connect and tracked in the
//! `schema_version` table of the store's schema. All of it runs in one transaction that
//! first takes an advisory lock on the schema's name, so several nodes starting at once
//! migrate one after the other (the later ones find nothing to do), and a failed migration
//! leaves nothing behind. A schema newer than this build is refused rather than misread.

use super::CallError;
use crate::StoreError;
use deadpool_postgres::ClientWrapper;

/// Migration `i` takes the schema from version `i` to version `i + 1`.
///
/// The same logical schema as SQLite's. Datasets keep their row (with `deleted` and their
/// sync count) after a delete, so a re-created dataset continues above it. `record_count`
/// and `byte_size` are the live records' aggregates, kept up to date by every commit so limit
/// checks never scan. Records hang off the dataset row's id (which carries the pool); grants
/// are keyed by name since a grant may exist before its dataset does. Text that is compared
/// or ordered uses the "C" collation, so keys and names sort by bytes, as in SQLite.
///
/// Version 2 adds identities, their logins and a dataset's `merge_root`, as in SQLite.
///
/// Version 4 adds the commit log, as in SQLite. Its ids come from an identity column, so
/// they increase store-wide, but in the order transactions took them, which is not always
/// the order they committed in; per dataset, the row lock makes the two the same.
///
/// Version 5 adds the change stream's consumers and dead letters, as in SQLite.
///
/// Version 6 (PostgreSQL only) makes log ids follow commit order: they come from the
/// one-row counter `log_seq`, taken by the statement that inserts the entries, the last
/// statement, sent with COMMIT (see `write::APPEND_LOG`), instead of the identity column, which
/// handed them out at insert time in whatever order transactions got there. The counter
/// starts at the newest id, so none is reused. Nodes of an earlier version cannot write the
/// log after this (their inserts have no id): upgrade every node together.
///
/// Version 7 adds a pool's settings, as SQLite's version 6.
///
/// Version 8 replaces the log's two indexes by a chain, as SQLite's version 6: each entry
/// keeps `prev_id`, its dataset's previous entry, and `commit_log_heads` the newest id and
/// the number of entries ever appended per dataset. The index on three strings took a
/// random leaf page per busy dataset in every commit and the one on time a page more; the
/// two cost a fifth of the saturated write throughput (docs/BENCHMARKS.md). Only writers
/// touch a heads row, always in the statement that holds the `log_seq` counter, so no lock
/// order between them exists to deadlock on; compaction counts what it drops in
/// `commit_log_dropped` instead of taking writers' rows (entries left = `entries` −
/// `dropped`). Aged entries are found in id order, as on SQLite. `prev_head` only carries
/// the replaced head out of a writer's upsert. As with version 6, nodes of an earlier
/// version must not write after this (their entries would not be chained): upgrade every
/// node together.
///
/// Version 9 keeps a dataset's chain head in its own row (`log_head`, with `log_entries`
/// the number of entries ever appended), which every commit rewrites anyway, instead of a
/// `commit_log_heads` row upserted next to it: that upsert was a third of the log's cost in
/// the write path (docs/BENCHMARKS.md). `commit_log_heads` keeps only the heads of names
/// that have no row (a grant or revoke before anyone wrote), and the row's insert takes the
/// head over, under the name's creation lock (`write::CREATE_LOCK`). `log_prev` only
/// carries the replaced head out of a writer's update. Grants and revokes now lock the
/// dataset's row. Nodes of an earlier version must not write after this: upgrade every
/// node together.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE datasets (
    id            bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pool          text    COLLATE "C" NOT NULL,
    owner         text    COLLATE "C" NOT NULL,
    name          text    COLLATE "C" NOT NULL,
    sync_count    bigint  NOT NULL CHECK (sync_count >= 0),
    deleted       boolean NOT NULL DEFAULT false,
    record_count  bigint  NOT NULL DEFAULT 0,
    byte_size     bigint  NOT NULL DEFAULT 0,
    created_at    bigint  NOT NULL,
    last_modified bigint  NOT NULL,
    UNIQUE (pool, owner, name)
);

CREATE TABLE records (
    dataset_id           bigint NOT NULL REFERENCES datasets (id),
    key                  text   COLLATE "C" NOT NULL,
    value                text,
    sync_count           bigint NOT NULL,
    last_modified        bigint NOT NULL,
    last_modified_by     text   NOT NULL,
    device_id            text,
    device_last_modified bigint,
    PRIMARY KEY (dataset_id, key)
);

CREATE INDEX records_by_sync_count ON records (dataset_id, sync_count);

CREATE TABLE grants (
    pool       text   COLLATE "C" NOT NULL,
    owner      text   COLLATE "C" NOT NULL,
    name       text   COLLATE "C" NOT NULL,
    grantee    text   COLLATE "C" NOT NULL,
    access     text   NOT NULL CHECK (access IN ('read', 'write')),
    granted_at bigint NOT NULL,
    PRIMARY KEY (pool, owner, name, grantee)
);

CREATE INDEX grants_by_grantee ON grants (pool, grantee);
"#,
    r#"
ALTER TABLE datasets ADD COLUMN merge_root text COLLATE "C";

CREATE INDEX datasets_by_merge_root ON datasets (pool, owner, merge_root)
    WHERE merge_root IS NOT NULL;

CREATE TABLE identities (
    pool        text    COLLATE "C" NOT NULL,
    id          text    COLLATE "C" NOT NULL,
    guest       boolean NOT NULL,
    merged_into text    COLLATE "C",
    created_at  bigint  NOT NULL,
    PRIMARY KEY (pool, id)
);

CREATE TABLE logins (
    pool      text   COLLATE "C" NOT NULL,
    provider  text   COLLATE "C" NOT NULL,
    subject   text   COLLATE "C" NOT NULL,
    identity  text   COLLATE "C" NOT NULL,
    linked_at bigint NOT NULL,
    PRIMARY KEY (pool, provider, subject)
);

CREATE INDEX logins_by_identity ON logins (pool, identity);
"#,
    r#"
ALTER TABLE datasets ADD COLUMN last_deleted_sync_count bigint NOT NULL DEFAULT 0;

UPDATE datasets SET last_deleted_sync_count = sync_count WHERE deleted;
"#,
    r#"
CREATE TABLE commit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pool        text   COLLATE "C" NOT NULL,
    owner       text   COLLATE "C" NOT NULL,
    name        text   COLLATE "C" NOT NULL,
    kind        text   NOT NULL,
    sync_count  bigint NOT NULL,
    actor       text   NOT NULL,
    device_id   text,
    server_time bigint NOT NULL,
    patches     text   NOT NULL
);

CREATE INDEX commit_log_by_dataset ON commit_log (pool, owner, name, id);
CREATE INDEX commit_log_by_time ON commit_log (server_time);
"#,
    r#"
CREATE TABLE stream_consumers (
    name         text   COLLATE "C" PRIMARY KEY,
    position     bigint NOT NULL,
    lease_holder text   COLLATE "C",
    lease_until  bigint NOT NULL DEFAULT 0
);

CREATE TABLE stream_dead_letters (
    consumer text   COLLATE "C" NOT NULL,
    entry_id bigint NOT NULL,
    event    text   NOT NULL,
    error    text   NOT NULL,
    attempts bigint NOT NULL,
    time     bigint NOT NULL,
    PRIMARY KEY (consumer, entry_id)
);
"#,
    r#"
CREATE TABLE log_seq (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last     bigint  NOT NULL
);

INSERT INTO log_seq (last) SELECT coalesce(max(id), 0) FROM commit_log;

ALTER TABLE commit_log ALTER COLUMN id DROP IDENTITY;
"#,
    r#"
CREATE TABLE pool_settings (
    pool       text   COLLATE "C" NOT NULL,
    name       text   COLLATE "C" NOT NULL,
    value      text   NOT NULL,
    updated_at bigint NOT NULL,
    PRIMARY KEY (pool, name)
);
"#,
    r#"
ALTER TABLE commit_log ADD COLUMN prev_id bigint;

CREATE TABLE commit_log_heads (
    pool      text   COLLATE "C" NOT NULL,
    owner     text   COLLATE "C" NOT NULL,
    name      text   COLLATE "C" NOT NULL,
    head      bigint NOT NULL,
    entries   bigint NOT NULL,
    prev_head bigint,
    PRIMARY KEY (pool, owner, name)
) WITH (fillfactor = 70);

CREATE TABLE commit_log_dropped (
    pool    text   COLLATE "C" NOT NULL,
    owner   text   COLLATE "C" NOT NULL,
    name    text   COLLATE "C" NOT NULL,
    dropped bigint NOT NULL,
    PRIMARY KEY (pool, owner, name)
);

DROP INDEX commit_log_by_time;

UPDATE commit_log c SET prev_id = p.prev
FROM (SELECT id, lag(id) OVER (PARTITION BY pool, owner, name ORDER BY id) AS prev
      FROM commit_log) p
WHERE c.id = p.id AND p.prev IS NOT NULL;

INSERT INTO commit_log_heads (pool, owner, name, head, entries)
    SELECT pool, owner, name, max(id), count(*) FROM commit_log GROUP BY pool, owner, name;

DROP INDEX commit_log_by_dataset;
"#,
    r#"
ALTER TABLE datasets
    ADD COLUMN log_head    bigint,
    ADD COLUMN log_prev    bigint,
    ADD COLUMN log_entries bigint NOT NULL DEFAULT 0;

UPDATE datasets d SET log_head = h.head, log_entries = h.entries
FROM commit_log_heads h
WHERE h.pool = d.pool AND h.owner = d.owner AND h.name = d.name;

DELETE FROM commit_log_heads h
USING datasets d
WHERE h.pool = d.pool AND h.owner = d.owner AND h.name = d.name;
"#,
];

/// The longest a node's start-up waits for the migrations (its own, or another node's that
/// it queues behind): rewriting a log of tens of millions of entries takes minutes.
pub(super) const MIGRATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The first key of the advisory lock that serialises migrations of one schema (the second
/// is a hash of the schema's name). Distinct from [`super::write::OWNER_LOCK`] and
/// [`super::write::GRANT_LOCK`].
const MIGRATION_LOCK: i32 = 0x5444_4d00;

/// Brings `schema` (a validated identifier) up to `SCHEMA_VERSION`, creating it if needed.
pub(super) async fn migrate(client: &mut ClientWrapper, schema: &str) -> Result<(), CallError> {
    let tx = client.transaction().await?;
    // A migration may rewrite a whole table (version 8 chains every log entry): no statement
    // timeout, only `MIGRATION_TIMEOUT` for all of it.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&MIGRATION_LOCK, &schema],
    )
    .await?;
    // CREATE SCHEMA IF NOT EXISTS is not safe against a concurrent one; the lock makes it so.
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         SET LOCAL search_path TO {schema};
         CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL);"
    ))
    .await?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await?
        .try_get(0)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "database schema {schema} is at version {current}, newer than this build supports \
             ({SCHEMA_VERSION})"
        ))
        .into());
    }
    if current < SCHEMA_VERSION {
        let pending = usize::try_from(current).unwrap_or(0);
        for (version, sql) in MIGRATIONS.iter().enumerate().skip(pending) {
            tx.batch_execute(sql).await?;
            tracing::info!(schema, version = version + 1, "postgres schema migrated");
        }
        tx.execute("DELETE FROM schema_version", &[]).await?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
