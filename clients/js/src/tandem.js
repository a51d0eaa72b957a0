// Tandem JavaScript SDK: one ES module, no dependencies, no build step.
// Works in browsers and in Node >= 20 (Node 20 has no global WebSocket: pass one, e.g.
// `TandemClient.connect(url, getToken, { WebSocket: (await import('ws')).WebSocket })`,
// or run Node 20 with `--experimental-websocket`; Node 22+ has it built in).
//
// The model (the same as the Rust SDK's, see clients/js/README.md):
// - `TandemClient.connect(url, tokenProvider, options)` keeps one WebSocket up: it
//   authenticates with a token from the provider, reconnects with exponential backoff and
//   jitter, refreshes the token before it expires, re-subscribes every open dataset and then
//   sends what was written offline.
// - Opt-in protocol features (`features`, default both): `delta` pushes carry only what a
//   commit changed, `lean` leaves out record fields the frame already says. A re-subscribe
//   sends `since` (the sync count of the copy kept), so a reconnect fetches only the changes.
// - `client.open(name)` gives a `Dataset` over a persistent local cache. `get`, `put`,
//   `remove` and `records` work offline; writes mark records dirty. `sync()` sends the dirty
//   records with the sync counts they were based on; conflicts go to the conflict handler
//   (keep local, take remote, latest device time, or your function) and the update is
//   retried a bounded number of times. Nothing written locally is dropped unless the
//   handler decides so.
// - Never stuck: the server's limits (`ready.limits`) refuse a write that can never be
//   stored when it is made, split updates at `maxPatches` and `maxFrameBytes`, and a change
//   the server refuses for good is set aside (kept, reported once, discardable) instead of
//   blocking the dataset's other keys.
// - Every visible change, local ones included, is a `change` event and a new immutable
//   snapshot (`onSnapshot`); after a remote delete the dataset is followed again.
// - The client's sync status (`status`, `onStatus`) is one immutable object per change;
//   `waitForPendingWrites`/`flush` wait for acks across reconnects; `wipe` is a sign-out
//   that refuses to delete unsynced changes unless forced; `pause`/`resume` hold the
//   network off. A server speaking another protocol version fails the client.
//
// Wire reference: docs/PROTOCOL.md (protocol version 1).

/** The SDK version: the package's (semver), and the path the gateway serves the
 * minified build at, `/sdk/<VERSION>/tandem.js`. */
export const VERSION = '0.2.0';

/** The protocol version this SDK speaks. */
export const PROTOCOL_VERSION = 1;

// ---------------------------------------------------------------------------------------
// Types (JSDoc; tandem.d.ts has the same in TypeScript form)

/**
 * @typedef {'connecting' | 'online' | 'offline' | 'failed' | 'closed'} ConnectionState
 *
 * @typedef {object} ServerRecord A record as the server stores it.
 * @property {string} key
 * @property {string | null} value `null` is a tombstone (a removed record).
 * @property {number} syncCount The dataset's sync count at the commit that last changed it.
 * @property {number} lastModified Server time of that commit, ms since the epoch.
 * @property {string} lastModifiedBy The identity that made the change.
 * @property {string} [deviceId]
 * @property {number} [deviceLastModified] The writer's clock, ms since the epoch.
 *
 * @typedef {object} LocalRecord A record as this device knows it.
 * @property {string | null} value The local value; `null` means removed locally.
 * @property {number} syncCount The server sync count this value is based on (0: never seen).
 * @property {boolean} dirty Changed locally and not yet acknowledged by the server.
 * @property {number} [deviceLastModified] This device's clock at the local change.
 * @property {number} version Bumped on every local edit; an ack cleans only the edit it carried.
 * @property {SetAside} [setAside] Present while the change is set aside: the server refused it
 *   for good (or it breaks a limit the server announced), so sync() no longer sends it.
 * @property {number} [lastModified] The server's time at the commit that wrote this value, ms
 *   since the epoch; `undefined` while the value is a local edit not yet acknowledged.
 * @property {string} [lastModifiedBy] Who wrote this value: the server record's identity, or
 *   this client's for a local edit.
 * @property {string} [deviceId] The device that wrote this value, when it named one (this
 *   client's `deviceId` for a local edit).
 *
 * @typedef {object} SetAside Why a local change is set aside.
 * @property {string} code `too_large`, `limit_exceeded` or `bad_request`.
 * @property {string} [limit] Which limit, e.g. `max_key_length`.
 * @property {number} [max] That limit's value.
 * @property {string} message
 *
 * @typedef {object} WriteLimits The server's limits on an update (`ready.limits`; a limit the
 *   server did not announce is learnt from the first error that names it, or absent).
 * @property {number} [maxKeyLength] Characters (Unicode scalar values) in a key.
 * @property {number} [maxPatches] Patches in one update.
 * @property {number} [maxRecords] Live records in one dataset.
 * @property {number} [maxDatasetBytes] UTF-8 bytes of the keys and values of one dataset.
 * @property {number} [maxDeviceIdLength]
 * @property {number} [maxFrameBytes] Bytes in one frame sent to the server.
 *
 * @typedef {'keepPending' | 'keepAll' | 'drop'} DeletedPolicy What to do with the local copy
 *   when the owner deletes a dataset: keep the unsynced local changes (they re-create it at
 *   the next sync), keep every local record as a new dataset, or drop it all.
 *
 * @typedef {object} DatasetDeletedCase
 * @property {Dataset} dataset
 * @property {number} syncCount The sync count the delete took.
 *
 * @typedef {DeletedPolicy | ((c: DatasetDeletedCase) => DeletedPolicy)} DatasetDeletedHandler
 *
 * @typedef {object} DatasetSnapshot One immutable view of a dataset (`onSnapshot`,
 *   `dataset.snapshot`): the same object until something visible changes.
 * @property {number} version Goes up by one with every new snapshot of this handle.
 * @property {ReadonlyMap<string, string>} records The live records, ordered by key.
 * @property {number} syncCount
 * @property {number} pending Local changes not yet acknowledged.
 * @property {boolean} hasPendingWrites `pending > 0`.
 * @property {boolean} fromServer Whether what made this snapshot came from the server (a
 *   push, an ack, a conflict resolution, a delete) rather than a local or other-tab edit.
 *
 * @typedef {object} DatasetState What a store keeps per (identity, owner, dataset).
 * @property {number} syncCount The highest dataset sync count seen from the server.
 * @property {Record<string, LocalRecord>} records
 *
 * @typedef {object} StoreRef
 * @property {string} identity
 * @property {string} owner
 * @property {string} name
 *
 * @typedef {object} TandemStore The offline cache. Implement `load` and `save` to bring your
 *   own; `list` and `remove` too for `client.cachedDatasets()` and `client.wipe()`.
 * @property {(ref: StoreRef) => Promise<DatasetState | null | undefined>} load
 * @property {(ref: StoreRef, state: DatasetState) => Promise<void>} save
 * @property {(identity: string) => Promise<Array<{ owner: string, name: string }>>} [list]
 *   The datasets cached for `identity`.
 * @property {(ref: StoreRef) => Promise<void>} [remove] Deletes one dataset's cached state.
 *
 * @typedef {object} AsyncStorageLike What `AsyncStorageStore` needs: the shape of React
 *   Native's `@react-native-async-storage/async-storage` (string keys and values).
 * @property {(key: string) => Promise<string | null | undefined>} getItem
 * @property {(key: string, value: string) => Promise<void>} setItem
 * @property {(key: string) => Promise<void>} removeItem
 * @property {() => Promise<readonly string[]>} getAllKeys
 *
 * @typedef {object} CachedDataset A dataset this device holds for the client's identity.
 * @property {string} owner
 * @property {string} name
 * @property {number} records Live records.
 * @property {number} pending Local changes not yet acknowledged.
 * @property {number} syncCount The highest sync count seen from the server.
 * @property {boolean} open Whether it is open on this client.
 *
 * @typedef {object} SyncStatus The client's sync status (`client.status`, the `status`
 *   event): one immutable object, the same until a field changes.
 * @property {boolean} connected Authenticated on a live connection.
 * @property {boolean} uploading An update is on its way to the server.
 * @property {number} pending Unacknowledged local changes (`client.pending`).
 * @property {number | null} lastSyncedAt When the server last confirmed this device's copy
 *   of a dataset (an ack, a subscription's snapshot, a push), ms since the epoch.
 * @property {boolean} hasSynced `lastSyncedAt !== null`: the client has synced at least once.
 * @property {TandemError | null} lastError The last error reported (client or dataset
 *   `error` event, or what failed the client); cleared by the next ack or connection.
 *
 * @typedef {{ type: 'keepLocal' } | { type: 'takeRemote' } | { type: 'merge', value: string | null }} ResolutionValue
 *
 * @typedef {object} ConflictCase
 * @property {string} key
 * @property {LocalRecord} local The local, unacknowledged change.
 * @property {ServerRecord | null} server The server's record (`null`: no record; a
 *   tombstone has `value: null`).
 * @property {Dataset} dataset
 *
 * @typedef {(c: ConflictCase) => ResolutionValue | 'keepLocal' | 'takeRemote' | Promise<ResolutionValue | 'keepLocal' | 'takeRemote'>} ConflictHandler
 *
 * @typedef {object} TokenRequest
 * @property {'connect' | 'refresh'} reason
 * @property {string | null} identity
 *
 * @typedef {string | ((req: TokenRequest) => string | Promise<string>)} TokenProvider
 *
 * @typedef {object} ClientOptions
 * @property {string} [identity] The user the tokens name. Needed to open datasets before the
 *   first token arrives; otherwise it is read from the token's `sub`.
 * @property {any} [WebSocket] A WebSocket constructor (default: `globalThis.WebSocket`).
 * @property {TandemStore} [store] Default: `IndexedDBStore` in browsers, `MemoryStore` elsewhere.
 * @property {string} [deviceId] Sent with every update; default: a random id.
 * @property {{ initialMs?: number, maxMs?: number }} [backoff] Default 100 ms to 10 s.
 * @property {number} [maxSyncRetries] Retries after conflicts before `sync()` gives up (default 3).
 * @property {ConflictHandler | 'keepLocal' | 'takeRemote' | 'latestDeviceTime'} [conflictHandler]
 *   The default for datasets opened by this client (default `latestDeviceTime`).
 * @property {boolean} [autoSync] Sync after each local write when online (default false).
 * @property {number} [autoSyncDelayMs] Debounce for `autoSync` (default 50 ms).
 * @property {number} [requestTimeoutMs] A reply later than this drops the connection (default 30 s).
 * @property {number} [pingIntervalMs] Heartbeat period; 0 disables it (default 25 s).
 * @property {number} [authTimeoutMs] Time to get `ready` after connecting (default 10 s).
 * @property {boolean} [watchNetwork] Follow the browser's online/offline events (default true).
 * @property {boolean} [crossTab] Share local edits with this user's other tabs over a
 *   BroadcastChannel (default: true with the IndexedDBStore where BroadcastChannel exists).
 * @property {DatasetDeletedHandler} [onDatasetDeleted] What a remote delete does to the local
 *   copy (default `keepPending`); per dataset in `open()` too.
 * @property {string[]} [features] Protocol features to ask for (docs/PROTOCOL.md §1):
 *   `delta` (pushes carry only the changed records) and `lean` (records leave out fields the
 *   frame says). Default: both; `[]` gets whole-dataset pushes in the full encoding.
 *
 * @typedef {object} OpenOptions
 * @property {string} [owner] Another identity's dataset (shared with you); default: yours.
 * @property {ConflictHandler | 'keepLocal' | 'takeRemote' | 'latestDeviceTime'} [conflictHandler]
 * @property {boolean} [autoSync]
 * @property {number} [autoSyncDelayMs]
 * @property {DatasetDeletedHandler} [onDatasetDeleted]
 *
 * @typedef {object} SyncOutcome
 * @property {number} syncCount The dataset sync count after the sync.
 * @property {number} pushed Records the server acknowledged.
 * @property {number} conflicts Conflicts the handler resolved on the way.
 * @property {string[]} setAside Keys whose changes are set aside (refused for good), not sent.
 */

/**
 * One commit of a dataset's history (docs/PROTOCOL.md §3, `history`).
 * @typedef {object} HistoryEntry
 * @property {number} id The commit log entry's id; pages go by it.
 * @property {'update' | 'delete' | 'grant' | 'revoke' | 'merge'} kind
 * @property {number} syncCount After an update, delete or merge; the current one at a grant or revoke.
 * @property {string} actor
 * @property {string} [deviceId]
 * @property {number} time Server time, ms since the Unix epoch.
 * @property {string[]} [keys] The keys an update, delete or merge changed.
 * @property {string} [grantee] For a grant or revoke.
 * @property {'read' | 'write'} [access] The access a grant gave.
 */

/**
 * @typedef {object} HistoryPage
 * @property {number} syncCount The dataset's current sync count.
 * @property {HistoryEntry[]} entries Newest first.
 * @property {number | null} next Pass as `before` for the next (older) page; `null` on the last one.
 */

// ---------------------------------------------------------------------------------------
// Errors

/** An error from the server (its stable `code`) or from the SDK. */
export class TandemError extends Error {
  /**
   * @param {string} code `bad_request`, `unauthorized`, `forbidden`, `not_found`,
   *   `limit_exceeded`, `too_large`, `rate_limited`, `unavailable`, `internal`, `rejected`,
   *   `history_unavailable` (from the server), or
   *   `offline`, `disconnected`, `timeout`, `conflict`, `revoked`, `closed` (from the SDK).
   * @param {string} message
   * @param {{ limit?: string, max?: number, keys?: string[], key?: string, closeCode?: number, server?: boolean }} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'TandemError';
    /** @type {string} */
    this.code = code;
    /** Which limit, for `limit_exceeded` and `too_large`. */
    this.limit = extra.limit;
    /** That limit's configured value. */
    this.max = extra.max;
    /** For `conflict`: the keys still unresolved. */
    this.keys = extra.keys;
    /** For a change refused for good and set aside (or refused before it was queued): its key. */
    this.key = extra.key;
    /** For `closed`: the WebSocket close code. */
    this.closeCode = extra.closeCode;
    /** True when the server answered with this error (as opposed to a connection fault). */
    this.server = extra.server ?? false;
  }
}

// ---------------------------------------------------------------------------------------
// Conflict resolution

/** Resolutions a conflict handler returns. */
export const Resolution = Object.freeze({
  /** Write the local value over the server's (retried on top of the server's version). */
  keepLocal: () => /** @type {ResolutionValue} */ ({ type: 'keepLocal' }),
  /** Drop the local change and take the server's record. */
  takeRemote: () => /** @type {ResolutionValue} */ ({ type: 'takeRemote' }),
  /** Write this value instead (`null` removes the key), on top of the server's version. */
  merge: (/** @type {string | null} */ value) => /** @type {ResolutionValue} */ ({ type: 'merge', value }),
});

