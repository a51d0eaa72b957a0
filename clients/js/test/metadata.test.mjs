// Record metadata (`lastModified`, `lastModifiedBy`, `deviceId`) in the local record: taken
// from the server's record on every merge and ack, this client's own for a local edit until
// acknowledged, and kept in the offline cache. The same rules as the Rust SDK's
// `LocalRecord`. Real server; several clients as devices and users.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { TandemClient, MemoryStore, AsyncStorageStore, Resolution } from '../src/tandem.js';
import { startServer, onlineClient, until, uniqueName, WebSocketImpl, MemoryAsyncStorage } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

/** The metadata of a local record. */
const meta = (r) => ({ lastModified: r?.lastModified, lastModifiedBy: r?.lastModifiedBy, deviceId: r?.deviceId });

test('a local edit is this device\'s until acknowledged; the ack stamps it with the server\'s time', async () => {
  const name = uniqueName();
  const laptop = await onlineClient(server, 'alice', { deviceId: 'laptop' });
  const ds = await laptop.open(name);
  await ds.put('k', '1');
  assert.deepEqual(meta(ds.record('k')), { lastModified: undefined, lastModifiedBy: 'alice', deviceId: 'laptop' });
  const before = Date.now();
  await ds.sync();
  const acked = ds.record('k');
  assert.equal(acked.dirty, false);
  assert.equal(typeof acked.lastModified, 'number');
  assert.ok(acked.lastModified >= before - 60_000 && acked.lastModified <= Date.now() + 60_000, `server time ${acked.lastModified}`);
  assert.equal(acked.lastModifiedBy, 'alice');
  assert.equal(acked.deviceId, 'laptop');
  // Edited again: ours again, not yet stamped; a removal too.
  await ds.put('k', '2');
  assert.deepEqual(meta(ds.record('k')), { lastModified: undefined, lastModifiedBy: 'alice', deviceId: 'laptop' });
  await ds.sync();
  assert.ok(ds.record('k').lastModified >= acked.lastModified);
  await ds.remove('k');
  assert.deepEqual(meta(ds.record('k')), { lastModified: undefined, lastModifiedBy: 'alice', deviceId: 'laptop' });
  await laptop.close();
});

for (const features of [['delta', 'lean'], []]) {
  const kind = features.length ? 'delta pushes, lean records' : 'whole-dataset pushes, full records';
  test(`another device's and another user's writes arrive with their metadata (${kind})`, async () => {
    const name = uniqueName();
    const laptop = await onlineClient(server, 'alice', { deviceId: 'laptop', features });
    const phone = await onlineClient(server, 'alice', { deviceId: 'phone', features });
    const tablet = await onlineClient(server, 'bob', { deviceId: 'bob-tablet', features });
    const mine = await laptop.open(name);
    await mine.put('seed', '0');
    await mine.sync();
    await laptop.grant(name, 'bob', 'write');
    const onPhone = await phone.open(name);
    const onTablet = await tablet.open(name, { owner: 'alice' });

    await onPhone.put('p', 'from the phone');
    await onPhone.sync();
    await until(() => mine.get('p') === 'from the phone', 5000, 'the phone\'s write on the laptop');
    assert.deepEqual(meta(mine.record('p')), { lastModified: onPhone.record('p').lastModified, lastModifiedBy: 'alice', deviceId: 'phone' });
    assert.equal(typeof mine.record('p').lastModified, 'number');

    await onTablet.put('b', 'from bob');
    await onTablet.sync();
    await until(() => mine.get('b') === 'from bob', 5000, 'bob\'s write on the laptop');
    assert.deepEqual(meta(mine.record('b')), { lastModified: onTablet.record('b').lastModified, lastModifiedBy: 'bob', deviceId: 'bob-tablet' });
    // Bob's copy knows who wrote the owner's records too.
    await until(() => onTablet.get('p') === 'from the phone', 5000, 'the phone\'s write on bob\'s tablet');
    assert.deepEqual(meta(onTablet.record('p')), meta(mine.record('p')));
    assert.deepEqual(meta(onTablet.record('seed')), meta(mine.record('seed')));
    assert.equal(onTablet.record('seed').deviceId, 'laptop');

    // A new subscription's snapshot carries them as well.
    const fresh = await onlineClient(server, 'alice', { deviceId: 'desktop', features });
    const copy = await fresh.open(name);
    for (const k of ['seed', 'p', 'b']) assert.deepEqual(meta(copy.record(k)), meta(mine.record(k)), k);
    await Promise.all([laptop.close(), phone.close(), tablet.close(), fresh.close()]);
  });
}

