// Type declarations for tandem.js (Tandem JavaScript SDK). Keep in sync with the JSDoc there.

export const VERSION: string;
export const PROTOCOL_VERSION: 1;
/** The protocol features a client asks for unless told otherwise: `['delta', 'lean']`. */
export const DEFAULT_FEATURES: readonly string[];

export type ConnectionState = 'connecting' | 'online' | 'offline' | 'failed' | 'closed';

/** A record as the server stores it. */
export interface ServerRecord {
  key: string;
  /** `null` is a tombstone (a removed record). */
  value: string | null;
  /** The dataset's sync count at the commit that last changed this record. */
  syncCount: number;
  /** Server time of that commit, ms since the epoch. */
  lastModified: number;
  /** The identity that made the change. */
  lastModifiedBy: string;
  deviceId?: string;
  /** The writer's clock when it made the change, ms since the epoch. */
  deviceLastModified?: number;
}

/** A record as this device knows it. */
export interface LocalRecord {
  /** The local value; `null` means removed locally. */
  value: string | null;
  /** The server sync count this value is based on (0: the key was never seen on the server). */
  syncCount: number;
  /** Changed locally and not yet acknowledged by the server. */
  dirty: boolean;
  /** This device's clock at the local change, ms since the epoch. */
  deviceLastModified?: number;
  /** Bumped on every local edit; an ack only cleans the edit it carried. */
  version: number;
  /** Present while the change is set aside: refused for good, not sent until edited again. */
  setAside?: SetAside;
  /** The server's time at the commit that wrote this value, ms since the epoch; `undefined`
   * while the value is a local edit not yet acknowledged. */
  lastModified?: number;
  /** Who wrote this value: the server record's identity, or this client's for a local edit. */
  lastModifiedBy?: string;
  /** The device that wrote this value, when it named one (this client's `deviceId` for a
   * local edit). */
  deviceId?: string;
}

/** Why a local change is set aside. */
export interface SetAside {
  /** `too_large`, `limit_exceeded` or `bad_request`. */
  code: string;
  /** Which limit, e.g. `max_key_length`. */
  limit?: string;
  /** That limit's value. */
  max?: number;
  message: string;
}

/** The server's limits on an update (`ready.limits`, or learnt from an error naming one). */
export interface WriteLimits {
  /** Characters (Unicode scalar values) in a key. */
  maxKeyLength?: number;
  /** Patches in one update. */
  maxPatches?: number;
  /** Live records in one dataset. */
  maxRecords?: number;
  /** UTF-8 bytes of the keys and values of one dataset. */
  maxDatasetBytes?: number;
  maxDeviceIdLength?: number;
  /** Bytes in one frame sent to the server. */
  maxFrameBytes?: number;
}

/** What a remote delete does to the local copy: keep the unsynced changes (default; they
 * re-create the dataset at the next sync), keep every local record as a new dataset, or drop
 * it all. */
export type DeletedPolicy = 'keepPending' | 'keepAll' | 'drop';

export interface DatasetDeletedCase {
  dataset: Dataset;
  /** The sync count the delete took. */
  syncCount: number;
}

export type DatasetDeletedHandler = DeletedPolicy | ((c: DatasetDeletedCase) => DeletedPolicy);

/** One immutable view of a dataset; the same object until something visible changes. */
export interface DatasetSnapshot {
  /** Goes up with every new snapshot of the handle. */
  readonly version: number;
  /** The live records, ordered by key. Do not modify. */
  readonly records: ReadonlyMap<string, string>;
  readonly syncCount: number;
  readonly pending: number;
  readonly hasPendingWrites: boolean;
  /** Whether what made this snapshot came from the server rather than a local or other-tab edit. */
  readonly fromServer: boolean;
}

/** What a store keeps per (identity, owner, dataset). */
export interface DatasetState {
  /** The highest dataset sync count seen from the server. */
  syncCount: number;
  records: Record<string, LocalRecord>;
}

export interface StoreRef {
  identity: string;
  owner: string;
  name: string;
}

/** The offline cache. Implement `load` and `save` to bring your own storage; `list` and
 * `remove` too for `client.cachedDatasets()` and `client.wipe()`. */