/** The built-in conflict handlers. */
export const ConflictHandlers = Object.freeze({
  /** The local change wins. */
  keepLocal: /** @type {ConflictHandler} */ (() => Resolution.keepLocal()),
  /** The server's record wins; the local change is dropped. */
  takeRemote: /** @type {ConflictHandler} */ (() => Resolution.takeRemote()),
  /**
   * The change with the later device time wins (the server's `deviceLastModified`, or its
   * `lastModified` when the writer sent none). Ties keep the server's.
   * @type {ConflictHandler}
   */
  latestDeviceTime: (c) => {
    const local = c.local.deviceLastModified ?? -Infinity;
    const server = c.server ? c.server.deviceLastModified ?? c.server.lastModified : -Infinity;
    return local > server ? Resolution.keepLocal() : Resolution.takeRemote();
  },
});

/** @returns {ConflictHandler} */
function handlerFrom(/** @type {any} */ h) {
  if (typeof h === 'function') return h;
  if (h === undefined || h === null) return ConflictHandlers.latestDeviceTime;
  if (typeof h === 'string' && Object.hasOwn(ConflictHandlers, h)) {
    return /** @type {any} */ (ConflictHandlers)[h];
  }
  throw new TypeError(`unknown conflict handler ${String(h)}: use keepLocal, takeRemote, latestDeviceTime or a function`);
}

/** @returns {ResolutionValue} */
function normaliseResolution(/** @type {any} */ r) {
  if (r === 'keepLocal' || r === 'takeRemote') return { type: r };
  if (r && (r.type === 'keepLocal' || r.type === 'takeRemote')) return { type: r.type };
  if (r && r.type === 'merge' && (typeof r.value === 'string' || r.value === null)) {
    return { type: 'merge', value: r.value };
  }
  throw new TypeError('a conflict handler must return Resolution.keepLocal(), Resolution.takeRemote() or Resolution.merge(value)');
}

// ---------------------------------------------------------------------------------------
// A tiny event emitter (browsers and Node alike)

class Emitter {
  /** @type {Map<string, Set<Function>>} */
  #listeners = new Map();

  /**
   * Adds a listener; returns a function that removes it.
   * @param {string} type
   * @param {(...args: any[]) => void} fn
   * @returns {() => void}
   */
  on(type, fn) {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  /** @param {string} type @param {(...args: any[]) => void} fn */
  off(type, fn) {
    this.#listeners.get(type)?.delete(fn);
  }

  /**
   * Calls `fn` once, at the next `type` event.
   * @param {string} type
   * @param {(...args: any[]) => void} fn
   * @returns {() => void}
   */
  once(type, fn) {
    const off = this.on(type, (...args) => {
      off();
      fn(...args);
    });
    return off;
  }

  /** @protected @param {string} type @param {...any} args */
  emit(type, ...args) {
    const set = this.#listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the SDK's state machine.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Stores

/** @returns {DatasetState} */
function emptyState() {
  return { syncCount: 0, records: Object.create(null) };
}

/** A clean local record holding the server's record `r`.
 * @param {ServerRecord} r @param {number} version @returns {LocalRecord} */
function fromServer(r, version) {
  return {
    value: r.value ?? null,
    syncCount: r.syncCount,
    dirty: false,
    deviceLastModified: r.deviceLastModified,
    version,
    lastModified: r.lastModified,
    lastModifiedBy: r.lastModifiedBy,
    deviceId: r.deviceId,
  };
}

/** Takes who, when and from which device the server's record `r` was written, for a local
 * record whose value is the server's (the same content, e.g. our own acknowledged edit).
 * @param {LocalRecord} local @param {ServerRecord} r */
function takeMetadata(local, r) {
  local.deviceLastModified = r.deviceLastModified ?? local.deviceLastModified;
  local.lastModified = r.lastModified;
  local.lastModifiedBy = r.lastModifiedBy;
  local.deviceId = r.deviceId;
}

/** A copy that shares nothing with the SDK's live state. */
function cloneState(/** @type {DatasetState} */ s) {
  const records = Object.create(null);
  for (const [k, r] of Object.entries(s.records)) records[k] = { ...r };
  return { syncCount: s.syncCount, records };
}

/** Keeps dataset state in memory (the default outside browsers). Share one instance between
 * clients to keep a cache across client restarts in one process. */
export class MemoryStore {
  /** @type {Map<string, DatasetState>} */
  #data = new Map();

  /** @param {StoreRef} ref */
  async load(ref) {
    const s = this.#data.get(refKey(ref));
    return s ? cloneState(s) : null;
  }

  /** @param {StoreRef} ref @param {DatasetState} state */
  async save(ref, state) {
    this.#data.set(refKey(ref), cloneState(state));
  }

  /** @param {string} identity @returns {Promise<Array<{ owner: string, name: string }>>} */
  async list(identity) {
    /** @type {Array<{ owner: string, name: string }>} */ const out = [];
    for (const k of this.#data.keys()) {
      const [id, owner, name] = JSON.parse(k);
      if (id === identity) out.push({ owner, name });
    }
    return out;
  }

  /** @param {StoreRef} ref */
  async remove(ref) {
    this.#data.delete(refKey(ref));
  }
}

function refKey(/** @type {StoreRef} */ ref) {
  return JSON.stringify([ref.identity, ref.owner, ref.name]);
}

/** Keeps dataset state in IndexedDB (the default in browsers): one object per
 * (identity, owner, dataset) in the object store `datasets` of database `tandem`. */
export class IndexedDBStore {
  #name;
  #idb;
  /** @type {Promise<any> | null} */
  #db = null;

  /** @param {{ name?: string, indexedDB?: any }} [options] */
  constructor(options = {}) {
    this.#name = options.name ?? 'tandem';
    this.name = this.#name;
    this.#idb = options.indexedDB ?? globalThis.indexedDB;
    if (!this.#idb) throw new TandemError('bad_request', 'IndexedDB is not available here');
  }

  #open() {
    if (!this.#db) {
      this.#db = new Promise((resolve, reject) => {
        const req = this.#idb.open(this.#name, 1);
        req.onupgradeneeded = () => req.result.createObjectStore('datasets');
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error);
      });
      this.#db.catch(() => (this.#db = null));
    }
    return this.#db;
  }

  /** @param {StoreRef} ref @returns {Promise<DatasetState | null>} */
  async load(ref) {
    const db = await this.#open();
    return new Promise((resolve, reject) => {
      const req = db.transaction('datasets', 'readonly').objectStore('datasets').get([ref.identity, ref.owner, ref.name]);
      req.onsuccess = () => resolve(req.result ?? null);
      req.onerror = () => reject(req.error);
    });
  }

  /** @param {StoreRef} ref @param {DatasetState} state @returns {Promise<void>} */
  async save(ref, state) {
    const db = await this.#open();
    return new Promise((resolve, reject) => {
      const tx = db.transaction('datasets', 'readwrite');
      tx.objectStore('datasets').put(state, [ref.identity, ref.owner, ref.name]);
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
    });
  }

  /** @param {string} identity @returns {Promise<Array<{ owner: string, name: string }>>} */
  async list(identity) {
    const db = await this.#open();
    return new Promise((resolve, reject) => {
      // Array keys sort element by element, and an array sorts after every string: this
      // range holds exactly the keys [identity, owner, name].
      const range = IDBKeyRange.bound([identity], [identity, []]);
      const req = db.transaction('datasets', 'readonly').objectStore('datasets').getAllKeys(range);
      req.onsuccess = () => resolve(req.result.map((/** @type {any} */ k) => ({ owner: k[1], name: k[2] })));
      req.onerror = () => reject(req.error);
    });
  }

  /** @param {StoreRef} ref @returns {Promise<void>} */
  async remove(ref) {
    const db = await this.#open();
    return new Promise((resolve, reject) => {
      const tx = db.transaction('datasets', 'readwrite');
      tx.objectStore('datasets').delete([ref.identity, ref.owner, ref.name]);
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
    });
  }
}

/** Keeps dataset state in an AsyncStorage-shaped key-value store: React Native's
 * `@react-native-async-storage/async-storage`, or anything with its four methods. One JSON
 * string per (identity, owner, dataset), under `prefix` + `JSON.stringify([identity, owner, name])`. */
export class AsyncStorageStore {
  #storage;
  #prefix;

  /** @param {AsyncStorageLike} storage @param {{ prefix?: string }} [options] */
  constructor(storage, options = {}) {
    for (const m of ['getItem', 'setItem', 'removeItem', 'getAllKeys']) {
      if (typeof (/** @type {any} */ (storage)?.[m]) !== 'function') {
        throw new TandemError('bad_request', `AsyncStorageStore needs an AsyncStorage-like object with ${m}()`);
      }
    }
    this.#storage = storage;
    this.#prefix = options.prefix ?? 'tandem:';
  }

  /** @param {StoreRef} ref */
  #key(ref) {
    return this.#prefix + refKey(ref);
  }

  /** @param {StoreRef} ref @returns {Promise<DatasetState | null>} */
  async load(ref) {
    const text = await this.#storage.getItem(this.#key(ref));
    return text ? JSON.parse(text) : null;
  }

  /** @param {StoreRef} ref @param {DatasetState} state @returns {Promise<void>} */
  async save(ref, state) {
    await this.#storage.setItem(this.#key(ref), JSON.stringify(state));
  }

  /** @param {string} identity @returns {Promise<Array<{ owner: string, name: string }>>} */
  async list(identity) {
    /** @type {Array<{ owner: string, name: string }>} */ const out = [];
    for (const k of await this.#storage.getAllKeys()) {
      if (!k.startsWith(this.#prefix)) continue;
      try {
        const [id, owner, name] = JSON.parse(k.slice(this.#prefix.length));
        if (id === identity && typeof owner === 'string' && typeof name === 'string') out.push({ owner, name });
      } catch {
        // another library's key under the same prefix
      }
    }
    return out;
  }

  /** @param {StoreRef} ref @returns {Promise<void>} */
  async remove(ref) {
    await this.#storage.removeItem(this.#key(ref));
  }
}

// ---------------------------------------------------------------------------------------
// Helpers

/** Whether a close code means "reconnect" (docs/PROTOCOL.md §9). */
export function shouldReconnect(/** @type {number} */ code) {
  if (code >= 4000 && code <= 4499) return true;
  if (code >= 4500 && code <= 4999) return false;
  return ![1000, 1002, 1003, 1007, 1008, 1009].includes(code);
}

/** Reads a JWT's `sub` without verifying it (the server verifies). */
function tokenSubject(/** @type {string} */ token) {
  try {
    const part = token.split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (part.length % 4)) % 4);
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const sub = JSON.parse(new TextDecoder().decode(bytes)).sub;
    return typeof sub === 'string' ? sub : null;
  } catch {
    return null;
  }
}

/** `http(s)://host[:port]` becomes `ws(s)://host[:port]/v1/sync`; ws URLs pass unchanged. */
function syncUrl(/** @type {string} */ url) {
  const u = new URL(url);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.pathname === '/' || u.pathname === '') u.pathname = '/v1/sync';
  return u.toString();
}

function randomId() {
  const bytes = new Uint8Array(6);
  globalThis.crypto.getRandomValues(bytes);
  return 'js-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** setTimeout that does not keep a Node process alive. */
function timer(/** @type {() => void} */ fn, /** @type {number} */ ms) {
  const t = setTimeout(fn, ms);
  /** @type {any} */ (t)?.unref?.();
  return t;
}

function deferred() {
  /** @type {(v?: any) => void} */ let resolve = () => {};
  /** @type {(e: any) => void} */ let reject = () => {};
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** UTF-8 bytes of a string, as the server counts `max_dataset_bytes` and frame sizes. */
function utf8Length(/** @type {string} */ s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4; // a surrogate pair is one 4-byte scalar value
      i++;
    } else n += 3;
  }
  return n;
}

