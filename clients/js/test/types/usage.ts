// Compiled by `npm run typecheck` (tsc --noEmit): the declarations in src/tandem.d.ts cover
// the README's usage.
import { TandemClient, Resolution, ConflictHandlers, MemoryStore, TandemError, type ConflictCase, type DatasetSnapshot, type WriteLimits } from '../../src/tandem.js';

async function example(): Promise<void> {
  const client = TandemClient.connect('ws://127.0.0.1:7420/v1/sync', async () => 'token', {
    identity: 'alice',
    store: new MemoryStore(),
    conflictHandler: 'latestDeviceTime',
    features: ['lean'],
  });
  const on: string[] = client.features;
  client.on('state', (s) => console.log(s.toUpperCase()));
  const ds = await client.open('settings', { conflictHandler: (c: ConflictCase) => (c.server ? Resolution.merge(`${c.server.value}|${c.local.value}`) : Resolution.keepLocal()) });
  await ds.put('theme', 'dark');
  const theme: string | undefined = ds.get('theme');
  const rec = ds.record('theme');
  const stamped: number | undefined = rec?.lastModified; // undefined: a local edit not yet acknowledged
  const writer: string = `${rec?.lastModifiedBy ?? '?'}@${rec?.deviceId ?? '?'}`;
  const out = await ds.sync().catch((e: TandemError) => (e.code === 'conflict' ? e.keys : undefined));
  ds.on('conflict', ({ key, resolution }) => console.log(key, resolution.type));
  for await (const change of ds.remoteChanges()) console.log(change.keys.join(), change.syncCount);
  const handler = ConflictHandlers.takeRemote;
  const page = await client.history('settings', { limit: 20 });
  const older = page.next === null ? null : await client.history({ owner: 'bob', name: 'shared' }, { before: page.next });
  const who: string[] = page.entries.map((e) => `${e.actor}@${e.deviceId ?? '?'}: ${(e.keys ?? []).join()}`);
  const then = await client.readAt('settings', page.syncCount - 1);
  const restoredAt: number = await client.restore('settings', then.length ? then[0].syncCount : 0);
  // The shape React's useSyncExternalStore wants: subscribe returns the unsubscribe, the
  // snapshot is one stable object per version.
  const subscribe = (cb: () => void) => ds.onSnapshot(cb);
  const getSnapshot = (): DatasetSnapshot => ds.snapshot;
  const limits: WriteLimits = client.limits;
  const aside: string[] = ds.setAside().map((a) => `${a.key}: ${a.code} ${a.limit ?? ''}`);
  const dropped: string[] = ds.revert();
  const kept: boolean = ds.discard('theme');
  ds.on('error', (e) => e.key && console.log(`${e.key} set aside: ${e.code}`));
  ds.on('deleted', ({ policy }) => console.log(policy));
  ds.setConflictHandler('keepLocal');
  await client.open('other', { onDatasetDeleted: ({ syncCount }) => (syncCount > 10 ? 'drop' : 'keepAll') });
  void [theme, out, handler, on, older, who, restoredAt, subscribe, getSnapshot, limits, aside, dropped, kept];
  await client.close();
}
void example;