export interface TandemStore {
  load(ref: StoreRef): Promise<DatasetState | null | undefined>;
  save(ref: StoreRef, state: DatasetState): Promise<void>;
  /** The datasets cached for `identity`. */
  list?(identity: string): Promise<Array<{ owner: string; name: string }>>;
  /** Deletes one dataset's cached state. */
  remove?(ref: StoreRef): Promise<void>;
}

/** Keeps dataset state in memory (the default outside browsers). */
export class MemoryStore implements TandemStore {
  load(ref: StoreRef): Promise<DatasetState | null>;
  save(ref: StoreRef, state: DatasetState): Promise<void>;
  list(identity: string): Promise<Array<{ owner: string; name: string }>>;
  remove(ref: StoreRef): Promise<void>;
}

/** Keeps dataset state in IndexedDB (the default in browsers). */
export class IndexedDBStore implements TandemStore {
  constructor(options?: { name?: string; indexedDB?: unknown });
  /** The IndexedDB database name (default `tandem`). */
  readonly name: string;
  load(ref: StoreRef): Promise<DatasetState | null>;
  save(ref: StoreRef, state: DatasetState): Promise<void>;
  list(identity: string): Promise<Array<{ owner: string; name: string }>>;
  remove(ref: StoreRef): Promise<void>;
}

/** What `AsyncStorageStore` needs: the shape of React Native's
 * `@react-native-async-storage/async-storage` (string keys and values). */
export interface AsyncStorageLike {
  getItem(key: string): Promise<string | null | undefined>;
  setItem(key: string, value: string): Promise<void>;
  removeItem(key: string): Promise<void>;
  getAllKeys(): Promise<readonly string[]>;
}

/** Keeps dataset state in an AsyncStorage-shaped store (React Native): one JSON string per
 * (identity, owner, dataset), under `prefix` (default `tandem:`). */
export class AsyncStorageStore implements TandemStore {
  constructor(storage: AsyncStorageLike, options?: { prefix?: string });
  load(ref: StoreRef): Promise<DatasetState | null>;
  save(ref: StoreRef, state: DatasetState): Promise<void>;
  list(identity: string): Promise<Array<{ owner: string; name: string }>>;
  remove(ref: StoreRef): Promise<void>;
}

/** A dataset this device holds for the client's identity. */
export interface CachedDataset {
  owner: string;
  name: string;
  /** Live records. */
  records: number;
  /** Local changes not yet acknowledged. */
  pending: number;
  /** The highest sync count seen from the server. */
  syncCount: number;
  /** Whether it is open on this client. */
  open: boolean;
}

/** The client's sync status: one immutable object, the same until a field changes. */
export interface SyncStatus {
  /** Authenticated on a live connection. */
  readonly connected: boolean;
  /** An update is on its way to the server. */
  readonly uploading: boolean;
  /** Unacknowledged local changes (`client.pending`). */
  readonly pending: number;
  /** When the server last confirmed this device's copy of a dataset (an ack, a
   * subscription's snapshot, a push), ms since the epoch; `null` before that. */
  readonly lastSyncedAt: number | null;
  /** `lastSyncedAt !== null`. */
  readonly hasSynced: boolean;
  /** The last error reported; cleared by the next ack or connection. */
  readonly lastError: TandemError | null;
}

export type ResolutionValue =
  | { type: 'keepLocal' }
  | { type: 'takeRemote' }
  | { type: 'merge'; value: string | null };

export const Resolution: {
  /** Write the local value over the server's (retried on top of the server's version). */
  keepLocal(): ResolutionValue;
  /** Drop the local change and take the server's record. */
  takeRemote(): ResolutionValue;
  /** Write this value instead (`null` removes the key), on top of the server's version. */
  merge(value: string | null): ResolutionValue;
};

export interface ConflictCase {
  key: string;
  /** The local, unacknowledged change. */
  local: LocalRecord;
  /** The server's record: `null` if the key has no record; a tombstone has `value: null`. */
  server: ServerRecord | null;
  dataset: Dataset;
}

