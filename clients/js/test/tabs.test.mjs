// Two "tabs" of one user: clients that share one cache and a BroadcastChannel, as two tabs
// of a browser profile share IndexedDB. (The browser test runs the same in real tabs.)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '../src/tandem.js';
import { startServer, onlineClient, nextEvent, until, uniqueName, mintToken } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

test('a local edit in one tab is pending in the other; one commit, and both end clean', async () => {
  const store = new MemoryStore();
  const name = uniqueName();
  const tab1 = await onlineClient(server, 'alice', { store, crossTab: true });
  const tab2 = await onlineClient(server, 'alice', { store, crossTab: true });
  const d1 = await tab1.open(name);
  const d2 = await tab2.open(name);

  const seen = nextEvent(d2, 'change');
  await d1.put('draft', 'hello');
  const ev = await seen;
  assert.deepEqual(ev.keys, ['draft']);
  assert.equal(ev.source, 'tab');
  assert.equal(d2.get('draft'), 'hello');
  assert.equal(d2.pending, 1, 'the other tab holds the edit as pending too');

  // The second tab syncs it; the first sees its own value come back and drops it as done.
  const out = await d2.sync();
  assert.equal(out.pushed, 1);
  await until(() => d1.pending === 0, 2000, 'the first tab to see its edit committed');
  assert.equal(d1.record('draft').syncCount, out.syncCount);
  const again = await d1.sync();
  assert.equal(again.pushed, 0, 'nothing left to send');

  // Exactly one commit reached the server.
  const check = await onlineClient(server, 'alice');
  const d = await check.open(name);
  assert.equal(d.syncCount, 1);
  assert.equal(d.get('draft'), 'hello');
  await Promise.all([tab1.close(), tab2.close(), check.close()]);
});

test('tabs of other identities, and clients without crossTab, hear nothing', async () => {
  const name = uniqueName();
  const alice = await onlineClient(server, 'alice', { crossTab: true });
  const bob = await onlineClient(server, 'bob', { crossTab: true });
  const plain = await onlineClient(server, 'alice');
  const a = await alice.open(name);
  const b = await bob.open(name, { owner: 'alice' }).catch(() => null);
  const p = await plain.open(name);
  await a.put('k', 'v');
  // A round trip through the server orders this after any channel message.
  await alice.ping();
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(p.get('k'), undefined);
  assert.equal(p.pending, 0);
  if (b) assert.equal(b.pending, 0);
  await Promise.all([alice.close(), bob.close(), plain.close()]);
});
