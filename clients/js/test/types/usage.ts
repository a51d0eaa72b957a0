// Compiled by `npm run typecheck` (tsc --noEmit): the declarations in src/tandem.d.ts cover
// the README's usage.
import { TandemClient, Resolution, ConflictHandlers, MemoryStore, TandemError, type ConflictCase } from '../../src/tandem.js';

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
  const out = await ds.sync().catch((e: TandemError) => (e.code === 'conflict' ? e.keys : undefined));
  ds.on('conflict', ({ key, resolution }) => console.log(key, resolution.type));
  for await (const change of ds.remoteChanges()) console.log(change.keys.join(), change.syncCount);
  const handler = ConflictHandlers.takeRemote;
  void [theme, out, handler, on];
  await client.close();
}
void example;
