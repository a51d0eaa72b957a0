// Type declarations for react.js (`@tandem/client/react`). Keep in sync with the JSDoc there.

import type { TandemClient, Dataset, DatasetSnapshot, OpenOptions, SyncStatus, TandemError } from './tandem.js';

/** The client's sync status, re-rendering when a field changes. */
export function useSyncStatus(client: TandemClient): SyncStatus;

export interface UseDatasetResult {
  /** The open handle; null until `open` resolved. Shared: unmounting does not close it. */
  dataset: Dataset | null;
  /** The dataset's current snapshot; null until open. */
  snapshot: DatasetSnapshot | null;
  /** What `open` rejected with (e.g. `forbidden`). */
  error: TandemError | null;
  /** Neither open nor failed yet. */
  loading: boolean;
}

/** Opens a dataset and follows its snapshots; opened again when `client`, `name` or `options.owner` change. */
export function useDataset(client: TandemClient, name: string, options?: OpenOptions): UseDatasetResult;

/** One record's value, re-rendering only when it changes; `undefined` when absent or while `dataset` is null. */
export function useRecord(dataset: Dataset | null | undefined, key: string): string | undefined;
