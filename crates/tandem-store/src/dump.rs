//! The copy of a store (`tandem export` / `tandem import`): the items a dump is made of,
//! their JSON Lines form, and the [`Importer`] that writes items into a store in batches
//! that can be resumed after an interruption.
//!
//! A dump holds what a client can observe and nothing it cannot: identities (guest or
//! not, merged or not), their logins, every dataset row (deleted ones too, so a re-created
//! dataset continues above its old sync count), every record (tombstones too, so
//! "changes since N" still reports deletions), grants, and the pools' settings (Cognito's
//! SyncTrigger, the last BulkPublish: an operator's configuration, which nothing derives).
//! It leaves out the commit log and the change stream's consumers (a copy is not a commit;
//! history starts afresh on the target) and the aggregates a store derives (record counts,
//! byte sizes, row ids).
//!
//! Order is fixed, so two dumps of equal stores are byte-identical after their header:
//! identities by (pool, id), logins by (pool, provider, subject), datasets by
//! (pool, owner, name) each followed by its records by key, grants by
//! (pool, owner, name, grantee), pool settings by (pool, name). Text sorts by bytes on every
//! backend. docs/OPERATIONS.md is the format's reference.
//!
//! Importing is the store's job only as far as one batch goes ([`crate::Store::import_batch`]:
//! all of it or none, with the import's progress in the same transaction). Batching,
//! resuming and reporting are [`Importer`]'s, so every source (a dump file, another
//! service's API) feeds the same sink.

use crate::admin::validate_setting;
use crate::{DatasetKey, Store, StoreError, validate_identity};
use serde::{Deserialize, Serialize};
use tandem_protocol::validate_key;

/// The format's name, in every header.
pub const FORMAT: &str = "tandem-dump";

/// The format version this build writes and the newest it reads. A change that a reader of
/// the previous version would misread (a new field, a new line type) bumps it; readers
/// refuse a newer version and unknown fields rather than drop what they do not know, and go
/// on reading every older one.
///
/// 1: identities, logins, datasets with their records, grants. 2: adds pool settings (the
/// `setting` line and the trailer's `settings`).
pub const VERSION: u32 = 2;

/// The first version whose dumps may hold pool settings.
const SETTINGS_SINCE: u32 = 2;

/// The longest record key a dump may hold (the protocol's hard ceiling; a store's own
/// `max_key_length` is not enforced on a copy).
const MAX_KEY: usize = 1024;

/// An identity row: a Cognito-style identity with its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpIdentity {
    pub pool: String,
    pub id: String,
    pub guest: bool,
    pub merged_into: Option<String>,
    pub created_at: i64,
}

/// A login linked to an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpLogin {
    pub pool: String,
    pub provider: String,
    pub subject: String,
    pub identity: String,
    pub linked_at: i64,
}

/// A dataset row, live or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpDataset {
    pub pool: String,
    pub owner: String,
    pub name: String,
    pub sync_count: u64,
    pub deleted: bool,
    pub last_deleted_sync_count: u64,
    pub merge_root: Option<String>,
    pub created_at: i64,
    pub last_modified: i64,
}

impl DumpDataset {
    pub fn key(&self) -> DatasetKey {
        DatasetKey::new(&self.pool, &self.owner, &self.name)
    }
}

/// A record of the dataset before it in the dump; `value: null` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpRecord {
    pub key: String,
    pub value: Option<String>,
    pub sync_count: u64,
    pub last_modified: i64,
    pub last_modified_by: String,
    pub device_id: Option<String>,
    pub device_last_modified: Option<i64>,
}

/// What a grant gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantAccess {
    Read,
    Write,
}

impl GrantAccess {
    pub const fn as_str(self) -> &'static str {
        match self {
            GrantAccess::Read => "read",
            GrantAccess::Write => "write",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "read" => Ok(GrantAccess::Read),
            "write" => Ok(GrantAccess::Write),
            other => Err(StoreError::Internal(format!(
                "unknown grant access {other}"
            ))),
        }
    }
}

/// A grant on a dataset by name (it may exist before the dataset does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpGrant {
    pub pool: String,
    pub owner: String,
    pub name: String,
    pub grantee: String,
    pub access: GrantAccess,
    pub granted_at: i64,
}

