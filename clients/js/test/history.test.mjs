// Version history: history pages, readAt, restore (pushed to another client's open copy).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, onlineClient, until, uniqueName } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

test('history lists who changed what; readAt reads the past; restore writes it back as a new commit', async () => {
  const alice = await onlineClient(server, 'alice');
  const bob = await onlineClient(server, 'bob');
  const name = uniqueName();
  const a = await alice.open(name);
  await a.put('title', 'draft');
  await a.put('body', 'hello');
  await a.sync();
  await alice.grant(name, 'bob', 'write');
  const b = await bob.open(name, { owner: 'alice' });
  await b.put('title', 'bob was here');
  await b.sync();
  await until(() => a.get('title') === 'bob was here', 5000, 'alice to see bob\'s edit');

  const page = await alice.history(name);
  assert.equal(page.syncCount, 2);
  assert.equal(page.next, null);
  assert.deepEqual(
    page.entries.map((e) => [e.kind, e.syncCount, e.actor]),
    [
      ['update', 2, 'bob'],
      ['grant', 1, 'alice'],
      ['update', 1, 'alice'],
    ],
  );
  assert.equal(page.entries[0].deviceId, bob.deviceId);
  assert.deepEqual(page.entries[0].keys, ['title']);
  assert.deepEqual(page.entries[2].keys, ['body', 'title']);
  assert.equal(page.entries[1].grantee, 'bob');
  const first = await bob.history({ owner: 'alice', name }, { limit: 1 });
  assert.equal(first.entries.length, 1);
  const rest = await bob.history({ owner: 'alice', name }, { before: first.next });
  assert.deepEqual(rest.entries, page.entries.slice(1));

  const then = await bob.readAt({ owner: 'alice', name }, 1);
  assert.deepEqual(
    then.map((r) => [r.key, r.value, r.syncCount, r.lastModifiedBy]),
    [
      ['body', 'hello', 1, 'alice'],
      ['title', 'draft', 1, 'alice'],
    ],
  );

  const restoredAt = await bob.restore({ owner: 'alice', name }, 1);
  assert.equal(restoredAt, 3);
  await until(() => a.get('title') === 'draft' && a.syncCount === 3, 5000, 'alice to receive the restore');
  const latest = await alice.history(name, { limit: 1 });
  assert.equal(latest.entries[0].actor, 'bob');
  assert.equal(latest.entries[0].syncCount, 3);
  // Nothing left to change: no new commit.
  assert.equal(await alice.restore(name, 3), 3);
  await Promise.all([alice.close(), bob.close()]);
});

test('a reader may read history but not restore; the future and the forgotten are refused', async () => {
  const alice = await onlineClient(server, 'alice');
  const carol = await onlineClient(server, 'carol');
  const name = uniqueName();
  const a = await alice.open(name);
  await a.put('k', 'v');
  await a.sync();
  await alice.grant(name, 'carol', 'read');
  const page = await carol.history({ owner: 'alice', name });
  assert.equal(page.entries.length, 2);
  await assert.rejects(carol.restore({ owner: 'alice', name }, 0), (e) => e.code === 'forbidden' && e.server === true);
  await assert.rejects(alice.readAt(name, 99), (e) => e.code === 'bad_request');
  await assert.rejects(carol.history({ owner: 'alice', name: uniqueName() }), (e) => e.code === 'forbidden');
  await Promise.all([alice.close(), carol.close()]);
});