export type ConflictHandler = (
  c: ConflictCase,
) => ResolutionValue | 'keepLocal' | 'takeRemote' | Promise<ResolutionValue | 'keepLocal' | 'takeRemote'>;

export type ConflictHandlerOption = ConflictHandler | 'keepLocal' | 'takeRemote' | 'latestDeviceTime';

export const ConflictHandlers: {
  keepLocal: ConflictHandler;
  takeRemote: ConflictHandler;
  /** The later device time wins (server: `deviceLastModified`, else `lastModified`); ties keep the server's. */
  latestDeviceTime: ConflictHandler;
};

export interface TokenRequest {
  reason: 'connect' | 'refresh';
  identity: string | null;
}

export type TokenProvider = string | ((req: TokenRequest) => string | Promise<string>);

export interface ClientOptions {
  /** The user the tokens name; needed to open datasets before the first token arrives. */
  identity?: string;
  /** A WebSocket constructor (default `globalThis.WebSocket`; on Node 20 pass one, e.g. from `ws`). */
  WebSocket?: unknown;
  /** Default: `IndexedDBStore` in browsers, `MemoryStore` elsewhere. */
  store?: TandemStore;
  /** Sent with every update; default a random id. */
  deviceId?: string;
  /** Reconnect backoff; default 100 ms doubling to 10 s, with jitter. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Retries after conflicts before `sync()` gives up (default 3). */
  maxSyncRetries?: number;
  /** Default handler for datasets opened by this client (default `latestDeviceTime`). */
  conflictHandler?: ConflictHandlerOption;
  /** Sync after each local write when online (default false). */
  autoSync?: boolean;
  /** Debounce for `autoSync` (default 50 ms). */
  autoSyncDelayMs?: number;
  /** A reply later than this drops the connection (default 30 s). */
  requestTimeoutMs?: number;
  /** Heartbeat period; 0 disables it (default 25 s). */
  pingIntervalMs?: number;
  /** Time to get `ready` after connecting (default 10 s). */
  authTimeoutMs?: number;
  /** Follow the browser's online/offline events (default true). */
  watchNetwork?: boolean;
  /** Share local edits with this user's other tabs over a BroadcastChannel (default: true
   * with the `IndexedDBStore` where BroadcastChannel exists). */
  crossTab?: boolean;
  /** Protocol features to ask for (docs/PROTOCOL.md §1): `delta` (pushes carry only the
   * records a commit changed) and `lean` (records leave out fields the frame says).
   * Default `['delta', 'lean']`; `[]` gets whole-dataset pushes in the full encoding. */
  features?: Array<'delta' | 'lean' | (string & {})>;
  /** What a remote delete does to the local copy (default `keepPending`). */
  onDatasetDeleted?: DatasetDeletedHandler;
}

export interface OpenOptions {
  /** Another identity's dataset (shared with you); default yours. */
  owner?: string;
  conflictHandler?: ConflictHandlerOption;
  autoSync?: boolean;
  autoSyncDelayMs?: number;
  onDatasetDeleted?: DatasetDeletedHandler;
}

export interface SyncOutcome {
  /** The dataset's sync count after the sync. */
  syncCount: number;
  /** Records the server acknowledged. */
  pushed: number;
  /** Conflicts the handler resolved on the way. */
  conflicts: number;
  /** Keys whose changes are set aside (refused for good) and were not sent. */
  setAside: string[];
}

export interface DatasetInfo {
  dataset: { owner: string; name: string };
  syncCount: number;
  records: number;
  bytes: number;
  access: 'owner' | 'write' | 'read';
  lastModified: number;
}

export class TandemError extends Error {
  constructor(
    code: string,
    message: string,
    extra?: { limit?: string; max?: number; keys?: string[]; key?: string; closeCode?: number; server?: boolean },
  );
  /** The server's stable error code, or one of the SDK's: `offline`, `disconnected`, `timeout`, `conflict`, `revoked`, `closed`, `pending_writes`, `unsupported_protocol`. */
  code: string;
  limit?: string;
  max?: number;
  /** For `conflict`: the keys still unresolved; for `pending_writes`: the datasets (`owner/name`). */
  keys?: string[];
  /** For a change set aside, or refused before it was queued: its key. */
  key?: string;
  /** For `closed`: the WebSocket close code. */
  closeCode?: number;
  /** True when the server answered with this error. */
  server: boolean;
}

