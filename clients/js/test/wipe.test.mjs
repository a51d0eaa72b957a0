// Sign-out (wipe of one identity's local data), the list of cached datasets, and the stores
// behind them: memory, and the AsyncStorage adapter for React Native over an in-memory
// AsyncStorage (IndexedDB is covered in the browser, test/browser.test.mjs). Real server.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore, AsyncStorageStore, TandemError } from '../src/tandem.js';
import { startServer, onlineClient, controlledClient, until, uniqueName, MemoryAsyncStorage } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

const stores = {
  MemoryStore: () => new MemoryStore(),
  AsyncStorageStore: () => new AsyncStorageStore(new MemoryAsyncStorage()),
};

for (const [kind, make] of Object.entries(stores)) {
  test(`${kind}: load, save, list and remove by identity`, async () => {
    const store = make();
    const state = { syncCount: 3, records: { k: { value: 'v', syncCount: 3, dirty: true, version: 2, deviceLastModified: 5 } } };
    assert.equal(await store.load({ identity: 'alice', owner: 'alice', name: 'a' }), null);
    await store.save({ identity: 'alice', owner: 'alice', name: 'a' }, state);
    await store.save({ identity: 'alice', owner: 'bob', name: 'shared' }, state);
    await store.save({ identity: 'bob', owner: 'bob', name: 'shared' }, state);
    state.records.k.value = 'changed after the save';
    assert.equal((await store.load({ identity: 'alice', owner: 'alice', name: 'a' })).records.k.value, 'v', 'a save is a copy');
    const names = (l) => l.map((r) => `${r.owner}/${r.name}`).sort();
    assert.deepEqual(names(await store.list('alice')), ['alice/a', 'bob/shared']);
    assert.deepEqual(names(await store.list('bob')), ['bob/shared']);
    assert.deepEqual(await store.list('carol'), []);
    await store.remove({ identity: 'alice', owner: 'bob', name: 'shared' });
    assert.deepEqual(names(await store.list('alice')), ['alice/a']);
    assert.notEqual(await store.load({ identity: 'bob', owner: 'bob', name: 'shared' }), null, "bob's copy stays");
  });

  test(`${kind}: offline edits survive a client restart and are sent by the next client`, async () => {
    const name = uniqueName();
    const store = make();
    const ctl = controlledClient(server, 'alice', { store }, { startDown: true });
    const d = await ctl.client.open(name);
    await d.put('kept', 'across restarts');
    await ctl.client.close();
    const next = await onlineClient(server, 'alice', { store });
    const d2 = await next.open(name);
    assert.equal(d2.get('kept'), 'across restarts');
    await until(() => d2.pending === 0, 5000, 'the change to be sent');
    await next.close();
  });
}

test('AsyncStorageStore refuses an object without the AsyncStorage methods, and skips foreign keys', async () => {
  assert.throws(() => new AsyncStorageStore({ getItem() {} }), (e) => e instanceof TandemError && e.code === 'bad_request' && /setItem/.test(e.message));
  const storage = new MemoryAsyncStorage();
  await storage.setItem('tandem:not json', 'x');
  await storage.setItem('other-lib', 'x');
  const store = new AsyncStorageStore(storage, { prefix: 'tandem:' });
  await store.save({ identity: 'alice', owner: 'alice', name: 'a' }, { syncCount: 0, records: {} });
  assert.deepEqual(await store.list('alice'), [{ owner: 'alice', name: 'a' }]);
  assert.ok(storage.map.has('tandem:["alice","alice","a"]'));
});