/// A pool's setting (see [`crate::Store::put_pool_setting`]), with the time it was last
/// written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpSetting {
    pub pool: String,
    pub name: String,
    pub value: String,
    pub updated_at: i64,
}

/// One thing a dump holds, in the order a dump lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DumpItem {
    Identity(DumpIdentity),
    Login(DumpLogin),
    Dataset(DumpDataset),
    /// A record of `dataset`, which an earlier item of the same dump created.
    Record {
        dataset: DatasetKey,
        record: DumpRecord,
    },
    Grant(DumpGrant),
    Setting(DumpSetting),
}

impl DumpItem {
    /// Checks what can be checked without the store: names, ids, counts, times.
    pub fn validate(&self) -> Result<(), String> {
        let check = |r: Result<(), StoreError>| r.map_err(|e| e.to_string());
        match self {
            DumpItem::Identity(i) => {
                check(validate_identity(&i.pool))?;
                check(validate_identity(&i.id))?;
                if let Some(into) = &i.merged_into {
                    check(validate_identity(into))?;
                }
                non_negative("createdAt", i.created_at)
            }
            DumpItem::Login(l) => {
                check(validate_identity(&l.pool))?;
                check(crate::validate_logins(&[crate::Login::new(
                    &l.provider,
                    &l.subject,
                )]))?;
                check(validate_identity(&l.identity))?;
                non_negative("linkedAt", l.linked_at)
            }
            DumpItem::Dataset(d) => {
                check(validate_identity(&d.pool))?;
                check(d.key().validate())?;
                if let Some(root) = &d.merge_root {
                    check(DatasetKey::new(&d.pool, &d.owner, root).validate())?;
                }
                if d.last_deleted_sync_count > d.sync_count {
                    return Err("lastDeletedSyncCount is above syncCount".into());
                }
                in_i64("syncCount", d.sync_count)?;
                non_negative("createdAt", d.created_at)?;
                non_negative("lastModified", d.last_modified)
            }
            DumpItem::Record { dataset, record } => {
                check(dataset.validate())?;
                validate_key(&record.key, MAX_KEY)
                    .map_err(|e| format!("record key {:?}: {e:?}", record.key))?;
                if record.sync_count == 0 {
                    return Err("a record's syncCount is at least 1".into());
                }
                in_i64("syncCount", record.sync_count)?;
                check(validate_identity(&record.last_modified_by))?;
                non_negative("lastModified", record.last_modified)
            }
            DumpItem::Grant(g) => {
                check(validate_identity(&g.pool))?;
                check(DatasetKey::new(&g.pool, &g.owner, &g.name).validate())?;
                check(validate_identity(&g.grantee))?;
                if g.grantee == g.owner {
                    return Err("an owner is not granted its own dataset".into());
                }
                non_negative("grantedAt", g.granted_at)
            }
            DumpItem::Setting(s) => {
                check(validate_setting(
                    &s.pool,
                    &s.name,
                    &[Some(s.value.as_str())],
                ))?;
                non_negative("updatedAt", s.updated_at)
            }
        }
    }

    /// The section the item belongs to: a dump lists sections in this order.
    fn section(&self) -> u8 {
        match self {
            DumpItem::Identity(_) => 0,
            DumpItem::Login(_) => 1,
            DumpItem::Dataset(_) | DumpItem::Record { .. } => 2,
            DumpItem::Grant(_) => 3,
            DumpItem::Setting(_) => 4,
        }
    }
}

fn non_negative(what: &str, n: i64) -> Result<(), String> {
    if n < 0 {
        return Err(format!("{what} must not be negative"));
    }
    Ok(())
}

fn in_i64(what: &str, n: u64) -> Result<(), String> {
    if i64::try_from(n).is_err() {
        return Err(format!("{what} is too large"));
    }
    Ok(())
}

/// A dump's first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpHeader {
    pub format: String,
    pub version: u32,
    /// The backend it was taken from: `sqlite` or `postgres`.
    pub source: String,
    /// When the export started, ms since the Unix epoch.
    pub exported_at: i64,
    /// The `tandem` version that wrote it.
    pub tandem: String,
}

