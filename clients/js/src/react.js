// React hooks for the Tandem JavaScript SDK: a small separate entry (`@tandem/client/react`),
// with React (18 or later) as a peer dependency. Built on the SDK's immutable snapshots and
// status objects, read through React's useSyncExternalStore, so a component renders again
// only when what it reads changed.

import { useCallback, useEffect, useState, useSyncExternalStore } from 'react';

/** @typedef {import('./tandem.js').TandemClient} TandemClient */
/** @typedef {import('./tandem.js').Dataset} Dataset */

/**
 * The client's sync status (`client.status`): `{connected, uploading, pending, lastSyncedAt,
 * hasSynced, lastError}`, the same object until a field changes.
 * @param {TandemClient} client
 */
export function useSyncStatus(client) {
  const subscribe = useCallback((/** @type {() => void} */ cb) => client.on('status', cb), [client]);
  const get = () => client.status;
  return useSyncExternalStore(subscribe, get, get);
}

/**
 * Opens a dataset (`client.open(name, options)`) and follows its snapshots. Returns
 * `{dataset, snapshot, error, loading}`: `dataset` and `snapshot` are null until it is open,
 * `error` is what `open` rejected with. The handle is shared with every other user of the
 * dataset on this client, so unmounting does not close it. The dataset is opened again when
 * `client`, `name` or `options.owner` change, or when the handle closes (after a `wipe()`
 * that open fails with `closed`: the hook shows the error, not the old records); other
 * options are read at that time only.
 * @param {TandemClient} client
 * @param {string} name
 * @param {import('./tandem.js').OpenOptions} [options]
 */
export function useDataset(client, name, options) {
  const owner = options?.owner;
  const [opened, setOpened] = useState(
    /** @type {{ key: string, dataset: Dataset | null, error: any }} */ ({ key: '', dataset: null, error: null }),
  );
  const key = JSON.stringify([owner ?? null, name]);
  // Bumped when the open handle closes (another user of it, or a wipe): open it again.
  const [generation, setGeneration] = useState(0);
  useEffect(() => {
    let live = true;
    client.open(name, options).then(
      (dataset) => live && setOpened({ key, dataset, error: null }),
      (error) => live && setOpened({ key, dataset: null, error }),
    );
    return () => {
      live = false;
    };
    // Other options are read when the dataset is opened (an open handle keeps its own).
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [client, key, generation]);
  // Until the effect for another name has run, what was opened for the old one is not shown.
  const current = opened.key === key ? opened : { dataset: null, error: null };
  const dataset = current.dataset;
  useEffect(() => (dataset ? dataset.on('close', () => setGeneration((g) => g + 1)) : undefined), [dataset]);
  const subscribe = useCallback((/** @type {() => void} */ cb) => (dataset ? dataset.on('snapshot', cb) : () => {}), [dataset]);
  const get = () => (dataset ? dataset.snapshot : null);
  const snapshot = useSyncExternalStore(subscribe, get, get);
  return { dataset, snapshot, error: current.error, loading: !dataset && !current.error };
}

/**
 * One record's value (`undefined` when absent; also while `dataset` is null), re-rendering
 * only when that value changes.
 * @param {Dataset | null | undefined} dataset
 * @param {string} key
 * @returns {string | undefined}
 */
export function useRecord(dataset, key) {
  const subscribe = useCallback((/** @type {() => void} */ cb) => (dataset ? dataset.on('snapshot', cb) : () => {}), [dataset]);
  const get = () => (dataset ? dataset.snapshot.records.get(key) : undefined);
  return useSyncExternalStore(subscribe, get, get);
}