test('cachedDatasets lists open, closed and never-opened cached datasets with their pending counts', async () => {
  const store = new MemoryStore();
  const [n1, n2, n3] = [uniqueName('a'), uniqueName('b'), uniqueName('c')];
  // A former session left an unsynced change in n3.
  const former = controlledClient(server, 'alice', { store }, { startDown: true });
  await (await former.client.open(n3)).put('left', 'behind');
  await former.client.close();

  const c = await onlineClient(server, 'alice', { store });
  const d1 = await c.open(n1);
  await d1.put('x', '1');
  const d2 = await c.open(n2);
  await d2.put('y', '2');
  await c.flush();
  await d1.put('x', 'unsynced');
  const list = await c.cachedDatasets();
  const byName = Object.fromEntries(list.map((e) => [e.name, e]));
  assert.deepEqual(byName[n1], { owner: 'alice', name: n1, records: 1, pending: 1, syncCount: d1.syncCount, open: true });
  assert.deepEqual(byName[n2], { owner: 'alice', name: n2, records: 1, pending: 0, syncCount: d2.syncCount, open: true });
  assert.deepEqual(byName[n3], { owner: 'alice', name: n3, records: 1, pending: 1, syncCount: 0, open: false });
  await c.close();
});

test('wipe refuses while writes are pending (deleting nothing), forced wipes only this identity', async () => {
  const store = new MemoryStore();
  const [n1, n3] = [uniqueName('a'), uniqueName('c')];
  const former = controlledClient(server, 'alice', { store }, { startDown: true });
  await (await former.client.open(n3)).put('left', 'behind');
  await former.client.close();
  const bob = await onlineClient(server, 'bob', { store });
  await (await bob.open('bobs')).put('b', '1');
  await bob.flush();
  await bob.close();

  const c = await onlineClient(server, 'alice', { store });
  const d1 = await c.open(n1);
  await d1.put('x', '1');
  await assert.rejects(c.wipe(), (e) => {
    assert.equal(e.code, 'pending_writes');
    assert.deepEqual(e.keys.sort(), [`alice/${n1}`, `alice/${n3}`].sort());
    assert.match(e.message, /2 local changes not yet synced/);
    return true;
  });
  assert.equal(c.state, 'online', 'a refused wipe leaves the client running');
  assert.equal(d1.get('x'), '1');
  assert.equal((await store.list('alice')).length, 2, 'nothing deleted');

  const removed = await c.wipe({ force: true });
  assert.deepEqual(removed.map((r) => r.name).sort(), [n1, n3].sort());
  assert.equal(c.state, 'closed');
  assert.deepEqual(await store.list('alice'), []);
  assert.deepEqual(await store.list('bob'), [{ owner: 'bob', name: 'bobs' }], "bob's cache untouched");
  assert.equal(d1.get('x'), undefined, 'the open handle forgot its state');
  await assert.rejects(d1.put('y', '1'), { code: 'closed' });
  assert.equal(c.pending, 0);

  // Reopening reads nothing: the unsynced changes are gone from this device.
  const again = controlledClient(server, 'alice', { store }, { startDown: true });
  const r3 = await again.client.open(n3);
  assert.deepEqual([...r3.records()], []);
  assert.equal(again.client.pending, 0);
  await again.client.close();
});

test('wipe succeeds unforced once everything is synced', async () => {
  const store = new MemoryStore();
  const c = await onlineClient(server, 'alice', { store });
  const d = await c.open(uniqueName());
  await d.put('x', '1');
  await assert.rejects(c.wipe(), { code: 'pending_writes' });
  await c.flush();
  const removed = await c.wipe();
  assert.equal(removed.length, 1);
  assert.deepEqual(await store.list('alice'), []);
});

test('wipe and cachedDatasets need a store that can list and remove', async () => {
  const bare = new MemoryStore();
  const store = { load: (r) => bare.load(r), save: (r, s) => bare.save(r, s) };
  const c = await onlineClient(server, 'alice', { store });
  await assert.rejects(c.wipe({ force: true }), (e) => e.code === 'bad_request' && /list and remove/.test(e.message));
  await assert.rejects(c.cachedDatasets(), { code: 'bad_request' });
  assert.equal(c.state, 'online');
  await c.close();
});