/// A dump's last line: how many of each item it holds, so a cut-off file is noticed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpCounts {
    pub identities: u64,
    pub logins: u64,
    pub datasets: u64,
    pub records: u64,
    pub grants: u64,
    /// Absent from a version-1 trailer, which has no settings.
    #[serde(default)]
    pub settings: u64,
}

impl DumpCounts {
    pub fn add(&mut self, item: &DumpItem) {
        match item {
            DumpItem::Identity(_) => self.identities += 1,
            DumpItem::Login(_) => self.logins += 1,
            DumpItem::Dataset(_) => self.datasets += 1,
            DumpItem::Record { .. } => self.records += 1,
            DumpItem::Grant(_) => self.grants += 1,
            DumpItem::Setting(_) => self.settings += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.identities + self.logins + self.datasets + self.records + self.grants + self.settings
    }
}

/// One line of the JSON Lines form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Line {
    Header(DumpHeader),
    Identity(DumpIdentity),
    Login(DumpLogin),
    Dataset(DumpDataset),
    Record(DumpRecord),
    Grant(DumpGrant),
    Setting(DumpSetting),
    Trailer(DumpCounts),
}

/// The header line for a dump of `source` started at `exported_at`.
pub fn header_line(source: &str, exported_at: i64) -> String {
    to_line(&Line::Header(DumpHeader {
        format: FORMAT.into(),
        version: VERSION,
        source: source.into(),
        exported_at,
        tandem: env!("CARGO_PKG_VERSION").into(),
    }))
}

/// An item's line (a record's leaves its dataset out: it is the dataset line before it).
pub fn item_line(item: &DumpItem) -> String {
    to_line(&match item {
        DumpItem::Identity(i) => Line::Identity(i.clone()),
        DumpItem::Login(l) => Line::Login(l.clone()),
        DumpItem::Dataset(d) => Line::Dataset(d.clone()),
        DumpItem::Record { record, .. } => Line::Record(record.clone()),
        DumpItem::Grant(g) => Line::Grant(g.clone()),
        DumpItem::Setting(s) => Line::Setting(s.clone()),
    })
}

/// The trailer line.
pub fn trailer_line(counts: &DumpCounts) -> String {
    to_line(&Line::Trailer(*counts))
}

fn to_line(line: &Line) -> String {
    // Serialising these plain structs cannot fail.
    serde_json::to_string(line).unwrap_or_default()
}

/// What one line of a dump was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Header(DumpHeader),
    Item(DumpItem),
    Trailer(DumpCounts),
}

/// Reads a dump a line at a time, checking each line on its own (JSON shape, validity) and
/// in its place (header first, sections in order, records after their dataset, the trailer
/// last and matching the counts). Keeps O(1) state, so any size streams.
#[derive(Debug, Default)]
pub struct DumpReader {
    /// The header's version, once read.
    version: Option<u32>,
    trailer: bool,
    section: u8,
    dataset: Option<DumpDataset>,
    counts: DumpCounts,
}

impl DumpReader {
    pub fn new() -> Self {
        DumpReader::default()
    }

