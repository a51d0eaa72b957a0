// Sharing: grants, remote delete notices, revoke notices.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, onlineClient, nextEvent, until, uniqueName } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

test('without a grant, opening another user\'s dataset is refused', async () => {
  const alice = await onlineClient(server, 'alice');
  const bob = await onlineClient(server, 'bob');
  const name = uniqueName();
  const a = await alice.open(name);
  await a.put('k', 'v');
  await a.sync();
  await assert.rejects(bob.open(name, { owner: 'alice' }), (e) => e.code === 'forbidden' && e.server === true);
  await alice.grant(name, 'bob', 'read');
  const b = await bob.open(name, { owner: 'alice' });
  assert.equal(b.get('k'), 'v');
  // Read access: writes stay local and the sync is refused.
  await b.put('k', 'bob');
  await assert.rejects(b.sync(), (e) => e.code === 'forbidden');
  assert.equal(b.pending, 1);
  const list = await bob.listDatasets();
  assert.ok(list.some((d) => d.dataset.owner === 'alice' && d.dataset.name === name && d.access === 'read'));
  await Promise.all([alice.close(), bob.close()]);
});

test('a remote delete is announced; clean records go, local changes stay and re-create it', async () => {
  const alice = await onlineClient(server, 'alice');
  const bob = await onlineClient(server, 'bob');
  const name = uniqueName();
  const a = await alice.open(name);
  await alice.grant(name, 'bob', 'write');
  const b = await bob.open(name, { owner: 'alice' });
  await a.put('milk', '1');
  await a.put('eggs', '12');
  await a.sync();
  await until(() => b.get('eggs') === '12', 2000, 'bob to see the records');
  await b.put('milk', 'bob-unsynced');

  const bobDeleted = nextEvent(b, 'deleted');
  const aliceDeleted = nextEvent(a, 'deleted');
  const deletedAt = await alice.deleteDataset(name);
  const ev = await bobDeleted;
  assert.equal(ev.syncCount, deletedAt);
  await aliceDeleted;
  assert.equal(b.deleted, true);
  assert.equal(b.subscribed, false);
  assert.equal(b.get('eggs'), undefined, 'the clean record was dropped');
  assert.equal(b.get('milk'), 'bob-unsynced', 'the local change was kept');
  assert.equal(b.record('milk').syncCount, 0, 'based on nothing now');
  assert.equal(a.records().size, 0);

  // Deleting also removed the grant (protocol §7): following it again, Bob finds he has no
  // access any more, and cannot re-create it...
  await until(() => b.revoked, 2000, 'bob to find his grant gone');
  await assert.rejects(b.sync(), (e) => e.code === 'revoked');
  // ...until Alice shares it again; then he follows it again and his sync re-creates the
  // dataset with his change.
  await alice.grant(name, 'bob', 'write');
  await b.subscribe();
  const out = await b.sync();
  assert.ok(out.syncCount > deletedAt, 'sync counts continue above the delete');
  assert.equal(b.deleted, false);
  assert.equal(b.pending, 0);
  await a.subscribe();
  assert.deepEqual([...a.records()], [['milk', 'bob-unsynced']]);
  await Promise.all([alice.close(), bob.close()]);
});

test('a revoke is announced and the dataset stops syncing', async () => {
  const alice = await onlineClient(server, 'alice');
  const bob = await onlineClient(server, 'bob');
  const name = uniqueName();
  const a = await alice.open(name);
  await alice.grant(name, 'bob', 'write');
  const b = await bob.open(name, { owner: 'alice', autoSync: true });
  await a.put('milk', '1');
  await a.sync();
  await until(() => b.get('milk') === '1', 2000, 'bob to see milk');

  const revoked = nextEvent(b, 'revoked');
  await alice.revoke(name, 'bob');
  const ev = await revoked;
  assert.equal(ev.reason, 'revoked');
  assert.equal(b.revoked, true);
  assert.equal(b.get('milk'), '1', 'local data stays readable');
  await b.put('milk', 'bob'); // local only now
  await assert.rejects(b.sync(), (e) => e.code === 'revoked');
  await a.put('milk', '2');
  await a.sync();
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(b.get('milk'), 'bob', 'no more pushes');
  assert.equal(b.pending, 1, 'the local change is not dropped');

  // Shared again: an explicit subscribe follows it again.
  await alice.grant(name, 'bob', 'write');
  await b.subscribe();
  assert.equal(b.revoked, false);
  await Promise.all([alice.close(), bob.close()]);
});