test('conflicts resolved either way leave the winner\'s metadata', async () => {
  const name = uniqueName();
  const handler = (c) => (c.key === 'theirs' ? Resolution.takeRemote() : c.key === 'mine' ? Resolution.keepLocal() : Resolution.merge('both'));
  const laptop = await onlineClient(server, 'alice', { deviceId: 'laptop', conflictHandler: handler });
  const phone = await onlineClient(server, 'alice', { deviceId: 'phone' });
  const ds = await laptop.open(name);
  for (const k of ['theirs', 'mine', 'merged']) await ds.put(k, 'base');
  await ds.sync();
  const onPhone = await phone.open(name);
  assert.equal(onPhone.get('merged'), 'base');

  laptop.pause();
  for (const k of ['theirs', 'mine', 'merged']) await onPhone.put(k, 'phone');
  await onPhone.sync();
  for (const k of ['theirs', 'mine', 'merged']) await ds.put(k, 'laptop');
  assert.deepEqual(meta(ds.record('theirs')), { lastModified: undefined, lastModifiedBy: 'alice', deviceId: 'laptop' });

  const resolved = [];
  ds.on('conflict', (c) => resolved.push(c.key));
  laptop.resume();
  await laptop.waitOnline(5000);
  await laptop.flush({ timeoutMs: 5000 });
  assert.deepEqual(resolved.sort(), ['merged', 'mine', 'theirs']);

  // Taken from the server: the phone's write, as the phone knows it.
  assert.equal(ds.get('theirs'), 'phone');
  assert.deepEqual(meta(ds.record('theirs')), meta(onPhone.record('theirs')));
  assert.equal(ds.record('theirs').deviceId, 'phone');
  // Kept or merged here: written again by the laptop, stamped by its ack.
  for (const k of ['mine', 'merged']) {
    const r = ds.record(k);
    assert.equal(r.deviceId, 'laptop', k);
    assert.equal(r.lastModifiedBy, 'alice', k);
    assert.ok(r.lastModified >= onPhone.record(k).lastModified, `${k}: stamped after the phone's write`);
  }
  assert.equal(ds.get('merged'), 'both');
  // The phone hears of the laptop's writes with the laptop's device.
  await until(() => onPhone.get('merged') === 'both' && onPhone.get('mine') === 'laptop', 5000, 'the laptop\'s writes on the phone');
  assert.deepEqual(meta(onPhone.record('mine')), meta(ds.record('mine')));
  assert.deepEqual(meta(onPhone.record('merged')), meta(ds.record('merged')));
  await Promise.all([laptop.close(), phone.close()]);
});

const stores = {
  MemoryStore: () => new MemoryStore(),
  AsyncStorageStore: () => new AsyncStorageStore(new MemoryAsyncStorage()),
};

for (const [kind, make] of Object.entries(stores)) {
  test(`${kind}: reopening from the cache, offline, keeps the metadata`, async () => {
    const name = uniqueName();
    const store = make();
    const laptop = await onlineClient(server, 'alice', { deviceId: 'laptop', store });
    const phone = await onlineClient(server, 'alice', { deviceId: 'phone' });
    const ds = await laptop.open(name);
    await ds.put('mine', '1');
    await ds.sync();
    const onPhone = await phone.open(name);
    await onPhone.put('theirs', '2');
    await onPhone.sync();
    await until(() => ds.get('theirs') === '2', 5000, 'the phone\'s write');
    await ds.put('pending', '3');
    const before = { mine: ds.record('mine'), theirs: ds.record('theirs'), pending: ds.record('pending') };
    assert.equal(before.theirs.deviceId, 'phone');
    assert.equal(typeof before.mine.lastModified, 'number');
    await laptop.close();

    // Another client on this device's store, with no server to reach.
    const offline = TandemClient.connect('ws://127.0.0.1:9/v1/sync', 'unused', {
      WebSocket: WebSocketImpl,
      identity: 'alice',
      deviceId: 'laptop-after-restart',
      store,
      backoff: { initialMs: 1000, maxMs: 1000 },
    });
    const cached = await offline.open(name);
    assert.equal(offline.online, false);
    assert.deepEqual(cached.record('mine'), before.mine);
    assert.deepEqual(cached.record('theirs'), before.theirs);
    // The pending edit is still the one made on the laptop, not yet stamped.
    assert.deepEqual(cached.record('pending'), before.pending);
    assert.deepEqual(meta(cached.record('pending')), { lastModified: undefined, lastModifiedBy: 'alice', deviceId: 'laptop' });
    await Promise.all([offline.close(), phone.close()]);
  });
}