    /// Parses and checks the next line. An error says what is wrong with it (the caller adds
    /// the line number).
    pub fn line(&mut self, text: &str) -> Result<Parsed, String> {
        if self.trailer {
            return Err("a line after the trailer".into());
        }
        let line: Line = serde_json::from_str(text).map_err(|e| format!("not a dump line: {e}"))?;
        let item = match line {
            Line::Header(h) => {
                if self.version.is_some() {
                    return Err("a second header".into());
                }
                if h.format != FORMAT {
                    return Err(format!("format is {:?}, not {FORMAT:?}", h.format));
                }
                if h.version == 0 || h.version > VERSION {
                    return Err(format!(
                        "format version {} is not one this build reads (1 to {VERSION})",
                        h.version
                    ));
                }
                self.version = Some(h.version);
                return Ok(Parsed::Header(h));
            }
            _ if self.version.is_none() => {
                return Err("the first line must be the header".into());
            }
            Line::Trailer(counts) => {
                if counts != self.counts {
                    return Err(format!(
                        "the trailer counts {counts:?} but the dump holds {:?}",
                        self.counts
                    ));
                }
                self.trailer = true;
                return Ok(Parsed::Trailer(counts));
            }
            Line::Identity(i) => DumpItem::Identity(i),
            Line::Login(l) => DumpItem::Login(l),
            Line::Dataset(d) => DumpItem::Dataset(d),
            Line::Grant(g) => DumpItem::Grant(g),
            Line::Setting(s) => {
                // A version-1 writer had no settings: such a line is not from one.
                if self.version.is_some_and(|v| v < SETTINGS_SINCE) {
                    return Err(format!(
                        "a setting line in a version-1 dump (settings came in version \
                         {SETTINGS_SINCE})"
                    ));
                }
                DumpItem::Setting(s)
            }
            Line::Record(record) => {
                let Some(dataset) = &self.dataset else {
                    return Err("a record must follow its dataset".into());
                };
                if record.sync_count > dataset.sync_count {
                    return Err(format!(
                        "record syncCount {} is above its dataset's {}",
                        record.sync_count, dataset.sync_count
                    ));
                }
                DumpItem::Record {
                    dataset: dataset.key(),
                    record,
                }
            }
        };
        let section = item.section();
        if section < self.section {
            return Err(
                "out of order: identities, logins, datasets with their records, grants, then settings"
                    .into(),
            );
        }
        self.section = section;
        item.validate()?;
        match &item {
            DumpItem::Dataset(d) => self.dataset = Some(d.clone()),
            DumpItem::Record { .. } => {}
            _ => self.dataset = None,
        }
        self.counts.add(&item);
        Ok(Parsed::Item(item))
    }

    /// Whether the trailer was read (a dump without it was cut off).
    pub fn complete(&self) -> bool {
        self.trailer
    }
}

/// A stream of a whole store's items in dump order, read from one consistent snapshot.
/// Bounded: the store reads ahead at most a few pages.
pub type DumpStream = tokio::sync::mpsc::Receiver<Result<DumpItem, StoreError>>;

/// Items a dump stream reads ahead.
pub const DUMP_READ_AHEAD: usize = 1024;

// What an export reads, the same SQL on both backends (text compares by bytes on both).
pub(crate) const DUMP_IDENTITIES: &str =
    "SELECT pool, id, guest, merged_into, created_at FROM identities ORDER BY pool, id";
pub(crate) const DUMP_LOGINS: &str =
    "SELECT pool, provider, subject, identity, linked_at FROM logins
                      ORDER BY pool, provider, subject";
/// Each dataset with its records, in dump order (one row with null record columns when it has none).
pub(crate) const DUMP_DATASETS: &str = "SELECT d.pool, d.owner, d.name, d.sync_count, d.deleted,
                               d.last_deleted_sync_count, d.merge_root, d.created_at,
                               d.last_modified, r.key, r.value, r.sync_count, r.last_modified,
                               r.last_modified_by, r.device_id, r.device_last_modified
                        FROM datasets d LEFT JOIN records r ON r.dataset_id = d.id
                        ORDER BY d.pool, d.owner, d.name, r.key";
pub(crate) const DUMP_GRANTS: &str =
    "SELECT pool, owner, name, grantee, access, granted_at FROM grants
                      ORDER BY pool, owner, name, grantee";
pub(crate) const DUMP_SETTINGS: &str =
    "SELECT pool, name, value, updated_at FROM pool_settings ORDER BY pool, name";

/// What `import` does with an item whose key the target already holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum MergePolicy {
    /// The target must be empty; an item that exists is an error.
    #[default]
    Refuse,
    /// The target's item stays as it is and the import's is skipped: an identity, a login,
    /// a grant or a pool setting with the same key, or a dataset with the same
    /// (pool, owner, name), live or deleted, together with its records.
    SkipExisting,
}

/// Where a source stands after the items committed so far, opaque to the store: a dump
/// file's line count and the hash of those lines, an API's page token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportCheckpoint {
    /// Names the source (for a file: the hash of its header line).
    pub source: String,
    /// How far it was read (for a file: lines).
    pub position: u64,
    /// Proves the source did not change below `position` (for a file: the hash of those lines).
    pub marker: String,
}