export interface RemoteChange {
  syncCount: number;
  keys: string[];
  /** `local`: an edit through this handle; `remote`: from the server; `tab`: a local edit
   * made in another tab of this browser. */
  source: 'local' | 'remote' | 'tab';
}

export interface ConflictEvent {
  key: string;
  local: LocalRecord;
  server: ServerRecord | null;
  resolution: ResolutionValue;
}

interface ClientEvents {
  state: [ConnectionState];
  online: [];
  offline: [];
  connecting: [];
  closed: [];
  failed: [TandemError | null];
  ready: [{ identity: string; session: string; expiresAt: number }];
  error: [TandemError];
  status: [SyncStatus];
}

interface DatasetEvents {
  change: [RemoteChange];
  snapshot: [DatasetSnapshot];
  pending: [number];
  conflict: [ConflictEvent];
  synced: [SyncOutcome];
  deleted: [{ syncCount: number; policy: DeletedPolicy }];
  revoked: [{ reason: string }];
  error: [TandemError];
  close: [];
}

declare class Emitter<E extends { [K in keyof E]: unknown[] }> {
  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof E & string>(type: K, fn: (...args: E[K]) => void): () => void;
  off<K extends keyof E & string>(type: K, fn: (...args: E[K]) => void): void;
  once<K extends keyof E & string>(type: K, fn: (...args: E[K]) => void): () => void;
}

/** A dataset of the caller's (`owner` left out) or of another identity. */
export interface DatasetName {
  owner?: string;
  name: string;
}

/** One commit of a dataset's history. */
export interface HistoryEntry {
  /** The commit log entry's id; pages go by it. */
  id: number;
  kind: 'update' | 'delete' | 'grant' | 'revoke' | 'merge';
  /** The sync count after an update, delete or merge; the current one at a grant or revoke. */
  syncCount: number;
  actor: string;
  deviceId?: string;
  /** Server time, ms since the Unix epoch. */
  time: number;
  /** The keys an update, delete or merge changed. */
  keys?: string[];
  /** For a grant or revoke. */
  grantee?: string;
  /** The access a grant gave. */
  access?: 'read' | 'write';
}

export interface HistoryPage {
  /** The dataset's current sync count. */
  syncCount: number;
  /** Newest first. */
  entries: HistoryEntry[];
  /** Pass as `before` for the next (older) page; `null` on the last one. */
  next: number | null;
}