/** Unicode scalar values in a string, as the server counts `max_key_length`. */
function scalarLength(/** @type {string} */ s) {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

/** `ready.limits` names (camelCase) by the `limit` an error names. */
const LIMIT_NAMES = Object.freeze({
  max_key_length: 'maxKeyLength',
  max_patches: 'maxPatches',
  max_records: 'maxRecords',
  max_dataset_bytes: 'maxDatasetBytes',
  max_device_id_length: 'maxDeviceIdLength',
  max_frame_bytes: 'maxFrameBytes',
});

/** What the server's refusal of one key's change means: set it aside, or not a key's fault. */
function refusedForGood(/** @type {any} */ e) {
  if (!(e instanceof TandemError) || !e.server) return false;
  if (e.code === 'bad_request') return true;
  if (e.code === 'too_large') return e.limit !== 'max_device_id_length' && e.limit !== 'max_frame_bytes';
  // max_records: the dataset has no room for one more key. max_datasets (the owner has too
  // many datasets) and max_patches are not about a key.
  return e.code === 'limit_exceeded' && e.limit === 'max_records';
}

/** @returns {(c: DatasetDeletedCase) => DeletedPolicy} */
function deletedPolicyFrom(/** @type {any} */ p) {
  if (typeof p === 'function') return p;
  if (p === undefined || p === null) return () => 'keepPending';
  if (p === 'keepPending' || p === 'keepAll' || p === 'drop') return () => p;
  throw new TypeError(`unknown onDatasetDeleted policy ${String(p)}: use keepPending, keepAll, drop or a function`);
}

/** Whether two snapshots show the same thing (their versions and causes aside). */
function sameSnapshot(/** @type {DatasetSnapshot} */ a, /** @type {DatasetSnapshot} */ b) {
  if (a.syncCount !== b.syncCount || a.pending !== b.pending || a.records.size !== b.records.size) return false;
  for (const [k, v] of a.records) if (b.records.get(k) !== v) return false;
  return true;
}

/** The features asked for by default (docs/PROTOCOL.md §1). */
export const DEFAULT_FEATURES = Object.freeze(['delta', 'lean']);

/**
 * Fills in what the lean encoding left out of a frame's records (docs/PROTOCOL.md §3): a
 * missing `syncCount` is the frame's, a missing `lastModifiedBy` is the dataset's owner. Full
 * records pass unchanged, so this runs on every frame whatever the session's features.
 * @param {any} frame
 */
function expandLean(frame) {
  const fill = (/** @type {any} */ r) => {
    if (!r || typeof r !== 'object') return;
    if (r.syncCount === undefined) r.syncCount = frame.syncCount;
    if (r.lastModifiedBy === undefined) r.lastModifiedBy = frame.dataset?.owner;
  };
  if (typeof frame.syncCount !== 'number' || !frame.dataset) return;
  if (Array.isArray(frame.records)) frame.records.forEach(fill);
  if (frame.type === 'conflict' && Array.isArray(frame.conflicts)) {
    for (const c of frame.conflicts) fill(c?.server);
  }
}

/** A dataset as a request names it: a name of the caller's, or `{ owner, name }`. */
function datasetRef(/** @type {string | { owner?: string, name: string }} */ dataset) {
  if (typeof dataset === 'string') return { name: dataset };
  return dataset.owner ? { owner: dataset.owner, name: dataset.name } : { name: dataset.name };
}

function datasetKey(/** @type {string} */ owner, /** @type {string} */ name) {
  return `${owner}\u0000${name}`;
}

function isNetworkError(/** @type {any} */ e) {
  return e instanceof TandemError && ['offline', 'disconnected', 'timeout', 'closed'].includes(e.code);
}

/** A server refusal that may succeed if simply tried again later (docs/PROTOCOL.md §8.1). */
function isRetriable(/** @type {any} */ e) {
  return e instanceof TandemError && !!e.server && ['rate_limited', 'unavailable', 'internal'].includes(e.code);
}

// ---------------------------------------------------------------------------------------
// The client

/**
 * One connection to a Tandem server that stays up, and the datasets opened through it.
 *
 * Events: `state` (ConnectionState), `online`, `offline`, `connecting`, `failed` (error),
 * `closed`, `ready` ({identity, session, expiresAt}), `error` (TandemError).
 */
export class TandemClient extends Emitter {
  /**
   * Starts a client and returns it at once; it connects in the background. Local reads and
   * writes work whether or not it is online.
   * @param {string} url `ws(s)://host:port/v1/sync` (or `http(s)://host:port`).
   * @param {TokenProvider} tokenProvider A token, or a function returning one (or a Promise
   *   of one). It is called for every connection and before the token expires.
   * @param {ClientOptions} [options]
   */
  static connect(url, tokenProvider, options = {}) {
    const client = new TandemClient(url, tokenProvider, options);
    client.#start();
    return client;
  }

  #url;
  /** @type {(req: TokenRequest) => Promise<string>} */
  #tokenProvider;
  #WS;
  #store;
  #deviceId;
  #backoffInitial;
  #backoffMax;
  #maxSyncRetries;
  #defaultHandler;
  #autoSync;
  #autoSyncDelay;
  #requestTimeout;
  #pingInterval;
  #authTimeout;
  #watchNetwork;
  /** @type {string[]} */
  #wantFeatures;
  /** What the server turned on for the current session (`ready.features`). @type {string[]} */
  #features = [];
  /** The server's write limits: from `ready.limits`, or learnt from errors; kept offline.
   * @type {WriteLimits} */
  #limits = {};
  #deletedPolicy;
  /** Pending changes per dataset opened on this client, closed ones included. @type {Map<string, number>} */
  #pendingOf = new Map();

  /** @type {string | null} */
  #identity;
  #identityKnown = deferred();
  /** @type {ConnectionState} */
  #state = 'offline';
  /** @type {{ ws: any, ready: boolean, closedByUs: boolean, timers: any[] } | null} */
  #conn = null;
  #nextId = 1;
  /** @type {Map<number, { resolve: (f: any) => void, reject: (e: any) => void, timer: any }>} */
  #requests = new Map();
  /** @type {Map<string, Dataset>} */
  #datasets = new Map();
  /** @type {Map<string, Promise<Dataset>>} */
  #opening = new Map();
  #attempt = 0;
  /** @type {any} */
  #retryTimer = null;
  /** @type {any} */
  #refreshTimer = null;
  /** @type {any} */
  #pingTimer = null;
  #stopped = true;
  /** @type {TandemError | null} */
  #lastError = null;
  /** @type {{ session: string, expiresAt: number } | null} */
  #session = null;
  /** @type {(() => void) | null} */
  #unwatchNetwork = null;
  /** Local edits shared with this user's other tabs (see `crossTab`). @type {any} */
  #tabs = null;
  /** `pause()` was called: no connection until `resume()`. */
  #paused = false;
  /** `wipe()` ran: the client is signed out, and opens nothing any more. */
  #wiped = false;
  /** The protocol version of the last `ready` (null before one). @type {number | null} */
  #protocol = null;
  /** Updates on their way to the server, across datasets. */
  #uploading = 0;
  /** @type {number | null} */
  #lastSyncedAt = null;
  /** @type {TandemError | null} */
  #statusError = null;
  /** The current status object, and whether a `status` event is due. @type {SyncStatus | null} */
  #status = null;
  #statusScheduled = false;
  /** Rejects the `waitForPendingWrites` calls still waiting when the client closes. @type {Set<(e: TandemError) => void>} */
  #waiting = new Set();

  /**
   * Use `TandemClient.connect`, which also starts the connection.
   * @param {string} url
   * @param {TokenProvider} tokenProvider
   * @param {ClientOptions} [options]
   */
  constructor(url, tokenProvider, options = {}) {
    super();
    this.#url = syncUrl(url);
    this.#tokenProvider =
      typeof tokenProvider === 'function'
        ? async (req) => tokenProvider(req)
        : async () => /** @type {string} */ (tokenProvider);
    this.#WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WS !== 'function') {
      throw new TandemError(
        'bad_request',
        "no WebSocket implementation: on Node 20 pass { WebSocket } (e.g. from the 'ws' package) or run with --experimental-websocket",
      );
    }
    this.#store =
      options.store ?? (typeof globalThis.indexedDB !== 'undefined' ? new IndexedDBStore() : new MemoryStore());
    this.#deviceId = options.deviceId ?? randomId();
    this.#backoffInitial = options.backoff?.initialMs ?? 100;
    this.#backoffMax = options.backoff?.maxMs ?? 10_000;
    this.#maxSyncRetries = options.maxSyncRetries ?? 3;
    this.#defaultHandler = handlerFrom(options.conflictHandler);
    this.#deletedPolicy = deletedPolicyFrom(options.onDatasetDeleted);
    this.#autoSync = options.autoSync ?? false;
    this.#autoSyncDelay = options.autoSyncDelayMs ?? 50;
    this.#requestTimeout = options.requestTimeoutMs ?? 30_000;
    this.#pingInterval = options.pingIntervalMs ?? 25_000;
    this.#authTimeout = options.authTimeoutMs ?? 10_000;
    this.#watchNetwork = options.watchNetwork ?? true;
    this.#wantFeatures = [...(options.features ?? DEFAULT_FEATURES)];
    this.#identity = options.identity ?? null;
    if (this.#identity) this.#identityKnown.resolve(this.#identity);
    const crossTab = options.crossTab ?? (this.#store instanceof IndexedDBStore && typeof globalThis.BroadcastChannel === 'function');
    if (crossTab) {
      // Tabs of one browser profile share the IndexedDB cache; each also tells the others
      // of its local edits, so none of them saves a cache state that lacks another's edit.
      this.#tabs = new globalThis.BroadcastChannel(`tandem-cache:${this.#store instanceof IndexedDBStore ? this.#store.name : 'custom'}`);
      this.#tabs.onmessage = (/** @type {any} */ ev) => this.#onTabMessage(ev.data);
    }
    this.#identityKnown.promise.catch(() => {}); // rejected only by close(); open() reports it
    void this.status; // the first status object: events compare against it
  }

  /** The user this client acts as (null until known). */
  get identity() {
    return this.#identity;
  }

  /** `connecting`, `online`, `offline` (reconnecting with backoff), `failed` (the server
   * refused this client for good) or `closed` (by `close()`). */
  get state() {
    return this.#state;
  }

  /** True while authenticated on a live connection. */
  get online() {
    return this.#state === 'online';
  }

  /** The protocol features the server turned on for this session (`ready.features`, e.g.
   * `['delta', 'lean']`); empty while offline or when none were asked for. */
  get features() {
    return [...this.#features];
  }

  /** The device id sent with updates. */
  get deviceId() {
    return this.#deviceId;
  }

  /** The error that put the client in `failed`, if any. */
  get lastError() {
    return this.#lastError;
  }

  /** The server's session id and the token's expiry (ms), while online. */
  get session() {
    return this.#session ? { ...this.#session } : null;
  }

  /** Unsynchronised local changes across the datasets opened on this client, closed ones
   * included (their changes are still in the cache, unsent). */
  get pending() {
    let n = 0;
    for (const v of this.#pendingOf.values()) n += v;
    return n;
  }

  /** The server's limits on an update (`ready.limits`), as last known; a limit the server
   * did not announce is learnt from the first error that names it. Empty until then.
   * @returns {WriteLimits} */
  get limits() {
    return { ...this.#limits };
  }

  /** The datasets open on this client. */
  get datasets() {
    return [...this.#datasets.values()];
  }

  /** The protocol version the server stated in its last `ready` (null before one). */
  get protocol() {
    return this.#protocol;
  }

  /** Whether `pause()` holds the network off. */
  get paused() {
    return this.#paused;
  }

  /**
   * The sync status, `{connected, uploading, pending, lastSyncedAt, hasSynced, lastError}`:
   * an immutable object, the same one until a field changes (fit for React's
   * `useSyncExternalStore` with `onStatus`). Every change is one `status` event.
   * @returns {SyncStatus}
   */
  get status() {
    const next = {
      connected: this.#state === 'online',
      uploading: this.#uploading > 0,
      pending: this.pending,
      lastSyncedAt: this.#lastSyncedAt,
      hasSynced: this.#lastSyncedAt !== null,
      lastError: this.#statusError,
    };
    const cur = this.#status;
    if (!cur || Object.keys(next).some((k) => /** @type {any} */ (next)[k] !== /** @type {any} */ (cur)[k])) {
      this.#status = Object.freeze(next);
    }
    return /** @type {SyncStatus} */ (this.#status);
  }

  /**
   * Calls `listener` with the current status now, then with each new one (a `status`
   * event); returns the function that stops it.
   * @param {(status: SyncStatus) => void} listener
   * @returns {() => void}
   */
  onStatus(listener) {
    listener(this.status);
    return this.on('status', listener);
  }

  /**
   * Stops using the network: drops the connection and does not reconnect (nor on the
   * browser's `online` event) until `resume()`. Local reads and writes go on; writes stay
   * pending.
   */
  pause() {
    if (this.#state === 'closed') throw new TandemError('closed', 'client closed');
    this.#paused = true;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    if (this.#conn) this.#dropConnection(1000, 'client paused', false);
    if (this.#state !== 'failed') this.#setState('offline');
  }

  /** Uses the network again after `pause()`: connects now; pending writes are sent once online. */
  resume() {
    if (this.#state === 'closed') throw new TandemError('closed', 'client closed');
    if (!this.#paused) return;
    this.#paused = false;
    if (this.#stopped) return; // failed: `reconnect()` restarts it
    this.#attempt = 0;
    this.#connect();
  }

  /**
   * Resolves when every local change pending now in the open datasets is acknowledged by
   * the server (or dropped: discarded, reverted, replaced by the server's version in a
   * conflict), however many reconnects that takes. Changes made later are not waited for;
   * nor are those of closed datasets (sent when they are opened again). It does not send
   * anything itself: use `flush()`, auto-sync or `sync()`. Rejects with the change's error
   * when one of them is set aside (the server will never take it), with `closed` when the
   * client or the dataset closes first, with the client's error when it fails (or has
   * failed: `reconnect()` first), and with `timeout` after `timeoutMs` (default: none).
   * @param {{ timeoutMs?: number }} [options]
   * @returns {Promise<void>}
   */
  waitForPendingWrites(options = {}) {
    if (this.#state === 'closed') return Promise.reject(new TandemError('closed', 'client closed'));
    const failure = () => this.#lastError ?? new TandemError('closed', 'the client failed');
    const anything = this.datasets.some((ds) => ds.pending > 0);
    if (this.#state === 'failed' && anything) return Promise.reject(failure());
    const waits = [...this.#datasets.values()].map((ds) => ds._waitForPending());
    return new Promise((resolve, reject) => {
      /** @type {any} */ let t = null;
      const offFailed = this.on('failed', () => done(failure()));
      const done = (/** @type {any} */ err) => {
        clearTimeout(t);
        offFailed();
        this.#waiting.delete(done);
        // A wait that ended early (timeout, failure, close) must not stay registered on the
        // datasets: each would keep every later ack's version and be checked on every change.
        for (const w of waits) w.cancel();
        err ? reject(err) : resolve();
      };
      this.#waiting.add(done);
      if (options.timeoutMs !== undefined) {
        t = timer(() => done(new TandemError('timeout', `pending writes not acknowledged within ${options.timeoutMs} ms`)), options.timeoutMs);
      }
      Promise.all(waits.map((w) => w.promise)).then(() => done(null), done);
    });
  }

  /**
   * Sends the pending changes of every open dataset now (when online; otherwise at the
   * reconnect) and resolves when they are acknowledged, as `waitForPendingWrites`. Rejects
   * with a sync's error other than a lost connection (e.g. `conflict`, `rejected`).
   * @param {{ timeoutMs?: number }} [options]
   * @returns {Promise<void>}
   */
  async flush(options = {}) {
    const wait = this.waitForPendingWrites(options);
    wait.catch(() => {}); // awaited below, unless a sync fails first
    if (this.#state === 'online') {
      await Promise.all(
        this.datasets
          .filter((ds) => ds.pending > 0 && !ds.revoked)
          .map((ds) =>
            ds.sync().catch((e) => {
              if (!isNetworkError(e)) throw e;
            }),
          ),
      );
    }
    await wait;
  }

  /**
   * The datasets this device holds for the client's identity (in the store, or open), with
   * their pending counts: what a sign-out would lose. Needs a store with `list`.
   * @returns {Promise<CachedDataset[]>}
   */
  async cachedDatasets() {
    const identity = this.#identity;
    if (!identity) throw new TandemError('bad_request', 'the identity is not known yet: pass `identity` or wait until online');
    const store = /** @type {TandemStore} */ (this.#store);
    if (typeof store.list !== 'function') throw new TandemError('bad_request', 'this store cannot list its datasets (it has no list method)');
    // Open datasets' saves first, so the store holds what they hold.
    await Promise.allSettled(this.datasets.map((ds) => ds._flush()));
    /** @type {Map<string, CachedDataset>} */ const out = new Map();
    for (const ref of await store.list(identity)) {
      const key = datasetKey(ref.owner, ref.name);
      if (this.#datasets.has(key)) continue;
      const state = await store.load({ identity, owner: ref.owner, name: ref.name });
      if (!state) continue;
      const recs = Object.values(state.records ?? {});
      out.set(key, {
        owner: ref.owner,
        name: ref.name,
        records: recs.filter((r) => r.value !== null).length,
        pending: recs.filter((r) => r.dirty).length,
        syncCount: state.syncCount ?? 0,
        open: false,
      });
    }
    for (const [key, ds] of this.#datasets) {
      out.set(key, { owner: ds.owner, name: ds.name, records: ds.records().size, pending: ds.pending, syncCount: ds.syncCount, open: true });
    }
    return [...out.values()].sort((a, b) => (a.owner === b.owner ? (a.name < b.name ? -1 : 1) : a.owner < b.owner ? -1 : 1));
  }

  /**
   * Sign-out: deletes this identity's local data, every dataset cached for it in the store
   * and the open handles' state in memory, and closes the client (make a new one for the
   * next user). Refuses with `pending_writes` (nothing deleted, the client left running)
   * while local changes are not acknowledged, in open, closed or never-opened cached
   * datasets, unless `force: true`; the error's `keys` name those datasets (`owner/name`).
   * Needs a store with `list` and `remove`. Resolves with the datasets deleted.
   * @param {{ force?: boolean }} [options]
   * @returns {Promise<Array<{ owner: string, name: string }>>}
   */
  async wipe(options = {}) {
    const identity = this.#identity;
    if (!identity) throw new TandemError('bad_request', 'the identity is not known yet: pass `identity` or wait until online');
    const store = /** @type {TandemStore} */ (this.#store);
    if (typeof store.list !== 'function' || typeof store.remove !== 'function') {
      throw new TandemError('bad_request', 'this store cannot delete its datasets (it needs list and remove methods)');
    }
    if (!options.force) {
      const cached = await this.cachedDatasets();
      // Open datasets counted again now, in case a write came in while the store was read.
      const unsent = cached.map((c) => (c.open ? { ...c, pending: this.#datasets.get(datasetKey(c.owner, c.name))?.pending ?? 0 } : c)).filter((c) => c.pending > 0);
      if (unsent.length) {
        const n = unsent.reduce((sum, c) => sum + c.pending, 0);
        const names = unsent.map((c) => `${c.owner}/${c.name}`);
        throw new TandemError('pending_writes', `${n} local change${n === 1 ? '' : 's'} not yet synced (${names.join(', ')}): sync them first (flush()), or wipe({ force: true }) to lose them`, { keys: names });
      }
    }
    // Nothing may write from here on: the open datasets are emptied and closed before the
    // first wait, so no edit slips in between the check above and the removal below, and
    // no dataset is opened again (which would write this identity's cache anew).
    this.#wiped = true;
    const open = this.datasets;
    for (const ds of open) ds._wipe();
    await this.close();
    this.#datasets.clear();
    this.#pendingOf.clear();
    const refs = await store.list(identity);
    for (const ref of refs) await store.remove({ identity, owner: ref.owner, name: ref.name });
    this.#statusChanged();
    return refs.map((r) => ({ owner: r.owner, name: r.name }));
  }

  /**
   * Resolves when the client is online; rejects on `failed`/`closed`, or after `timeoutMs`.
   * @param {number} [timeoutMs]
   * @returns {Promise<void>}
   */
  waitOnline(timeoutMs = 10_000) {
    if (this.#state === 'online') return Promise.resolve();
    return new Promise((resolve, reject) => {
      const offs = [
        this.on('online', () => done(null)),
        this.on('failed', (e) => done(e)),
        this.on('closed', () => done(new TandemError('closed', 'client closed'))),
      ];
      const t = timer(() => done(new TandemError('timeout', `not online within ${timeoutMs} ms`)), timeoutMs);
      const done = (/** @type {any} */ err) => {
        clearTimeout(t);
        offs.forEach((off) => off());
        err ? reject(err) : resolve();
      };
    });
  }

  /**
   * Opens a dataset (creating nothing on the server until the first sync). Works offline
   * from the cache; online, it subscribes and merges the server's state. Rejects when the
   * server refuses the subscription (e.g. `forbidden`). Opening an open dataset returns the
   * same handle; naming another conflict handler than that handle's is refused with
   * `bad_request` (replace it explicitly with `dataset.setConflictHandler()`).
   * @param {string} name
   * @param {OpenOptions} [options]
   * @returns {Promise<Dataset>}
   */
  async open(name, options = {}) {
    if (typeof name !== 'string' || !/^[A-Za-z0-9_.:-]{1,128}$/.test(name)) {
      throw new TandemError('bad_request', `invalid dataset name ${JSON.stringify(name)}: 1-128 characters of [a-zA-Z0-9_.:-]`);
    }
    if (this.#wiped) throw new TandemError('closed', 'client wiped (signed out): create a new client');
    const identity = await this.#identityKnown.promise;
    if (this.#wiped) throw new TandemError('closed', 'client wiped (signed out): create a new client');
    const owner = options.owner ?? identity;
    const key = datasetKey(owner, name);
    const wanted = options.conflictHandler === undefined ? undefined : handlerFrom(options.conflictHandler);
    /** An open handle is shared; a different conflict handler for it is a mistake to say. */
    const same = (/** @type {Dataset} */ ds) => {
      if (wanted !== undefined && wanted !== ds.conflictHandler) {
        throw new TandemError('bad_request', `dataset ${owner}/${name} is already open with another conflict handler: use dataset.setConflictHandler() to replace it`);
      }
      return ds;
    };
    const existing = this.#datasets.get(key);
    if (existing) return same(existing);
    const inFlight = this.#opening.get(key);
    if (inFlight) return same(await inFlight);
    const opening = (async () => {
      const loaded = await this.#store.load({ identity, owner, name });
      const ds = new Dataset(this, this.#internals(), owner, name, loaded ?? emptyState(), {
        handler: wanted ?? this.#defaultHandler,
        autoSync: options.autoSync ?? this.#autoSync,
        autoSyncDelay: options.autoSyncDelayMs ?? this.#autoSyncDelay,
        maxRetries: this.#maxSyncRetries,
        deletedPolicy: options.onDatasetDeleted === undefined ? this.#deletedPolicy : deletedPolicyFrom(options.onDatasetDeleted),
      });
      this.#datasets.set(key, ds);
      this.#pendingOf.set(key, ds.pending);
      if (this.#state === 'online') {
        try {
          await ds.subscribe();
        } catch (e) {
          if (e instanceof TandemError && e.server) {
            this.#datasets.delete(key);
            throw e;
          }
        }
        if (ds.pending > 0) ds._backgroundSync();
      }
      return ds;
    })();
    this.#opening.set(key, opening);
    try {
      return await opening;
    } finally {
      this.#opening.delete(key);
    }
  }

  /**
   * Gives `identity` `read` or `write` access to one of your datasets.
   * @param {string} name @param {string} identity @param {'read' | 'write'} [access]
   */
  async grant(name, identity, access = 'read') {
    await this._request({ type: 'grant', dataset: { name }, identity, access });
  }

  /** Takes `identity`'s access away; its live subscriptions end at once.
   * @param {string} name @param {string} identity */
  async revoke(name, identity) {
    await this._request({ type: 'revoke', dataset: { name }, identity });
  }

  /** Deletes one of your datasets on the server; subscribers get `deleted`.
   * @param {string} name @returns {Promise<number>} the sync count the delete took */
  async deleteDataset(name) {
    const ack = await this._request({ type: 'delete_dataset', dataset: { name } });
    return ack.syncCount;
  }

  /** Your datasets and those shared with you.
   * @returns {Promise<Array<{ dataset: { owner: string, name: string }, syncCount: number, records: number, bytes: number, access: 'owner' | 'write' | 'read', lastModified: number }>>} */
  async listDatasets() {
    const reply = await this._request({ type: 'list_datasets' });
    return reply.datasets;
  }

  /**
   * A page of a dataset's commits, newest first: who, when, from which device, which keys
   * (docs/PROTOCOL.md §3, `history`). Pass the reply's `next` as `before` for the next,
   * older page; it is `null` on the last one. Needs read access.
   * @param {string | { owner?: string, name: string }} dataset a name of yours, or `{ owner, name }`
   * @param {{ before?: number, limit?: number }} [options] `limit`: default 50, at most the server's `max_history_page`
   * @returns {Promise<HistoryPage>}
   */
  async history(dataset, options = {}) {
    /** @type {any} */
    const frame = { type: 'history', dataset: datasetRef(dataset) };
    if (options.before !== undefined && options.before !== null) frame.before = options.before;
    if (options.limit !== undefined) frame.limit = options.limit;
    const reply = await this._request(frame);
    return { syncCount: reply.syncCount, entries: reply.entries, next: reply.next ?? null };
  }

  /**
   * The dataset's live records as they were right after the commit at `syncCount`, ordered
   * by key. Rejects with `history_unavailable` when the server's commit log no longer
   * reaches back that far. Needs read access.
   * @param {string | { owner?: string, name: string }} dataset
   * @param {number} syncCount
   * @returns {Promise<Array<{ key: string, value: string, syncCount: number, lastModified: number, lastModifiedBy: string, deviceId?: string, deviceLastModified?: number }>>}
   */
  async readAt(dataset, syncCount) {
    const reply = await this._request({ type: 'read_at', dataset: datasetRef(dataset), syncCount });
    return reply.records;
  }

  /**
   * Makes the dataset what it was at `syncCount` again, as one new commit from this
   * client's device (history is kept); open copies, here and elsewhere, receive it like any
   * commit. Resolves with the dataset's sync count after it (the current one when nothing
   * differed). Needs write access.
   * @param {string | { owner?: string, name: string }} dataset
   * @param {number} syncCount
   * @returns {Promise<number>}
   */
  async restore(dataset, syncCount) {
    const ack = await this._request({ type: 'restore', dataset: datasetRef(dataset), syncCount, deviceId: this.#deviceId });
    return ack.syncCount;
  }

  /** Round trip to the server; resolves with the time it took in ms. */
  async ping() {
    const t0 = Date.now();
    await this._request({ type: 'ping' });
    return Date.now() - t0;
  }

  /** Drops the current connection (if any) and connects again now, resetting the backoff.
   * Also restarts a `failed` client, e.g. after fixing its token provider. */
  reconnect() {
    if (this.#state === 'closed') throw new TandemError('closed', 'client closed');
    this.#paused = false; // an explicit "connect now"
    this.#stopped = false;
    this.#lastError = null;
    this.#attempt = 0;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    if (this.#conn) {
      this.#dropConnection(1000, 'client reconnect', true);
    } else {
      this.#connect();
    }
  }

  /** Stops reconnecting and closes the connection; open datasets keep working locally.
   * Resolves once every dataset's cache is written. */
  async close() {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    this.#unwatchNetwork?.();
    this.#unwatchNetwork = null;
    if (this.#conn) this.#dropConnection(1000, 'client closed', false);
    this.#tabs?.close();
    this.#tabs = null;
    this.#setState('closed');
    if (!this.#identity) this.#identityKnown.reject(new TandemError('closed', 'client closed before its identity was known'));
    for (const done of [...this.#waiting]) done(new TandemError('closed', 'client closed before the pending writes were acknowledged'));
    await Promise.allSettled([...this.#datasets.values()].map((ds) => ds._flush()));
  }

  // --- internals ------------------------------------------------------------------------

  #start() {
    this.#stopped = false;
    if (this.#watchNetwork && typeof window !== 'undefined' && typeof window.addEventListener === 'function') {
      const offline = () => {
        if (this.#conn) this.#dropConnection(1000, 'network offline', true);
      };
      const online = () => {
        if (!this.#stopped && !this.#paused && this.#state === 'offline') {
          this.#attempt = 0;
          clearTimeout(this.#retryTimer);
          this.#connect();
        }
      };
      window.addEventListener('offline', offline);
      window.addEventListener('online', online);
      this.#unwatchNetwork = () => {
        window.removeEventListener('offline', offline);
        window.removeEventListener('online', online);
      };
    }
    this.#connect();
  }

  /** What a Dataset needs from its client, without making it public API. */
  #internals() {
    return {
      identity: () => /** @type {string} */ (this.#identity),
      store: this.#store,
      deviceId: this.#deviceId,
      online: () => this.#state === 'online',
      limits: () => this.#limits,
      /** An error named a limit with its value: remember it (a server that did not announce it). */
      learn: (/** @type {string | undefined} */ limit, /** @type {number | undefined} */ max) => {
        const field = limit && Object.hasOwn(LIMIT_NAMES, limit) ? /** @type {any} */ (LIMIT_NAMES)[limit] : null;
        if (!field || typeof max !== 'number' || max < 1) return false;
        const known = /** @type {any} */ (this.#limits)[field];
        /** @type {any} */ (this.#limits)[field] = max;
        return known !== max;
      },
      pendingChanged: (/** @type {Dataset} */ ds, /** @type {number} */ n) => {
        const key = datasetKey(ds.owner, ds.name);
        // A closed handle keeps its count until the dataset is opened again.
        const open = this.#datasets.get(key);
        if (!open || open === ds) this.#pendingOf.set(key, n);
        this.#statusChanged();
      },
      backoff: { initialMs: this.#backoffInitial, maxMs: this.#backoffMax },
      announce: (/** @type {Dataset} */ ds, /** @type {string} */ key, /** @type {LocalRecord} */ record) => {
        if (this.#tabs && this.#identity) {
          this.#tabs.postMessage({ identity: this.#identity, owner: ds.owner, name: ds.name, key, record });
        }
      },
      request: (/** @type {any} */ frame) => this._request(frame),
      uploading: (/** @type {number} */ delta) => {
        this.#uploading += delta;
        this.#statusChanged();
      },
      /** The server confirmed a copy: an ack, a subscription's snapshot, a push. */
      synced: (/** @type {boolean} */ ack) => {
        this.#lastSyncedAt = Date.now();
        if (ack) this.#statusError = null;
        this.#statusChanged();
      },
      noteError: (/** @type {any} */ e) => this.#noteError(e),
      forget: (/** @type {Dataset} */ ds) => {
        const key = datasetKey(ds.owner, ds.name);
        if (this.#datasets.get(key) === ds) this.#datasets.delete(key);
      },
    };
  }

  /** Another tab of this browser profile edited a record locally. @param {any} msg */
  #onTabMessage(msg) {
    if (!msg || msg.identity !== this.#identity || typeof msg.key !== 'string') return;
    const ds = this.#datasets.get(datasetKey(msg.owner, msg.name));
    ds?._applyTabEdit(msg.key, msg.record);
  }

  /** @param {ConnectionState} state */
  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.#statusChanged();
    this.emit('state', state);
    if (state === 'failed') this.emit('failed', this.#lastError);
    else this.emit(state);
  }

  /** The client's `error` events also go to the status's `lastError`.
   * @protected @param {string} type @param {...any} args */
  emit(type, ...args) {
    if (type === 'error' || (type === 'failed' && args[0])) this.#noteError(args[0]);
    super.emit(type, ...args);
  }

  /** @param {any} e */
  #noteError(e) {
    this.#statusError = e instanceof TandemError ? e : new TandemError('internal', errorMessage(e));
    this.#statusChanged();
  }

  /** A status field may have changed: one `status` event after the current task, if so. */
  #statusChanged() {
    if (this.#statusScheduled) return;
    this.#statusScheduled = true;
    const before = this.#status;
    queueMicrotask(() => {
      this.#statusScheduled = false;
      const now = this.status;
      if (now !== before) this.emit('status', now);
    });
  }

  #offlineNow() {
    return typeof navigator !== 'undefined' && this.#watchNetwork && typeof window !== 'undefined' && navigator.onLine === false;
  }

  async #connect() {
    if (this.#stopped || this.#paused || this.#conn) return;
    if (this.#offlineNow()) {
      // The browser says there is no network; its `online` event reconnects.
      this.#setState('offline');
      return;
    }
    this.#setState('connecting');
    /** @type {{ ws: any, ready: boolean, closedByUs: boolean, timers: any[] }} */
    const conn = { ws: null, ready: false, closedByUs: false, timers: [] };
    this.#conn = conn;
    let token;
    try {
      token = await this.#getToken('connect');
    } catch (e) {
      if (this.#conn !== conn) return;
      this.#conn = null;
      this.emit('error', e instanceof TandemError ? e : new TandemError('unauthorized', `token provider failed: ${errorMessage(e)}`));
      this.#scheduleReconnect();
      return;
    }
    if (this.#conn !== conn || this.#stopped) return;
    let ws;
    try {
      ws = new this.#WS(this.#url);
    } catch (e) {
      this.#conn = null;
      this.emit('error', new TandemError('disconnected', `cannot open ${this.#url}: ${errorMessage(e)}`));
      this.#scheduleReconnect();
      return;
    }
    conn.ws = ws;
    conn.timers.push(
      timer(() => {
        if (this.#conn === conn && !conn.ready) this.#dropConnection(1000, 'no ready in time', true);
      }, this.#authTimeout),
    );
    ws.onopen = () => {
      if (this.#conn !== conn) return;
      this.#send(conn, this.#authFrame(0, token));
    };
    ws.onmessage = (/** @type {any} */ ev) => {
      if (this.#conn !== conn) return;
      if (typeof ev.data !== 'string') return; // the server sends text frames only
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!frame || typeof frame !== 'object') return;
      expandLean(frame);
      this.#onFrame(conn, frame);
    };
    ws.onerror = () => {}; // a close event follows
    ws.onclose = (/** @type {any} */ ev) => this.#onClose(conn, ev.code ?? 1006, ev.reason ?? '');
  }

  /** @param {'connect' | 'refresh'} reason */
  async #getToken(reason) {
    const token = await this.#tokenProvider({ reason, identity: this.#identity });
    if (typeof token !== 'string' || token === '') throw new TandemError('unauthorized', 'the token provider returned no token');
    if (!this.#identity) {
      const sub = tokenSubject(token);
      if (sub) {
        this.#identity = sub;
        this.#identityKnown.resolve(sub);
      }
    }
    return token;
  }

  /** @param {number} id @param {string} token */
  #authFrame(id, token) {
    return this.#wantFeatures.length ? { type: 'auth', id, token, features: this.#wantFeatures } : { type: 'auth', id, token };
  }

  /** @param {any} conn @param {any} frame */
  #send(conn, frame) {
    try {
      conn.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /** Sends a request on the live connection and resolves with its reply.
   * @internal @param {any} frame @returns {Promise<any>} */
  _request(frame) {
    const conn = this.#conn;
    if (!conn || !conn.ready) {
      return Promise.reject(new TandemError('offline', 'not connected'));
    }
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      const t = timer(() => {
        if (!this.#requests.has(id)) return;
        this.#requests.delete(id);
        reject(new TandemError('timeout', `no reply to ${frame.type} within ${this.#requestTimeout} ms`));
        if (this.#conn === conn) this.#dropConnection(1000, 'request timeout', true);
      }, this.#requestTimeout);
      this.#requests.set(id, { resolve, reject, timer: t });
      if (!this.#send(conn, { ...frame, id })) {
        clearTimeout(t);
        this.#requests.delete(id);
        reject(new TandemError('disconnected', 'the connection is closing'));
      }
    });
  }

  /** @param {any} conn @param {any} frame */
  #onFrame(conn, frame) {
    if (!frame || typeof frame !== 'object') return;
    if (frame.type === 'ready') {
      if (!conn.ready) {
        this.#onReady(conn, frame);
        return;
      }
      this.#onRefreshed(frame); // and resolve the refresh's `auth` request below
    }
    if (!conn.ready) {
      // Before ready only our auth can be answered: a refused token (a close follows).
      if (frame.type === 'error') this.#lastError = serverError(frame);
      return;
    }
    if (frame.id !== undefined && frame.id !== null && frame.type !== 'dataset' && frame.type !== 'delta') {
      const req = this.#requests.get(frame.id);
      if (req) {
        this.#requests.delete(frame.id);
        clearTimeout(req.timer);
        if (frame.type === 'error') req.reject(serverError(frame));
        else req.resolve(frame);
      } else if (frame.type === 'error') {
        this.emit('error', serverError(frame));
      }
      return;
    }
    switch (frame.type) {
      case 'dataset':
        this.#find(frame.dataset)?._applyServerState(frame.syncCount, frame.records ?? [], 'push');
        break;
      case 'delta':
        this.#find(frame.dataset)?._applyDelta(frame.baseSyncCount, frame.syncCount, frame.records ?? []);
        break;
      case 'deleted':
        this.#find(frame.dataset)?._onDeleted(frame.syncCount);
        break;
      case 'unsubscribed':
        this.#find(frame.dataset)?._onRevoked(frame.reason);
        break;
      case 'error':
        this.emit('error', serverError(frame));
        break;
      default:
        // Unknown frame types are ignored (protocol §1, forward compatibility).
        break;
    }
  }

  /** @param {any} ref */
  #find(ref) {
    if (!ref || typeof ref.name !== 'string') return undefined;
    return this.#datasets.get(datasetKey(ref.owner ?? this.#identity, ref.name));
  }

  /** @param {any} conn @param {any} frame */
  #onReady(conn, frame) {
    if (this.#identity && frame.identity !== this.#identity) {
      this.#lastError = new TandemError(
        'forbidden',
        `the token names ${JSON.stringify(frame.identity)}, this client is ${JSON.stringify(this.#identity)}`,
      );
      this.#stopped = true;
      this.#dropConnection(1000, 'identity mismatch', false);
      this.#setState('failed');
      return;
    }
    // Known before the protocol check: `open()` waits for it and works offline either way.
    if (!this.#identity) {
      this.#identity = frame.identity;
      this.#identityKnown.resolve(frame.identity);
    }
    // A server without `ready.protocol` predates it and speaks version 1.
    const protocol = typeof frame.protocol === 'number' ? frame.protocol : 1;
    this.#protocol = protocol;
    if (protocol !== PROTOCOL_VERSION) {
      this.#lastError = new TandemError(
        'unsupported_protocol',
        `the server speaks protocol version ${protocol}; this SDK (${VERSION}) speaks version ${PROTOCOL_VERSION}: use an SDK release for that version`,
      );
      this.#stopped = true;
      this.#dropConnection(1000, 'unsupported protocol', false);
      this.#setState('failed');
      return;
    }
    conn.ready = true;
    this.#attempt = 0;
    this.#lastError = null;
    this.#statusError = null;
    this.#session = { session: frame.session, expiresAt: frame.expiresAt };
    this.#features = readyFeatures(frame);
    this.#readLimits(frame);
    this.#scheduleRefresh(frame.expiresAt);
    this.#schedulePing(conn);
    this.#setState('online');
    this.emit('ready', { identity: frame.identity, session: frame.session, expiresAt: frame.expiresAt });
    // Re-subscribe every open dataset, then send what was written meanwhile.
    for (const ds of this.#datasets.values()) ds._resume();
  }

  /** @param {any} frame */
  #onRefreshed(frame) {
    if (this.#session) this.#session.expiresAt = frame.expiresAt;
    this.#features = readyFeatures(frame);
    this.#readLimits(frame);
    this.#scheduleRefresh(frame.expiresAt);
    this.emit('ready', { identity: frame.identity, session: frame.session, expiresAt: frame.expiresAt });
  }

  /** `ready.limits` (docs/PROTOCOL.md §3): what the server announces replaces what was known. */
  #readLimits(/** @type {any} */ frame) {
    const l = frame.limits;
    if (!l || typeof l !== 'object') return;
    for (const field of Object.values(LIMIT_NAMES)) {
      if (typeof l[field] === 'number' && l[field] >= 1) /** @type {any} */ (this.#limits)[field] = l[field];
    }
  }

  /** Refreshes the token a margin before it expires: 60 s, or half the time left if less. */
  #scheduleRefresh(/** @type {number} */ expiresAt) {
    clearTimeout(this.#refreshTimer);
    const left = expiresAt - Date.now();
    const delay = Math.max(500, left - Math.min(60_000, left / 2));
    this.#refreshTimer = timer(() => this.#refresh(), delay);
  }

  async #refresh() {
    const conn = this.#conn;
    if (!conn || !conn.ready) return;
    try {
      const token = await this.#getToken('refresh');
      if (this.#conn !== conn) return;
      const id = this.#nextId++;
      const reply = new Promise((resolve, reject) => {
        this.#requests.set(id, { resolve, reject, timer: timer(() => reject(new TandemError('timeout', 'no reply to auth')), this.#requestTimeout) });
      });
      this.#send(conn, this.#authFrame(id, token)); // every auth sets the features anew
      await reply; // `ready` reschedules the next refresh
    } catch (e) {
      if (this.#conn !== conn) return;
      this.emit('error', e instanceof TandemError ? e : new TandemError('unauthorized', `token refresh failed: ${errorMessage(e)}`));
      // Try again shortly; at expiry the server closes with 4002 and we reconnect anyway.
      const left = (this.#session?.expiresAt ?? 0) - Date.now();
      if (left > 1000) this.#refreshTimer = timer(() => this.#refresh(), Math.min(5000, left / 2));
    }
  }

  #schedulePing(/** @type {any} */ conn) {
    clearTimeout(this.#pingTimer);
    if (!this.#pingInterval) return;
    this.#pingTimer = timer(async () => {
      if (this.#conn !== conn) return;
      try {
        await this._request({ type: 'ping' });
      } catch (e) {
        // A timeout drops the connection; a refusal (rate_limited) still proves it is alive.
        if (!(e instanceof TandemError && e.server)) return;
      }
      this.#schedulePing(conn);
    }, this.#pingInterval);
  }

  /** Closes the current socket ourselves. */
  #dropConnection(/** @type {number} */ code, /** @type {string} */ reason, /** @type {boolean} */ reconnect) {
    const conn = this.#conn;
    if (!conn) return;
    conn.closedByUs = true;
    try {
      conn.ws?.close(code, reason);
    } catch {
      // already closed
    }
    this.#teardown(conn);
    if (reconnect && !this.#stopped) {
      this.#setState('offline');
      this.#scheduleReconnect();
    }
  }

  /** Forgets a connection: fails its requests, stops its timers. */
  #teardown(/** @type {any} */ conn) {
    if (this.#conn !== conn) return;
    this.#conn = null;
    this.#session = null;
    this.#features = [];
    conn.timers.forEach(clearTimeout);
    clearTimeout(this.#refreshTimer);
    clearTimeout(this.#pingTimer);
    const err = new TandemError('disconnected', 'the connection was lost');
    for (const [, req] of this.#requests) {
      clearTimeout(req.timer);
      req.reject(err);
    }
    this.#requests.clear();
    for (const ds of this.#datasets.values()) ds._disconnected();
  }

  /** @param {any} conn @param {number} code @param {string} reason */
  #onClose(conn, code, reason) {
    if (this.#conn !== conn) return; // a socket we already gave up on
    const wasReady = conn.ready;
    this.#teardown(conn);
    if (this.#stopped) return;
    if (!shouldReconnect(code)) {
      this.#lastError = new TandemError('closed', `the server closed the connection (${code}${reason ? ` ${reason}` : ''})${this.#lastError ? `: ${this.#lastError.message}` : ''}`, { closeCode: code });
      this.#stopped = true;
      this.emit('error', this.#lastError);
      this.#setState('failed');
      return;
    }
    if (wasReady) this.#attempt = 0;
    this.#setState('offline');
    this.#scheduleReconnect();
  }

  /** Exponential backoff with jitter: a random delay in [base/2, base], base doubling from
   * `initialMs` up to `maxMs`. */
  #scheduleReconnect() {
    if (this.#stopped || this.#paused) return;
    this.#setState('offline');
    const base = Math.min(this.#backoffMax, this.#backoffInitial * 2 ** this.#attempt);
    this.#attempt = Math.min(this.#attempt + 1, 30);
    const delay = base / 2 + (Math.random() * base) / 2;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = timer(() => {
      this.#retryTimer = null;
      this.#connect();
    }, delay);
  }
}

/** `ready.features`: what the server turned on (absent: none). @returns {string[]} */
function readyFeatures(/** @type {any} */ frame) {
  return Array.isArray(frame.features) ? frame.features.filter((/** @type {any} */ f) => typeof f === 'string') : [];
}

function errorMessage(/** @type {any} */ e) {
  return e && typeof e.message === 'string' ? e.message : String(e);
}

function serverError(/** @type {any} */ frame) {
  return new TandemError(String(frame.code ?? 'internal'), String(frame.message ?? 'error'), {
    limit: frame.limit,
    max: frame.max,
    server: true,
  });
}

// ---------------------------------------------------------------------------------------
// Datasets

/**
 * A dataset handle over the local cache. Reads and writes are local and work offline;
 * `sync()` reconciles with the server; pushes from the server are merged as they come.
 *
 * Events: `change` ({syncCount, keys, source: 'local' | 'remote' | 'tab'}) after every local
 * edit and whenever remote changes (or another tab's local edits) were applied;
 * `snapshot` (DatasetSnapshot, see `onSnapshot`);
 * `pending` (number of unsynchronised local changes); `conflict` ({key, local, server,
 * resolution}) after the handler resolved one; `synced` (SyncOutcome); `deleted`
 * ({syncCount, policy}) when the owner deleted the dataset; `revoked` when your access was
 * taken away; `error` (TandemError) for failures of background work (auto-sync,
 * re-subscribe) and, once per change, for a change set aside (its `key` says which).
 */
export class Dataset extends Emitter {
  #client;
  #io;
  #owner;
  #name;
  /** @type {DatasetState} */
  #state;
  #handler;
  #autoSync;
  #autoSyncDelay;
  #maxRetries;
  #subscribed = false;
  /** Catch-ups started (one per connection); a retry loop stops when a newer one starts. */
  #resumes = 0;
  #revoked = false;
  #deleted = false;
  #closed = false;
  /** @type {any} */
  #autoTimer = null;
  /** @type {Promise<SyncOutcome> | null} */
  #running = null;
  /** @type {Promise<SyncOutcome> | null} */
  #queued = null;
  #saveWanted = false;
  /** @type {Promise<void> | null} */
  #saving = null;
  #lastPending = 0;
  /** A `changes` catch-up after a `delta` whose base this copy does not hold is running. */
  #catchingUp = false;
  /** The highest sync count a `delta` announced that this copy has not reached. */
  #catchUpTo = 0;
  /** @type {(c: DatasetDeletedCase) => DeletedPolicy} */
  #deletedPolicy;
  /** The last version given to a local edit: one counter for the whole dataset, never going
   * down, so a key whose record was dropped (discarded, reverted, deleted) and edited again
   * cannot reuse the version of an edit still in flight, whose ack would then clean it. */
  #editSeq = 0;
  /** The current snapshot's version, and the snapshot (built when first asked for). */
  #version = 1;
  /** @type {DatasetSnapshot | null} */
  #snap = null;
  #snapScheduled = false;
  /** Whether a local or other-tab edit is among the changes of the coming snapshot. */
  #snapLocal = false;
  /** The next subscribe asks for the whole dataset (a discarded change needs the server's
   * version of its key back, which a `since` reply would not repeat). */
  #needWhole = false;
  /** `waitForPendingWrites` calls: the versions of the changes each waits for.
   * @type {Set<{ versions: Map<string, number>, resolve: () => void, reject: (e: any) => void }>} */
  #waiters = new Set();
  /** The highest version acknowledged per key, kept while someone waits. @type {Map<string, number>} */
  #acked = new Map();

  /**
   * @internal Use `client.open(name)`.
   * @param {TandemClient} client
   * @param {any} io
   * @param {string} owner
   * @param {string} name
   * @param {DatasetState} state
   * @param {{ handler: ConflictHandler, autoSync: boolean, autoSyncDelay: number, maxRetries: number, deletedPolicy: (c: DatasetDeletedCase) => DeletedPolicy }} opts
   */
  constructor(client, io, owner, name, state, opts) {
    super();
    this.#client = client;
    this.#io = io;
    this.#owner = owner;
    this.#name = name;
    const records = Object.create(null);
    for (const [k, r] of Object.entries(state.records ?? {})) {
      records[k] = {
        value: r.value ?? null,
        syncCount: r.syncCount ?? 0,
        dirty: !!r.dirty,
        deviceLastModified: r.deviceLastModified ?? undefined,
        version: r.version ?? 0,
        // Absent in a cache written before the SDK kept them: filled when the server sends the record.
        lastModified: r.lastModified ?? undefined,
        lastModifiedBy: r.lastModifiedBy ?? undefined,
        deviceId: r.deviceId ?? undefined,
      };
      if (r.dirty && r.setAside) records[k].setAside = { ...r.setAside };
      if (records[k].version > this.#editSeq) this.#editSeq = records[k].version;
    }
    this.#state = { syncCount: state.syncCount ?? 0, records };
    this.#handler = opts.handler;
    this.#autoSync = opts.autoSync;
    this.#autoSyncDelay = opts.autoSyncDelay;
    this.#maxRetries = opts.maxRetries;
    this.#deletedPolicy = opts.deletedPolicy;
    this.#lastPending = this.pending;
  }

  /** The conflict handler of this handle (shared by every `open()` of the dataset). */
  get conflictHandler() {
    return this.#handler;
  }

  /** Replaces the conflict handler, for every holder of this handle.
   * @param {ConflictHandler | 'keepLocal' | 'takeRemote' | 'latestDeviceTime'} handler */
  setConflictHandler(handler) {
    this.#handler = handlerFrom(handler);
  }

  /**
   * The current snapshot: an immutable object, the same one until something visible changes
   * (records, pending count, sync count), then a new one with a higher `version`. With
   * `onSnapshot` it is what React's `useSyncExternalStore` needs:
   * `useSyncExternalStore((cb) => ds.onSnapshot(cb), () => ds.snapshot)`.
   * @returns {DatasetSnapshot}
   */
  get snapshot() {
    if (!this.#snap) this.#snap = this.#buildSnapshot(this.#version, this.#snapLocal);
    return this.#snap;
  }

  /**
   * Calls `listener` with the current snapshot now, then with each new one: after local
   * edits, other tabs' edits, remote changes, acks, conflict resolutions and deletes
   * (changes made in one go come as one snapshot). Returns the function that stops it.
   * @param {(snapshot: DatasetSnapshot) => void} listener
   * @returns {() => void}
   */
  onSnapshot(listener) {
    listener(this.snapshot);
    return this.on('snapshot', listener);
  }

  /** The changes set aside: refused for good by the server, or breaking a limit it
   * announced; kept (readable, pending) but not sent, until edited again, discarded or
   * reverted. @returns {Array<SetAside & { key: string }>} */
  setAside() {
    return this.dirtyKeys()
      .filter((k) => this.#state.records[k].setAside)
      .map((k) => ({ key: k, .../** @type {SetAside} */ (this.#state.records[k].setAside) }));
  }

  /**
   * Drops the local change of `key` (set aside or only pending): the key goes back to the
   * server's version, fetched again when online. Returns whether there was one.
   * @param {string} key @returns {boolean}
   */
  discard(key) {
    this.#checkOpen();
    const had = this.#drop(key);
    if (had) this.#afterDrop([key]);
    return had;
  }

  /**
   * Drops every local change not yet acknowledged, set aside or not (see `discard`).
   * @returns {string[]} the keys dropped
   */
  revert() {
    this.#checkOpen();
    const keys = this.dirtyKeys().filter((k) => this.#drop(k));
    if (keys.length) this.#afterDrop(keys);
    return keys;
  }

  /** The owner's identity. */
  get owner() {
    return this.#owner;
  }

  get name() {
    return this.#name;
  }

  /** The client this dataset belongs to. */
  get client() {
    return this.#client;
  }

  /** The highest dataset sync count seen from the server. */
  get syncCount() {
    return this.#state.syncCount;
  }

  /** Local changes not yet acknowledged by the server. */
  get pending() {
    let n = 0;
    for (const k in this.#state.records) if (this.#state.records[k].dirty) n++;
    return n;
  }

  /** True while the server pushes this dataset's changes to us. */
  get subscribed() {
    return this.#subscribed;
  }

  /** True after the owner revoked our access (until a successful `subscribe()`). */
  get revoked() {
    return this.#revoked;
  }

  /** True after the owner deleted the dataset, until it is followed again (at once when
   * online: see `onDatasetDeleted`). */
  get deleted() {
    return this.#deleted;
  }

  /** Whether auto-sync is on; settable. */
  get autoSync() {
    return this.#autoSync;
  }

  set autoSync(on) {
    this.#autoSync = !!on;
    if (on && this.pending > 0) this.#scheduleAutoSync();
  }

  /** The value of `key` as this device sees it, or `undefined`.
   * @param {string} key @returns {string | undefined} */
  get(key) {
    const r = this.#rec(key);
    return r && r.value !== null ? r.value : undefined;
  }

  /** @param {string} key */
  has(key) {
    return this.get(key) !== undefined;
  }

  /** The live (not removed) records as this device sees them, ordered by key.
   * @returns {Map<string, string>} */
  records() {
    const out = new Map();
    for (const k of Object.keys(this.#state.records).sort()) {
      const r = this.#state.records[k];
      if (r.value !== null) out.set(k, r.value);
    }
    return out;
  }

  /** The local record of `key` (a copy), or `undefined`: its value, sync bookkeeping, and
   * who wrote it, when and from which device (`lastModified`, `lastModifiedBy`, `deviceId`;
   * a local edit is this client's, with no `lastModified`, until acknowledged).
   * @param {string} key @returns {LocalRecord | undefined} */
  record(key) {
    const r = this.#rec(key);
    return r ? { ...r } : undefined;
  }

  /** Keys with unsynchronised local changes. @returns {string[]} */
  dirtyKeys() {
    return Object.keys(this.#state.records).filter((k) => this.#state.records[k].dirty).sort();
  }

  /**
   * Sets `key` locally (marks it dirty). Resolves once the local cache is written.
   * @param {string} key @param {string} value
   */
  async put(key, value) {
    if (typeof value !== 'string') throw new TypeError('a value must be a string (serialise objects yourself, e.g. with JSON.stringify)');
    await this.#write(key, value);
  }

  /** Removes `key` locally (marks it dirty). Resolves once the local cache is written.
   * @param {string} key */
  async remove(key) {
    await this.#write(key, null);
  }

  /**
   * Sends every local change with the sync counts it was based on. Conflicts go to the
   * conflict handler and the update is retried, at most `maxSyncRetries` times; then it
   * rejects with a `conflict` TandemError whose `keys` lists what is still unresolved.
   * Rejects with `offline` when not connected (local changes stay pending and are sent on
   * reconnect). One sync runs at a time; calls made meanwhile share the next run.
   * @returns {Promise<SyncOutcome>}
   */
  sync() {
    if (this.#queued) return this.#queued;
    const previous = this.#running;
    /** @type {{ promise: Promise<SyncOutcome> | null }} */
    const slot = { promise: null };
    slot.promise = (async () => {
      // Always yield first: `slot.promise` is set only after this function returns.
      await (previous ? previous.catch(() => {}) : null);
      this.#queued = null;
      this.#running = slot.promise;
      try {
        return await this.#syncOnce();
      } finally {
        if (this.#running === slot.promise) this.#running = null;
      }
    })();
    this.#queued = slot.promise;
    return slot.promise;
  }

  /**
   * Subscribes (again) now and merges the server's snapshot: follows a re-created dataset
   * after `deleted`, or one shared with you again after `revoked`. A cached copy is named
   * with `since`, so the snapshot may hold only the changes after it.
   * @returns {Promise<number>} the snapshot's sync count
   */
  async subscribe() {
    this.#checkOpen();
    // The copy is complete at its sync count (every frame applied in order, own edits kept
    // apart as dirty), so the server need only send what changed after it.
    const whole = this.#needWhole;
    const since = whole ? 0 : this.#state.syncCount;
    /** @type {any} */ const frame = { type: 'subscribe', dataset: this.#ref() };
    if (since > 0) frame.since = since;
    const snap = await this.#io.request(frame);
    if (whole) this.#needWhole = false;
    this.#subscribed = true;
    this.#revoked = false;
    this.#deleted = false;
    this.#io.synced(false);
    if (typeof snap.since === 'number') this.#applyChanges(snap.since, snap.syncCount, snap.records ?? [], true);
    // Whole and below what we named: the server never had this copy's history.
    else if (since > 0 && snap.syncCount < since) await this.#replaceCopy(since, snap.syncCount, snap.records ?? []);
    else this._applyServerState(snap.syncCount, snap.records ?? [], 'snapshot');
    return snap.syncCount;
  }

  /**
   * The live remote (and other tabs') changes as an async iterable of `change` events,
   * local edits left out; ends when the dataset is closed or the loop breaks.
   * @returns {AsyncIterableIterator<{ syncCount: number, keys: string[], source: 'local' | 'remote' | 'tab' }>}
   */
  remoteChanges() {
    /** @type {any[]} */ const queue = [];
    /** @type {((r: IteratorResult<any>) => void)[]} */ const waiters = [];
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      offChange();
      offClose();
      for (const w of waiters.splice(0)) w({ value: undefined, done: true });
    };
    const offChange = this.on('change', (ev) => {
      if (ev.source === 'local') return;
      const w = waiters.shift();
      if (w) w({ value: ev, done: false });
      else queue.push(ev);
    });
    const offClose = this.on('close', finish);
    return {
      [Symbol.asyncIterator]() {
        return this;
      },
      next() {
        if (queue.length) return Promise.resolve({ value: queue.shift(), done: false });
        if (done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => waiters.push(resolve));
      },
      return() {
        finish();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }

  /** Stops following the dataset and forgets the handle (the local cache stays in the
   * store). Resolves once the cache is written. */
  async close() {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#autoTimer);
    this.#io.forget(this);
    if (this.#subscribed && this.#io.online()) {
      this.#subscribed = false;
      await this.#io.request({ type: 'unsubscribe', dataset: this.#ref() }).catch(() => {});
    }
    this.#subscribed = false;
    for (const w of this.#waiters) w.reject(new TandemError('closed', `dataset ${this.#owner}/${this.#name} closed before its pending writes were acknowledged`));
    this.#waiters.clear();
    this.emit('close');
    await this._flush();
  }

  /** Errors also go to the client's status (`lastError`).
   * @protected @param {string} type @param {...any} args */
  emit(type, ...args) {
    if (type === 'error') this.#io.noteError(args[0]);
    super.emit(type, ...args);
  }

  // --- internals (called by the client) ------------------------------------------------

  /** @internal A promise that resolves when the changes pending now are acknowledged (see
   * `client.waitForPendingWrites`), and `cancel` to forget the wait when it ends otherwise.
   * @returns {{ promise: Promise<void>, cancel: () => void }} */
  _waitForPending() {
    const none = { promise: Promise.resolve(), cancel: () => {} };
    if (this.#closed) return none;
    /** @type {Map<string, number>} */ const versions = new Map();
    for (const k of this.dirtyKeys()) versions.set(k, this.#state.records[k].version);
    if (versions.size === 0) return none;
    /** @type {any} */ let waiter = null;
    const promise = new Promise((resolve, reject) => {
      waiter = { versions, resolve, reject };
      this.#waiters.add(waiter);
      this.#checkWaiters();
    });
    const cancel = () => {
      if (this.#waiters.delete(waiter) && this.#waiters.size === 0) this.#acked.clear();
    };
    return { promise: /** @type {Promise<void>} */ (promise), cancel };
  }

  /** Settles the waiters whose changes are all acknowledged (or dropped), or one of which is
   * set aside. */
  #checkWaiters() {
    for (const w of this.#waiters) {
      let open = false;
      for (const [k, v] of w.versions) {
        const r = this.#rec(k);
        if (!r || !r.dirty || (this.#acked.get(k) ?? -1) >= v) continue;
        if (r.setAside) {
          this.#waiters.delete(w);
          const a = r.setAside;
          w.reject(new TandemError(a.code, `${k}: ${a.message}; the change is set aside and will not be sent`, { limit: a.limit, max: a.max, key: k }));
          open = true;
          break;
        }
        open = true;
        break;
      }
      if (!open) {
        this.#waiters.delete(w);
        w.resolve();
      }
    }
    if (this.#waiters.size === 0) this.#acked.clear();
  }

  /** @internal Sign-out (`client.wipe`): forgets the local state; the handle is closed. */
  _wipe() {
    clearTimeout(this.#autoTimer);
    this.#state = emptyState();
    this.#lastPending = 0;
    this.#snap = null;
    this.#version += 1;
    const wasOpen = !this.#closed;
    this.#closed = true;
    this.#subscribed = false;
    for (const w of this.#waiters) w.reject(new TandemError('closed', `dataset ${this.#owner}/${this.#name} was wiped`));
    this.#waiters.clear();
    // Whoever shows the snapshot (a React hook) shows the empty one, not the signed-out
    // user's records.
    this.emit('snapshot', this.snapshot);
    if (wasOpen) this.emit('close');
  }

  /** @internal Resolves when the state is written to the store. */
  async _flush() {
    while (this.#saving) await this.#saving.catch(() => {});
  }

  /** @internal The connection went away. */
  _disconnected() {
    this.#subscribed = false;
    clearTimeout(this.#autoTimer);
  }

  /** @internal The client is online again: re-subscribe, then sync pending changes. */
  async _resume() {
    // A newer connection starts its own catch-up; this one's retries then stop.
    const generation = ++this.#resumes;
    const { initialMs, maxMs } = this.#io.backoff;
    let wait = initialMs;
    let subscribed = false;
    for (;;) {
      // Not skipped after a delete: the dataset is followed again and kept changes are sent.
      if (this.#closed || this.#revoked) return;
      try {
        if (!subscribed) {
          await this.subscribe();
          subscribed = true;
        }
        if (this.pending > 0) await this.sync();
        return;
      } catch (e) {
        if (e instanceof TandemError && e.server && e.code === 'forbidden') {
          this._onRevoked('forbidden');
          return;
        }
        // Refused for now (the server's store briefly unavailable, rate_limited after a
        // burst of resubscriptions): try again with backoff while this connection lasts,
        // so offline edits reach the server without the app calling sync() again.
        if (!isRetriable(e)) {
          if (!isNetworkError(e)) this.emit('error', e);
          return;
        }
        await new Promise((resolve) => timer(() => resolve(undefined), wait / 2 + Math.random() * (wait / 2)));
        wait = Math.min(maxMs, wait * 2);
        if (generation !== this.#resumes || !this.#io.online()) return;
      }
    }
  }

  /** @internal */
  _backgroundSync() {
    this.sync().catch((e) => {
      if (!isNetworkError(e)) this.emit('error', e);
    });
  }

  /**
   * @internal Another tab of this user edited `key` locally: take its edit as ours (it is
   * pending here too, so whichever tab syncs first sends it, and the other sees its own
   * value come back and drops it as done), save, and tell listeners.
   * @param {string} key @param {LocalRecord} record
   */
  _applyTabEdit(key, record) {
    if (this.#closed || !record || !record.dirty) return;
    const local = this.#rec(key);
    if (local && local.dirty && local.value === record.value && local.deviceLastModified === record.deviceLastModified) return;
    this.#state.records[key] = {
      value: record.value ?? null,
      syncCount: record.syncCount ?? 0,
      dirty: true,
      deviceLastModified: record.deviceLastModified,
      version: this.#nextVersion(),
      // A local edit of this user's, made by the other tab's client.
      lastModified: undefined,
      lastModifiedBy: record.lastModifiedBy ?? this.#io.identity(),
      deviceId: record.deviceId ?? this.#io.deviceId,
    };
    this.#pendingChanged();
    this.#scheduleAutoSync();
    this.#bump(false);
    this.#persist().catch(() => {});
    if (!local || local.value !== record.value) this.emit('change', { syncCount: this.#state.syncCount, keys: [key], source: 'tab' });
  }

  /**
   * @internal Merges the server's whole dataset (a `snapshot` or a `dataset` push): clean
   * records take the server's state, dirty ones keep their local value and the sync count
   * it was based on, so the next sync surfaces any remote change as a conflict instead of
   * overwriting it.
   * @param {number} syncCount @param {ServerRecord[]} records @param {'push' | 'snapshot'} kind
   */
  _applyServerState(syncCount, records, kind) {
    if (this.#closed) return;
    const st = this.#state;
    // Latest wins: a push must be newer; a snapshot at the same count is harmless.
    if (kind === 'push' ? syncCount <= st.syncCount : syncCount < st.syncCount) return;
    /** @type {string[]} */ const changed = [];
    const seen = new Set();
    for (const r of records) {
      seen.add(r.key);
      this.#mergeRecord(r, syncCount, changed);
    }
    for (const k of Object.keys(st.records)) {
      const local = st.records[k];
      if (seen.has(k) || local.dirty || local.syncCount > syncCount) continue;
      delete st.records[k];
      if (local.value !== null) changed.push(k);
    }
    st.syncCount = Math.max(st.syncCount, syncCount);
    if (kind === 'push') this.#io.synced(false);
    this.#pendingChanged();
    this.#bump(true);
    this.#persist().catch(() => {});
    if (changed.length) this.emit('change', { syncCount, keys: changed.sort(), source: 'remote' });
  }

  /**
   * @internal A `delta` push: the records changed after `base` up to `syncCount`, tombstones
   * included. Old ones are ignored; one whose base this copy has not reached (something was
   * missed) makes it fetch `changes` since its own sync count instead.
   * @param {number} base @param {number} syncCount @param {ServerRecord[]} records
   */
  _applyDelta(base, syncCount, records) {
    if (this.#closed) return;
    if (syncCount <= this.#state.syncCount) return;
    if (base > this.#state.syncCount) {
      this.#catchUp(syncCount);
      return;
    }
    // Usually base equals our count. A base below it (a conflated delta whose first commit
    // this copy already has from its own ack) is as good: the delta holds the newest version
    // of every key changed after base, so it also covers everything after our count.
    if (this.#applyChanges(base, syncCount, records, false)) this.#io.synced(false);
  }

  /**
   * Merges the records changed after `since` up to `syncCount` (a `delta`, a `changes`
   * reply, a `snapshot` with `since`) by the same rules as a whole dataset, except that a
   * key not listed is unchanged and a tombstone removes a clean key. Applies only on a copy
   * complete at a count between `since` and `syncCount`: then the result is the dataset at
   * `syncCount`.
   * @param {number} since @param {number} syncCount @param {ServerRecord[]} records
   * @param {boolean} snapshot A subscribe's reply: at our own count it still settles records.
   * @returns {boolean} whether it applied
   */
  #applyChanges(since, syncCount, records, snapshot) {
    if (this.#closed) return false;
    const st = this.#state;
    if (since > st.syncCount || (snapshot ? syncCount < st.syncCount : syncCount <= st.syncCount)) return false;
    /** @type {string[]} */ const changed = [];
    for (const r of records) this.#mergeRecord(r, syncCount, changed);
    st.syncCount = Math.max(st.syncCount, syncCount);
    this.#pendingChanged();
    this.#bump(true);
    this.#persist().catch(() => {});
    if (changed.length) this.emit('change', { syncCount, keys: changed.sort(), source: 'remote' });
    return true;
  }

  /**
   * A whole snapshot below the `since` this copy sent: the server no longer has the history
   * the copy was built on (its store restored from an older backup, or started afresh), so
   * the snapshot replaces the copy, lower sync count and all. Clean records take the
   * server's state. Local edits stay pending, rebased on it: a key the server lacks is
   * written as new (base 0), one it holds with the same value is done, and one it holds at
   * another version goes to the conflict handler now, as a refused update would.
   * @param {number} sent the `since` the subscribe named
   * @param {number} syncCount @param {ServerRecord[]} records
   */
  async #replaceCopy(sent, syncCount, records) {
    if (this.#closed) return;
    const st = this.#state;
    // A push or an ack applied while the subscribe was in flight landed on the stale copy:
    // what the server did after the snapshot is fetched again below.
    const moved = st.syncCount > sent ? st.syncCount : 0;
    /** @type {Map<string, ServerRecord>} */ const server = new Map(records.map((r) => [r.key, r]));
    /** @type {string[]} */ const changed = [];
    /** @type {{ key: string, server: ServerRecord }[]} */ const stale = [];
    for (const k of Object.keys(st.records)) {
      const local = st.records[k];
      if (server.has(k)) continue;
      if (local.dirty) local.syncCount = 0;
      else {
        delete st.records[k];
        if (local.value !== null) changed.push(k);
      }
    }
    for (const r of records) {
      const local = this.#rec(r.key);
      const value = r.value ?? null;
      if (local && local.dirty) {
        if (local.value === value) {
          local.dirty = false;
          local.syncCount = r.syncCount;
          takeMetadata(local, r);
        } else if (local.syncCount !== r.syncCount) {
          // A base equal to the server's version is what the server accepts; others are stale.
          stale.push({ key: r.key, server: r });
        }
        continue;
      }
      if (!local || local.value !== value) changed.push(r.key);
      st.records[r.key] = fromServer(r, local ? local.version : 0);
    }
    st.syncCount = syncCount;
    this.#pendingChanged();
    this.#bump(true);
    this.#persist().catch(() => {});
    if (changed.length) this.emit('change', { syncCount, keys: changed.sort(), source: 'remote' });
    if (stale.length) await this.#resolve(stale);
    if (moved) this.#catchUp(moved);
  }

  /**
   * One server record into the local copy, from a frame at `syncCount`. Dirty records keep
   * their local value (the next sync surfaces a remote change as a conflict), unless the
   * server already holds exactly that value; a tombstone removes a clean record.
   * @param {ServerRecord} r @param {number} syncCount @param {string[]} changed
   */
  #mergeRecord(r, syncCount, changed) {
    const st = this.#state;
    const local = this.#rec(r.key);
    const value = r.value ?? null;
    if (local && local.dirty) {
      // The server already holds exactly this local change (our own commit whose ack is
      // still on its way or was lost, or another tab's): it is done, not pending.
      if (local.value === value) {
        local.dirty = false;
        local.syncCount = Math.max(local.syncCount, r.syncCount);
        takeMetadata(local, r);
        if (value === null) delete st.records[r.key];
        this.#pendingChanged();
      }
      return;
    }
    // A clean record stamped later than this frame (an ack that beat the push) is newer.
    if (local && local.syncCount > syncCount) return;
    if (value === null) {
      if (!local) return;
      delete st.records[r.key];
      if (local.value !== null) changed.push(r.key);
      return;
    }
    if (local && local.value === value && local.syncCount === r.syncCount) {
      // The same version: only its metadata may be new to this copy (a cache written
      // before the SDK kept any).
      takeMetadata(local, r);
      return;
    }
    st.records[r.key] = fromServer(r, local ? local.version : 0);
    if (!local || local.value !== value) changed.push(r.key);
  }

  /**
   * A `delta` said the dataset reached `target` from a base this copy does not hold: fetch
   * `changes` since our count and apply them, again while a newer `delta` announced more
   * (bounded; the next `delta` or re-subscribe picks it up otherwise).
   * @param {number} target
   */
  #catchUp(target) {
    this.#catchUpTo = Math.max(this.#catchUpTo, target);
    if (this.#catchingUp) return;
    this.#catchingUp = true;
    (async () => {
      try {
        for (let round = 0; round < 3 && this.#catchUpTo > this.#state.syncCount; round++) {
          if (this.#closed || !this.#subscribed || !this.#io.online()) return;
          const since = this.#state.syncCount;
          const reply = await this.#io.request({ type: 'changes', dataset: this.#ref(), since });
          this.#applyChanges(since, reply.syncCount, reply.records ?? [], false);
        }
      } catch (e) {
        if (!isNetworkError(e)) this.emit('error', e);
      } finally {
        this.#catchingUp = false;
      }
    })();
  }

  /** @internal The owner deleted the dataset; the subscription has ended. The policy
   * (`onDatasetDeleted`) decides what stays of the local copy: by default the clean records
   * go and local changes stay, based on nothing now, so that a sync re-creates the dataset
   * with them. Then the dataset is followed again: subscribed at once (a re-creation
   * elsewhere arrives live), and autoSync and the reconnect catch-up go on as before.
   * @param {number} syncCount */
  _onDeleted(syncCount) {
    if (this.#closed) return;
    const st = this.#state;
    /** @type {DeletedPolicy} */ let policy = 'keepPending';
    try {
      const chosen = this.#deletedPolicy({ dataset: this, syncCount });
      if (chosen === 'keepAll' || chosen === 'drop' || chosen === 'keepPending') policy = chosen;
      else this.emit('error', new TypeError(`onDatasetDeleted returned ${String(chosen)}: use keepPending, keepAll or drop; kept the pending changes`));
    } catch (e) {
      this.emit('error', e);
    }
    /** @type {string[]} */ const dropped = [];
    for (const k of Object.keys(st.records)) {
      const r = st.records[k];
      if (policy === 'keepAll' && r.value !== null) {
        // The whole local copy becomes the new dataset's content.
        if (!r.dirty) {
          r.dirty = true;
          r.version = this.#nextVersion();
        }
        r.syncCount = 0;
      } else if (policy !== 'drop' && r.dirty) {
        r.syncCount = 0;
      } else {
        delete st.records[k];
        if (r.value !== null) dropped.push(k);
      }
    }
    st.syncCount = Math.max(st.syncCount, syncCount ?? 0);
    this.#subscribed = false;
    this.#deleted = true;
    this.#needWhole = false;
    clearTimeout(this.#autoTimer);
    this.#pendingChanged();
    this.#bump(true);
    this.#persist().catch(() => {});
    if (dropped.length) this.emit('change', { syncCount: st.syncCount, keys: dropped.sort(), source: 'remote' });
    this.emit('deleted', { syncCount, policy });
    if (this.#io.online()) {
      const generation = this.#resumes;
      this.subscribe().then(
        () => {
          if (this.pending > 0) this.#scheduleAutoSync();
        },
        (e) => {
          if (generation !== this.#resumes) return; // a reconnect follows it again anyway
          // Deleting also removed the dataset's grants: a grantee has no access now.
          if (e instanceof TandemError && e.server && e.code === 'forbidden') this._onRevoked('forbidden');
          else if (!isNetworkError(e)) this.emit('error', e);
        },
      );
    }
  }

  /** @internal Our access was revoked: stop syncing; the local data stays readable.
   * @param {string} reason */
  _onRevoked(reason) {
    this.#subscribed = false;
    this.#revoked = true;
    clearTimeout(this.#autoTimer);
    this.emit('revoked', { reason });
  }

  // --- private ------------------------------------------------------------------------

  #ref() {
    return { owner: this.#owner, name: this.#name };
  }

  #checkOpen() {
    if (this.#closed) throw new TandemError('closed', `dataset ${this.#owner}/${this.#name} is closed`);
  }

  /** @param {string} key @returns {LocalRecord | undefined} */
  #rec(key) {
    return Object.hasOwn(this.#state.records, key) ? this.#state.records[key] : undefined;
  }

  /** Marks a record's value as this client's edit: ours until the server stamps it with its
   * time (the ack, or a push of the same value, brings the server's metadata).
   * @param {LocalRecord} r @returns {LocalRecord} */
  #ownEdit(r) {
    r.lastModified = undefined;
    r.lastModifiedBy = this.#io.identity();
    r.deviceId = this.#io.deviceId;
    return r;
  }

  /** @param {string} key @param {string | null} value */
  async #write(key, value) {
    this.#checkOpen();
    if (typeof key !== 'string' || key === '') throw new TypeError('a key must be a non-empty string');
    const broken = this.#breaks(key, value);
    if (broken) {
      // A key the server cannot hold: removing it only undoes the local edit.
      if (value === null && broken.limit === 'max_key_length') {
        if (this.#drop(key)) this.#afterDrop([key]);
        return;
      }
      throw new TandemError(broken.code, `${key}: ${broken.message}; not written`, { limit: broken.limit, max: broken.max, key });
    }
    const r = this.#rec(key);
    if (r) {
      r.value = value;
      r.dirty = true;
      r.deviceLastModified = Date.now();
      r.version = this.#nextVersion();
      delete r.setAside; // a new edit is tried again
      this.#ownEdit(r);
    } else {
      this.#state.records[key] = this.#ownEdit({ value, syncCount: 0, dirty: true, deviceLastModified: Date.now(), version: this.#nextVersion() });
    }
    this.#pendingChanged();
    this.#scheduleAutoSync();
    this.#io.announce(this, key, { ...this.#state.records[key] });
    this.emit('change', { syncCount: this.#state.syncCount, keys: [key], source: 'local' });
    this.#bump(false);
    await this.#persist();
  }

  /**
   * Which announced (or learnt) server limit a change of `key` to `value` breaks on its own,
   * whatever else the dataset holds: the server would refuse it for good.
   * @param {string} key @param {string | null} value
   * @returns {SetAside | null}
   */
  #breaks(key, value) {
    const l = this.#io.limits();
    if (l.maxKeyLength !== undefined && key.length > l.maxKeyLength && scalarLength(key) > l.maxKeyLength) {
      return { code: 'too_large', limit: 'max_key_length', max: l.maxKeyLength, message: `key longer than ${l.maxKeyLength} characters` };
    }
    if (value === null) return null;
    if (l.maxDatasetBytes !== undefined && utf8Length(key) + utf8Length(value) > l.maxDatasetBytes) {
      return { code: 'too_large', limit: 'max_dataset_bytes', max: l.maxDatasetBytes, message: `key and value larger than the ${l.maxDatasetBytes} bytes a dataset may hold` };
    }
    if (l.maxFrameBytes !== undefined && this.#frameBytes([this.#patch(key, { value, syncCount: 0, deviceLastModified: Date.now() })]) > l.maxFrameBytes) {
      return { code: 'too_large', limit: 'max_frame_bytes', max: l.maxFrameBytes, message: `an update with this value is larger than the ${l.maxFrameBytes} bytes of a frame` };
    }
    return null;
  }

  /** An update's patch for a local record. @param {string} key @param {{ value: string | null, syncCount: number, deviceLastModified?: number }} r */
  #patch(key, r) {
    return r.value === null
      ? { op: 'remove', key, syncCount: r.syncCount, deviceLastModified: r.deviceLastModified }
      : { op: 'replace', key, value: r.value, syncCount: r.syncCount, deviceLastModified: r.deviceLastModified };
  }

  /** Bytes of an update frame carrying `patches` (the id's digits allowed for). @param {any[]} patches */
  #frameBytes(patches) {
    return utf8Length(JSON.stringify({ type: 'update', dataset: this.#ref(), deviceId: this.#io.deviceId, patches, id: 2 ** 52 }));
  }

  /** Sets a change aside (once): kept, reported with its key, not sent again until edited.
   * @param {string} key @param {SetAside} why @param {boolean} server */
  #putAside(key, why, server) {
    const r = this.#rec(key);
    if (!r || !r.dirty || r.setAside) return;
    r.setAside = { code: why.code, limit: why.limit, max: why.max, message: why.message };
    if (this.#waiters.size) this.#checkWaiters();
    this.#persist().catch(() => {});
    this.emit('error', new TandemError(why.code, `${key}: ${why.message}; the change is set aside (discard(key) drops it)`, { limit: why.limit, max: why.max, key, server }));
  }

  /** Sets aside the pending changes that break a known limit on their own; a removal of a
   * key too long for the server is only a local undo, dropped. */
  #setAsideBroken() {
    /** @type {string[]} */ const undone = [];
    for (const k of this.dirtyKeys()) {
      const r = this.#state.records[k];
      if (r.setAside) continue;
      const broken = this.#breaks(k, r.value);
      if (!broken) continue;
      if (r.value === null && broken.limit === 'max_key_length') {
        if (this.#drop(k)) undone.push(k);
      } else this.#putAside(k, broken, false);
    }
    if (undone.length) this.#afterDrop(undone);
  }

  /** Forgets the local change of `key`; true if there was one. @param {string} key */
  #drop(key) {
    const r = this.#rec(key);
    if (!r || !r.dirty) return false;
    delete this.#state.records[key];
    // The server holds a version of it this copy no longer has: fetch it again.
    if (r.syncCount > 0) this.#needWhole = true;
    return true;
  }

  /** After changes were dropped: save, tell, and get the server's versions back. @param {string[]} keys */
  #afterDrop(keys) {
    this.#pendingChanged();
    this.#persist().catch(() => {});
    this.emit('change', { syncCount: this.#state.syncCount, keys: [...keys].sort(), source: 'local' });
    this.#bump(false);
    if (this.#needWhole && this.#subscribed && this.#io.online()) {
      this.subscribe().catch((e) => {
        if (!isNetworkError(e)) this.emit('error', e);
      });
    }
  }

  /** Something visible may have changed: a new snapshot follows (after the current task, so
   * changes made in one go make one), if its content differs. @param {boolean} fromServer */
  #bump(fromServer) {
    if (!fromServer) this.#snapLocal = true;
    if (this.#snapScheduled) return;
    this.#snapScheduled = true;
    queueMicrotask(() => {
      this.#snapScheduled = false;
      const local = this.#snapLocal;
      this.#snapLocal = false;
      if (this.#closed) return;
      const prev = this.snapshot;
      const next = this.#buildSnapshot(prev.version + 1, local);
      if (sameSnapshot(prev, next)) return;
      this.#version = next.version;
      this.#snap = next;
      this.emit('snapshot', next);
    });
  }

  /** The version of a new local edit (see `#editSeq`). */
  #nextVersion() {
    this.#editSeq += 1;
    return this.#editSeq;
  }

  /** @param {number} version @param {boolean} local @returns {DatasetSnapshot} */
  #buildSnapshot(version, local) {
    const pending = this.pending;
    return Object.freeze({
      version,
      records: this.records(),
      syncCount: this.#state.syncCount,
      pending,
      hasPendingWrites: pending > 0,
      fromServer: !local,
    });
  }

  #scheduleAutoSync() {
    if (!this.#autoSync || this.#revoked || this.#closed || !this.#io.online()) return;
    clearTimeout(this.#autoTimer);
    this.#autoTimer = timer(() => this._backgroundSync(), this.#autoSyncDelay);
  }

  #pendingChanged() {
    if (this.#waiters.size) this.#checkWaiters();
    const n = this.pending;
    if (n !== this.#lastPending) {
      this.#lastPending = n;
      this.#io.pendingChanged(this, n);
      this.emit('pending', n);
    }
  }

  /** Writes the state to the store; saves are serialised and coalesced. */
  #persist() {
    this.#saveWanted = true;
    if (!this.#saving) {
      this.#saving = (async () => {
        try {
          while (this.#saveWanted) {
            this.#saveWanted = false;
            await this.#io.store.save({ identity: this.#io.identity(), owner: this.#owner, name: this.#name }, cloneState(this.#state));
          }
        } catch (e) {
          this.emit('error', new TandemError('internal', `cannot write the offline cache: ${errorMessage(e)}`));
          throw e;
        } finally {
          this.#saving = null;
        }
      })();
    }
    return this.#saving;
  }

  /**
   * Sends the pending changes in as many updates as the server's limits need (`max_patches`,
   * `max_frame_bytes`), each with the sync counts its changes were based on. A change the
   * server refuses for good is set aside and the others go on.
   * @returns {Promise<SyncOutcome>}
   */
  async #syncOnce() {
    this.#checkOpen();
    clearTimeout(this.#autoTimer);
    if (this.#revoked) throw new TandemError('revoked', `access to ${this.#owner}/${this.#name} was revoked`);
    if (!this.#io.online()) throw new TandemError('offline', 'not connected; local changes stay pending');
    if (!this.#subscribed) await this.subscribe();
    this.#setAsideBroken();
    let conflicts = 0;
    let rounds = 0;
    let pushed = 0;
    let syncCount = this.#state.syncCount;
    /** Keys acknowledged in this run: edited again meanwhile, they wait for the next one. */
    const done = new Set();
    /** After a refusal of a whole update that may be one key's fault: one key per update. */
    let oneByOne = false;
    for (;;) {
      const keys = this.dirtyKeys().filter((k) => !done.has(k) && !this.#state.records[k].setAside);
      if (keys.length === 0) break;
      const { patches, versions } = this.#batch(keys, oneByOne);
      let reply;
      this.#io.uploading(1);
      try {
        reply = await this.#io.request({ type: 'update', dataset: this.#ref(), deviceId: this.#io.deviceId, patches });
      } catch (e) {
        this.#io.uploading(-1);
        if (!(e instanceof TandemError) || !e.server) throw e;
        // A limit the server did not announce: learnt from `max`, then split or set aside by it.
        if (this.#io.learn(e.limit, e.max)) {
          this.#setAsideBroken();
          continue;
        }
        if (patches.length > 1 && refusedForGood(e)) {
          oneByOne = true;
          continue;
        }
        if (patches.length === 1 && refusedForGood(e)) {
          this.#putAside(patches[0].key, { code: e.code, limit: e.limit, max: e.max, message: e.message }, true);
          continue;
        }
        throw e;
      }
      this.#io.uploading(-1);
      if (reply.type === 'ack') {
        this.#applyAck(reply, versions);
        pushed += patches.length;
        syncCount = reply.syncCount;
        for (const k of versions.keys()) done.add(k);
        rounds = 0; // the retries are counted per update
        continue;
      }
      if (reply.type !== 'conflict') throw new TandemError('internal', `unexpected reply ${reply.type} to update`);
      conflicts += await this.#resolve(reply.conflicts ?? []);
      if (++rounds > this.#maxRetries) {
        const stuck = this.dirtyKeys().filter((k) => !done.has(k) && !this.#state.records[k].setAside);
        throw new TandemError('conflict', `conflicts still unresolved after ${this.#maxRetries} retries: ${stuck.join(', ')}`, { keys: stuck });
      }
    }
    const outcome = { syncCount: pushed ? syncCount : this.#state.syncCount, pushed, conflicts, setAside: this.setAside().map((a) => a.key) };
    if (pushed || conflicts) this.emit('synced', outcome);
    return outcome;
  }

  /**
   * The next update's patches: the first of `keys`, as many as `max_patches` allows and as
   * fit in a frame of `max_frame_bytes` (at least one).
   * @param {string[]} keys @param {boolean} oneByOne
   */
  #batch(keys, oneByOne) {
    const l = this.#io.limits();
    const most = oneByOne ? 1 : (l.maxPatches ?? Infinity);
    // Room for the frame around the patches; each patch costs its JSON and a comma.
    let room = (l.maxFrameBytes ?? Infinity) - this.#frameBytes([]);
    /** @type {any[]} */ const patches = [];
    /** @type {Map<string, number>} */ const versions = new Map();
    for (const k of keys) {
      if (patches.length >= most) break;
      const r = this.#state.records[k];
      const patch = this.#patch(k, r);
      const bytes = utf8Length(JSON.stringify(patch)) + 1;
      if (patches.length > 0 && bytes > room) break;
      room -= bytes;
      patches.push(patch);
      versions.set(k, r.version);
    }
    return { patches, versions };
  }

  /** @param {any} ack @param {Map<string, number>} versions */
  #applyAck(ack, versions) {
    const st = this.#state;
    /** @type {Map<string, ServerRecord>} */
    const stored = new Map((ack.records ?? []).map((/** @type {ServerRecord} */ r) => [r.key, r]));
    /** @type {string[]} */ const changed = [];
    for (const [k, version] of versions) {
      const local = this.#rec(k);
      const rec = stored.get(k);
      if (!local) {
        // Discarded while the update was on its way, but committed all the same: the server's
        // record is what this copy holds now (the push of this commit may be skipped below).
        if (rec && rec.value !== null) {
          st.records[k] = fromServer(rec, 0);
          changed.push(k);
        }
        continue;
      }
      if (this.#waiters.size) this.#acked.set(k, Math.max(this.#acked.get(k) ?? -1, version));
      // A remove of a key the server did not have writes nothing: the key is absent (0).
      local.syncCount = rec ? rec.syncCount : 0;
      if (local.version !== version) continue; // edited again meanwhile: still dirty, rebased
      local.dirty = false;
      if (rec) takeMetadata(local, rec);
      if (local.value === null) delete st.records[k];
    }
    // Only when nobody else committed in between do we know the whole dataset at this count;
    // otherwise the push (or the next snapshot) brings the others' changes.
    if (ack.syncCount === st.syncCount + 1) st.syncCount = ack.syncCount;
    this.#io.synced(true);
    this.#pendingChanged();
    this.#bump(true);
    this.#persist().catch(() => {});
    if (changed.length) this.emit('change', { syncCount: ack.syncCount, keys: changed.sort(), source: 'remote' });
  }

  /** Asks the handler about each conflict and applies its decisions. Returns how many
   * conflicts the handler resolved. @param {{ key: string, server: ServerRecord | null }[]} list */
  async #resolve(list) {
    let resolved = 0;
    /** @type {string[]} */ const changed = [];
    for (const { key, server } of list) {
      const local = this.#rec(key);
      if (!local || !local.dirty) continue;
      const serverValue = server ? server.value : null;
      if (local.value === serverValue) {
        // The same content (e.g. our own write whose ack was lost): nothing to decide.
        this.#adopt(key, server, local.version);
        continue;
      }
      const version = local.version;
      const resolution = normaliseResolution(await this.#handler({ key, local: { ...local }, server: server ?? null, dataset: this }));
      const now = this.#rec(key);
      if (!now || now.version !== version) continue; // edited again meanwhile: retry as is
      const base = server ? server.syncCount : 0;
      if (resolution.type === 'keepLocal') {
        now.syncCount = base;
      } else if (resolution.type === 'merge') {
        now.syncCount = base;
        now.value = resolution.value;
        now.deviceLastModified = Date.now();
        now.version = this.#nextVersion();
        this.#ownEdit(now); // the merged value is a new edit of this device's
      } else {
        this.#adopt(key, server, version);
        if (serverValue !== local.value) changed.push(key);
      }
      resolved++;
      this.emit('conflict', { key, local: { ...local }, server: server ?? null, resolution });
    }
    this.#pendingChanged();
    this.#bump(true);
    await this.#persist();
    if (changed.length) this.emit('change', { syncCount: this.#state.syncCount, keys: changed.sort(), source: 'remote' });
    return resolved;
  }

  /** Takes the server's record for `key` (clean). @param {string} key @param {ServerRecord | null} server @param {number} version */
  #adopt(key, server, version) {
    if (server && server.value !== null) {
      this.#state.records[key] = fromServer(server, version + 1);
    } else {
      delete this.#state.records[key];
    }
  }
}

/**
 * Shorthand for `TandemClient.connect`.
 * @param {string} url @param {TokenProvider} tokenProvider @param {ClientOptions} [options]
 */
export function connect(url, tokenProvider, options) {
  return TandemClient.connect(url, tokenProvider, options);
}