/// An import's progress, kept in the target store and updated in every batch's transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportProgress {
    pub checkpoint: ImportCheckpoint,
    pub merge: MergePolicy,
    /// The last dataset the import skipped (with `SkipExisting`): its records are skipped.
    pub skipped_dataset: Option<(String, String, String)>,
    pub imported: DumpCounts,
    pub skipped: DumpCounts,
    /// The source was read to its end.
    pub done: bool,
}

/// What an import finds in the target before it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportStatus {
    /// No identity, login, dataset, grant or pool setting.
    pub empty: bool,
    /// The progress of the import that wrote into this store, if one did.
    pub progress: Option<ImportProgress>,
}

/// One transaction's worth of items.
#[derive(Debug, Clone)]
pub struct ImportBatch {
    /// The progress this batch continues from: `None` for an import's first batch. The
    /// store checks it against the one it holds, so two importers never interleave and a
    /// batch never applies twice.
    pub after: Option<ImportCheckpoint>,
    /// The progress once this batch is in.
    pub checkpoint: ImportCheckpoint,
    pub merge: MergePolicy,
    pub items: Vec<DumpItem>,
    /// The source has no more items.
    pub done: bool,
}

/// What a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Committed, with the progress now held.
    Committed(ImportProgress),
    /// Nothing written: item `index` of the batch cannot be imported.
    Rejected { index: usize, reason: String },
    /// Nothing written: the store's progress is not the batch's `after`.
    OutOfStep { held: Option<ImportCheckpoint> },
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An item the caller tagged `tag` (a line number) is invalid or clashes with the target.
    #[error("item {tag}: {reason}")]
    Rejected { tag: u64, reason: String },
    #[error(
        "the target store is not empty: import into an empty store, or pass a merge policy (--merge skip-existing)"
    )]
    NotEmpty,
    #[error("{0}")]
    OtherImport(String),
}

/// Where an [`Importer`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Nothing of this source is in the target yet.
    Fresh,
    /// An earlier run stopped after this checkpoint: skip the source up to it.
    Resume(ImportProgress),
    /// An earlier run imported this whole source.
    Complete(ImportProgress),
}

/// The sink every import source feeds: it batches items and commits each batch with the
/// source's checkpoint, so a run that is killed resumes where the last batch ended, and a
/// bad item fails its batch (nothing of it written) with the caller's tag for it.
pub struct Importer<'a> {
    store: &'a dyn Store,
    merge: MergePolicy,
    batch_size: usize,
    after: Option<ImportCheckpoint>,
    items: Vec<DumpItem>,
    tags: Vec<u64>,
    progress: ImportProgress,
}

