// Compiled by `npm run typecheck`: the React entry's declarations (src/react.d.ts), used as
// an app would, through the package's exports map.
import { TandemClient, AsyncStorageStore, type SyncStatus, type DatasetSnapshot, type Dataset } from '@tandem/client';
import { useDataset, useRecord, useSyncStatus } from '@tandem/client/react';

export function useExample(client: TandemClient): string {
  const status: SyncStatus = useSyncStatus(client);
  const { dataset, snapshot, error, loading } = useDataset(client, 'settings', { owner: 'alice' });
  const ds: Dataset | null = dataset;
  const snap: DatasetSnapshot | null = snapshot;
  const theme: string | undefined = useRecord(ds, 'theme');
  const since: number | null = status.lastSyncedAt;
  return `${theme ?? ''} ${snap?.version ?? 0} ${error?.code ?? ''} ${loading} ${status.connected} ${since}`;
}

export async function signOut(client: TandemClient): Promise<void> {
  try {
    await client.wipe();
  } catch (e) {
    const err = e as { code?: string; keys?: string[] };
    if (err.code === 'pending_writes') {
      const unsynced = (await client.cachedDatasets()).filter((d) => d.pending > 0).map((d) => `${d.owner}/${d.name}`);
      console.warn('unsynced', unsynced, err.keys);
      await client.flush({ timeoutMs: 10_000 });
      await client.wipe({ force: false });
    }
  }
  client.pause();
  client.resume();
  await client.waitForPendingWrites();
  const off = client.onStatus((s) => console.log(s.pending, s.uploading, s.hasSynced, s.lastError?.message));
  off();
  const p: number | null = client.protocol;
  console.log(p, client.paused);
}

export function reactNative(storage: { getItem(k: string): Promise<string | null>; setItem(k: string, v: string): Promise<void>; removeItem(k: string): Promise<void>; getAllKeys(): Promise<readonly string[]> }): TandemClient {
  return TandemClient.connect('wss://sync.example.com', async () => 'token', { store: new AsyncStorageStore(storage, { prefix: 'app:' }) });
}