export class TandemClient extends Emitter<ClientEvents> {
  /** Starts a client and returns it at once; it connects in the background. */
  static connect(url: string, tokenProvider: TokenProvider, options?: ClientOptions): TandemClient;
  /** Use `TandemClient.connect`, which also starts the connection. */
  constructor(url: string, tokenProvider: TokenProvider, options?: ClientOptions);
  readonly identity: string | null;
  readonly state: ConnectionState;
  readonly online: boolean;
  readonly deviceId: string;
  readonly lastError: TandemError | null;
  readonly session: { session: string; expiresAt: number } | null;
  /** The features the server turned on for this session (`ready.features`); empty offline. */
  readonly features: string[];
  /** Unsynchronised local changes across the datasets opened on this client, closed ones included. */
  readonly pending: number;
  /** The server's limits on an update, as last known (empty until announced or learnt). */
  readonly limits: WriteLimits;
  readonly datasets: Dataset[];
  /** The protocol version the server stated in its last `ready` (null before one). A server
   * speaking another version than `PROTOCOL_VERSION` fails the client (`unsupported_protocol`). */
  readonly protocol: number | null;
  /** Whether `pause()` holds the network off. */
  readonly paused: boolean;
  /** The sync status (see `onStatus`). */
  readonly status: SyncStatus;
  /** Calls `listener` with the current status now and at every `status` event; returns the unsubscribe function. */
  onStatus(listener: (status: SyncStatus) => void): () => void;
  /** Drops the connection and stays offline until `resume()`; local reads and writes go on. */
  pause(): void;
  /** Connects again after `pause()`. */
  resume(): void;
  /** Resolves when the changes pending now in the open datasets are acknowledged (across
   * reconnects); rejects when one is set aside, on `closed`, when the client fails, or with
   * `timeout`. Sends nothing itself. */
  waitForPendingWrites(options?: { timeoutMs?: number }): Promise<void>;
  /** Syncs the open datasets now (when online) and waits as `waitForPendingWrites`. */
  flush(options?: { timeoutMs?: number }): Promise<void>;
  /** The datasets cached on this device for this identity, with their pending counts. */
  cachedDatasets(): Promise<CachedDataset[]>;
  /** Sign-out: deletes this identity's local data and closes the client. Rejects with
   * `pending_writes` (deleting nothing) while changes are unsynced, unless `force`. */
  wipe(options?: { force?: boolean }): Promise<Array<{ owner: string; name: string }>>;
  waitOnline(timeoutMs?: number): Promise<void>;
  /** An open dataset's handle is shared; naming another conflict handler for it rejects with `bad_request`. */
  open(name: string, options?: OpenOptions): Promise<Dataset>;
  grant(name: string, identity: string, access?: 'read' | 'write'): Promise<void>;
  revoke(name: string, identity: string): Promise<void>;
  /** Resolves with the sync count the delete took. */
  deleteDataset(name: string): Promise<number>;
  listDatasets(): Promise<DatasetInfo[]>;
  /** A page of a dataset's commits, newest first; `next` is the `before` of the next page. */
  history(dataset: string | DatasetName, options?: { before?: number; limit?: number }): Promise<HistoryPage>;
  /** The dataset's live records right after the commit at `syncCount` (values never null). */
  readAt(dataset: string | DatasetName, syncCount: number): Promise<ServerRecord[]>;
  /** Restores the dataset to `syncCount` as one new commit; resolves with the new sync count. */
  restore(dataset: string | DatasetName, syncCount: number): Promise<number>;
  /** Round trip in ms. */
  ping(): Promise<number>;
  reconnect(): void;
  close(): Promise<void>;
}

export class Dataset extends Emitter<DatasetEvents> {
  private constructor();
  readonly owner: string;
  readonly name: string;
  readonly client: TandemClient;
  readonly syncCount: number;
  readonly pending: number;
  readonly subscribed: boolean;
  readonly revoked: boolean;
  readonly deleted: boolean;
  autoSync: boolean;
  readonly conflictHandler: ConflictHandler;
  /** Replaces the conflict handler for every holder of this handle. */
  setConflictHandler(handler: ConflictHandlerOption): void;
  /** The current snapshot (for `useSyncExternalStore`'s `getSnapshot`). */
  readonly snapshot: DatasetSnapshot;
  /** Calls `listener` now and with every new snapshot; returns the unsubscribe function. */
  onSnapshot(listener: (snapshot: DatasetSnapshot) => void): () => void;
  /** The changes set aside (refused for good), with their keys. */
  setAside(): Array<SetAside & { key: string }>;
  /** Drops the local change of `key`; the server's version comes back. */
  discard(key: string): boolean;
  /** Drops every pending local change; returns their keys. */
  revert(): string[];
  get(key: string): string | undefined;
  has(key: string): boolean;
  records(): Map<string, string>;
  /** The local record of `key` (a copy): its value, sync bookkeeping, and who wrote it,
   * when and from which device (`lastModified`, `lastModifiedBy`, `deviceId`). */
  record(key: string): LocalRecord | undefined;
  dirtyKeys(): string[];
  put(key: string, value: string): Promise<void>;
  remove(key: string): Promise<void>;
  sync(): Promise<SyncOutcome>;
  /** Resolves with the snapshot's sync count. */
  subscribe(): Promise<number>;
  remoteChanges(): AsyncIterableIterator<RemoteChange>;
  close(): Promise<void>;
}

/** Whether a WebSocket close code means "reconnect" (protocol §9). */
export function shouldReconnect(code: number): boolean;

/** Shorthand for `TandemClient.connect`. */
export function connect(url: string, tokenProvider: TokenProvider, options?: ClientOptions): TandemClient;