impl std::fmt::Debug for Importer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer")
            .field("after", &self.after)
            .field("pending", &self.items.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Importer<'a> {
    /// Looks at the target: a store the same source (`source`, as its checkpoints name it)
    /// was imported into resumes or is complete; another non-empty one is refused unless
    /// `merge` says how to merge.
    pub async fn start(
        store: &'a dyn Store,
        source: &str,
        merge: MergePolicy,
        batch_size: usize,
    ) -> Result<(Importer<'a>, Start), ImportError> {
        let status = store.import_status().await?;
        let start = match status.progress {
            Some(p) if p.checkpoint.source == source => {
                if p.merge != merge {
                    return Err(ImportError::OtherImport(format!(
                        "this import was started with --merge {}: resume it with the same",
                        merge_name(p.merge)
                    )));
                }
                if p.done {
                    Start::Complete(p)
                } else {
                    Start::Resume(p)
                }
            }
            Some(p) if !p.done => {
                return Err(ImportError::OtherImport(format!(
                    "the target holds an unfinished import of another source (stopped at item \
                     position {}): finish it with the same input, or import into another store",
                    p.checkpoint.position
                )));
            }
            _ if !status.empty && merge == MergePolicy::Refuse => {
                return Err(ImportError::NotEmpty);
            }
            _ => Start::Fresh,
        };
        let (after, progress) = match &start {
            Start::Fresh => (None, ImportProgress::default()),
            Start::Resume(p) | Start::Complete(p) => (Some(p.checkpoint.clone()), p.clone()),
        };
        let importer = Importer {
            store,
            merge,
            batch_size: batch_size.max(1),
            after,
            items: Vec::new(),
            tags: Vec::new(),
            progress,
        };
        Ok((importer, start))
    }

    /// Adds an item; `tag` names it in an error (a line number). Returns whether the batch
    /// is full: the caller then calls [`Importer::commit`] with its checkpoint.
    pub fn push(&mut self, item: DumpItem, tag: u64) -> bool {
        self.items.push(item);
        self.tags.push(tag);
        self.items.len() >= self.batch_size
    }

    /// Items pushed and not yet committed.
    pub fn pending(&self) -> usize {
        self.items.len()
    }

    /// Commits the pending items (if any, or if `done`) with the source at `checkpoint`.
    pub async fn commit(
        &mut self,
        checkpoint: ImportCheckpoint,
        done: bool,
    ) -> Result<&ImportProgress, ImportError> {
        if self.items.is_empty() && !done {
            return Ok(&self.progress);
        }
        let batch = ImportBatch {
            after: self.after.clone(),
            checkpoint: checkpoint.clone(),
            merge: self.merge,
            items: std::mem::take(&mut self.items),
            done,
        };
        let tags = std::mem::take(&mut self.tags);
        match self.store.import_batch(batch).await? {
            BatchOutcome::Committed(progress) => {
                self.after = Some(checkpoint);
                self.progress = progress;
                Ok(&self.progress)
            }
            BatchOutcome::Rejected { index, reason } => Err(ImportError::Rejected {
                tag: tags.get(index).copied().unwrap_or_default(),
                reason,
            }),
            BatchOutcome::OutOfStep { held } => Err(ImportError::OtherImport(format!(
                "another import wrote into the target meanwhile (it is at {:?})",
                held.map(|c| c.position)
            ))),
        }
    }

    /// The progress as of the last commit.
    pub fn progress(&self) -> &ImportProgress {
        &self.progress
    }
}

fn merge_name(merge: MergePolicy) -> &'static str {
    match merge {
        MergePolicy::Refuse => "refuse",
        MergePolicy::SkipExisting => "skip-existing",
    }
}

/// What a backend's batch apply keeps between items: which dataset the last records
/// belong to, and the counts.
#[derive(Debug)]
pub(crate) struct ApplyState {
    pub progress: ImportProgress,
}

impl ApplyState {
    /// Starts from the held progress, or a fresh one.
    pub(crate) fn new(held: Option<ImportProgress>, batch: &ImportBatch) -> Self {
        // A first batch starts afresh, also over a finished import of another source.
        let mut progress = match batch.after {
            Some(_) => held.unwrap_or_default(),
            None => ImportProgress::default(),
        };
        progress.merge = batch.merge;
        ApplyState { progress }
    }

    pub(crate) fn skipping(&self, key: &DatasetKey) -> bool {
        self.progress
            .skipped_dataset
            .as_ref()
            .is_some_and(|(p, o, n)| *p == key.pool && *o == key.owner && *n == key.name)
    }

    /// An item that exists in the target: skipped, or the reason the batch is refused.
    pub(crate) fn exists(&mut self, item: &DumpItem) -> Result<(), String> {
        match self.progress.merge {
            MergePolicy::Refuse => Err(format!("{} already exists in the target", describe(item))),
            MergePolicy::SkipExisting => {
                if let DumpItem::Dataset(d) = item {
                    self.progress.skipped_dataset =
                        Some((d.pool.clone(), d.owner.clone(), d.name.clone()));
                }
                self.progress.skipped.add(item);
                Ok(())
            }
        }
    }

    pub(crate) fn skipped_record(&mut self, item: &DumpItem) {
        self.progress.skipped.add(item);
    }

    pub(crate) fn imported(&mut self, item: &DumpItem) {
        if let DumpItem::Dataset(_) = item {
            self.progress.skipped_dataset = None;
        }
        self.progress.imported.add(item);
    }

    /// The progress to store once every item is in.
    pub(crate) fn finish(mut self, batch: &ImportBatch) -> ImportProgress {
        self.progress.checkpoint = batch.checkpoint.clone();
        self.progress.done = batch.done;
        self.progress
    }
}

/// Checks a batch's `after` against the held progress.
/// A first batch (no `after`) may follow only a finished import.
pub(crate) fn in_step(held: Option<&ImportProgress>, batch: &ImportBatch) -> bool {
    match (held, &batch.after) {
        (None, None) => true,
        (Some(p), None) => p.done,
        (held, Some(after)) => held.is_some_and(|p| p.checkpoint == *after),
    }
}

/// The item, for an error message.
pub(crate) fn describe(item: &DumpItem) -> String {
    match item {
        DumpItem::Identity(i) => format!("identity {}/{}", i.pool, i.id),
        DumpItem::Login(l) => format!("login {}/{}/{}", l.pool, l.provider, l.subject),
        DumpItem::Dataset(d) => format!("dataset {}", d.key()),
        DumpItem::Record { dataset, record } => format!("record {:?} of {dataset}", record.key),
        DumpItem::Grant(g) => format!(
            "grant of {}/{}/{} to {}",
            g.pool, g.owner, g.name, g.grantee
        ),
        DumpItem::Setting(s) => format!("pool setting {:?} of {}", s.name, s.pool),
    }
}

/// The aggregates a dataset row keeps for its live records, updated as records arrive.
pub(crate) fn live_bytes(record: &DumpRecord) -> Option<u64> {
    record
        .value
        .as_ref()
        .map(|v| crate::record_bytes(&record.key, v))
}

/// The progress's JSON form, as the stores keep it.
pub(crate) fn progress_json(progress: &ImportProgress) -> String {
    serde_json::to_string(progress).unwrap_or_default()
}

pub(crate) fn progress_from_json(text: &str) -> Result<ImportProgress, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Internal(format!("unreadable import progress: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(name: &str, sync_count: u64) -> DumpDataset {
        DumpDataset {
            pool: "default".into(),
            owner: "alice".into(),
            name: name.into(),
            sync_count,
            deleted: false,
            last_deleted_sync_count: 0,
            merge_root: None,
            created_at: 1,
            last_modified: 2,
        }
    }

    fn record(key: &str, sync_count: u64) -> DumpRecord {
        DumpRecord {
            key: key.into(),
            value: Some("v".into()),
            sync_count,
            last_modified: 3,
            last_modified_by: "alice".into(),
            device_id: None,
            device_last_modified: None,
        }
    }

    fn setting(name: &str, value: &str) -> DumpSetting {
        DumpSetting {
            pool: "default".into(),
            name: name.into(),
            value: value.into(),
            updated_at: 7,
        }
    }

    #[test]
    fn test_dump_lines_round_trip_through_the_reader() {
        let items = vec![
            DumpItem::Dataset(dataset("d", 2)),
            DumpItem::Record {
                dataset: dataset("d", 2).key(),
                record: record("k", 2),
            },
            DumpItem::Setting(setting(
                "cognito.events.SyncTrigger",
                "https://hooks.example.com/sync?token=a\"b",
            )),
            DumpItem::Setting(setting("z", "")),
        ];
        let mut lines = vec![header_line("sqlite", 5)];
        let mut counts = DumpCounts::default();
        for item in &items {
            lines.push(item_line(item));
            counts.add(item);
        }
        lines.push(trailer_line(&counts));
        let mut reader = DumpReader::new();
        let mut read = Vec::new();
        for line in &lines {
            if let Parsed::Item(item) = reader.line(line).unwrap() {
                read.push(item);
            }
        }
        assert_eq!(read, items);
        assert!(reader.complete());
        assert!(lines[3].starts_with(r#"{"type":"setting","pool":"default","name":"#));
        assert!(
            lines[5].ends_with(r#""grants":0,"settings":2}"#),
            "{}",
            lines[5]
        );
    }

    #[test]
    fn test_dump_reader_reads_a_version_1_dump() {
        let lines = [
            r#"{"type":"header","format":"tandem-dump","version":1,"source":"sqlite","exportedAt":1,"tandem":"0.1.0"}"#,
            r#"{"type":"grant","pool":"default","owner":"alice","name":"d","grantee":"bob","access":"read","grantedAt":1}"#,
            r#"{"type":"trailer","identities":0,"logins":0,"datasets":0,"records":0,"grants":1}"#,
        ];
        let mut reader = DumpReader::new();
        for line in lines {
            reader.line(line).unwrap();
        }
        assert!(reader.complete());
    }

    #[test]
    fn test_dump_reader_refuses_bad_lines_with_a_reason() {
        let header = header_line("sqlite", 5);
        let first = item_line(&DumpItem::Dataset(dataset("d", 1)));
        let cases: &[(&[&str], &str)] = &[
            (&[&first], "header"),
            (&[&header, "{not json"], "not a dump line"),
            (
                &[
                    &header,
                    r#"{"type":"record","key":"k","value":"v","syncCount":1,"lastModified":1,"lastModifiedBy":"a","deviceId":null,"deviceLastModified":null}"#,
                ],
                "follow its dataset",
            ),
            (
                &[
                    &header,
                    r#"{"type":"identity","pool":"default","id":"a","guest":true,"mergedInto":null,"createdAt":1,"extra":1}"#,
                ],
                "unknown field",
            ),
            (
                &[
                    &header,
                    r#"{"type":"trailer","identities":1,"logins":0,"datasets":0,"records":0,"grants":0}"#,
                ],
                "trailer counts",
            ),
            (
                &[
                    r#"{"type":"header","format":"tandem-dump","version":99,"source":"x","exportedAt":1,"tandem":"0"}"#,
                ],
                "version 99",
            ),
        ];
        for (lines, want) in cases {
            let mut reader = DumpReader::new();
            let err = lines
                .iter()
                .map(|l| reader.line(l))
                .find_map(Result::err)
                .unwrap_or_else(|| panic!("{lines:?} should fail"));
            assert!(err.contains(want), "{err} should mention {want}");
        }
        let mut reader = DumpReader::new();
        reader.line(&header).unwrap();
        reader
            .line(&item_line(&DumpItem::Dataset(dataset("d", 1))))
            .unwrap();
        let err = reader
            .line(&item_line(&DumpItem::Record {
                dataset: dataset("d", 1).key(),
                record: record("k", 2),
            }))
            .unwrap_err();
        assert!(err.contains("above its dataset"), "{err}");
        let bad_name = DumpItem::Dataset(dataset("bad name!", 1));
        assert!(bad_name.validate().is_err());
    }

    #[test]
    fn test_dump_reader_refuses_bad_setting_lines_with_a_reason() {
        let header = header_line("sqlite", 5);
        let v1 = header.replace(r#""version":2"#, r#""version":1"#);
        assert_ne!(v1, header);
        let good = item_line(&DumpItem::Setting(setting("n", "v")));
        let grant = item_line(&DumpItem::Grant(DumpGrant {
            pool: "default".into(),
            owner: "alice".into(),
            name: "d".into(),
            grantee: "bob".into(),
            access: GrantAccess::Read,
            granted_at: 1,
        }));
        let huge = item_line(&DumpItem::Setting(setting(
            "n",
            &"v".repeat(crate::admin::MAX_SETTING_VALUE + 1),
        )));
        let empty_name = good.replace(r#""name":"n""#, r#""name":"""#);
        let nul = good.replace(r#""value":"v""#, r#""value":"a\u0000b""#);
        let negative = good.replace(r#""updatedAt":7"#, r#""updatedAt":-1"#);
        let null_value = good.replace(r#""value":"v""#, r#""value":null"#);
        let extra = good.replace(r#""updatedAt""#, r#""extra":1,"updatedAt""#);
        let trailer =
            r#"{"type":"trailer","identities":0,"logins":0,"datasets":0,"records":0,"grants":0}"#;
        let cases: &[(&[&str], &str)] = &[
            (&[&v1, &good], "version-1 dump"),
            (&[&header, &good, &grant], "out of order"),
            (&[&header, &empty_name], "setting name"),
            (&[&header, &huge], "setting value"),
            (&[&header, &nul], "without NUL"),
            (&[&header, &negative], "updatedAt must not be negative"),
            (&[&header, &null_value], "not a dump line"),
            (&[&header, &extra], "unknown field"),
            (&[&header, &good, trailer], "trailer counts"),
        ];
        for (lines, want) in cases {
            let mut reader = DumpReader::new();
            let err = lines
                .iter()
                .map(|l| reader.line(l))
                .find_map(Result::err)
                .unwrap_or_else(|| panic!("{lines:?} should fail"));
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
