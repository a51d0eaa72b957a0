// The shared scenario list (clients/SCENARIOS.md), JavaScript side: each test is named by
// its scenario id and follows the steps written there, against real servers (one with the
// default limits, one with small ones).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStore } from '../src/tandem.js';
import { startServer, client, onlineClient, controlledClient, nextEvent, until, uniqueName, sleep } from './helpers.mjs';

let server;
let small;
before(async () => {
  server = await startServer();
  // S5: limits small enough to hit from a test.
  small = await startServer({ extraArgs: ['--max-key-length', '8', '--max-patches', '3', '--max-records', '8', '--max-dataset-bytes', '4096', '--max-frame-bytes', '2048'] });
});
after(async () => {
  await server?.close();
  await small?.close();
});

/** Collects a dataset's `error` events. */
function errors(ds) {
  const seen = [];
  ds.on('error', (e) => seen.push(e));
  return seen;
}

// --- S1 offline edits ---------------------------------------------------------------------

test('S1.1 offline edits are visible at once, pending, and sent after reconnecting', async () => {
  const name = uniqueName();
  const ctl = controlledClient(server, 'alice');
  await ctl.client.waitOnline(5000);
  const d = await ctl.client.open(name);
  ctl.cut();
  await d.put('milk', '1');
  await d.put('eggs', '12');
  await d.remove('eggs');
  assert.deepEqual([...d.records()], [['milk', '1']]);
  assert.equal(d.pending, 2, 'milk, and the removal of eggs');
  ctl.restore();
  await until(() => d.pending === 0, 5000, 'the offline edits to be sent');
  const other = await onlineClient(server, 'alice');
  const o = await other.open(name);
  assert.deepEqual([...o.records()], [['milk', '1']]);
  await Promise.all([ctl.client.close(), other.close()]);
});

test('S1.2 editing or removing a key that is already pending is a change event and a new snapshot', async () => {
  const ctl = controlledClient(server, 'alice');
  await ctl.client.waitOnline(5000);
  const d = await ctl.client.open(uniqueName());
  ctl.cut();
  await d.put('item', 'a');
  const changes = [];
  d.on('change', (e) => changes.push(e));
  await d.put('item', 'b'); // already pending
  await d.remove('item'); // already pending
  assert.deepEqual(
    changes.map((e) => [e.source, e.keys]),
    [
      ['local', ['item']],
      ['local', ['item']],
    ],
  );
  await d.put('item', 'c');
  const snaps = [];
  const off = d.onSnapshot((s) => snaps.push(s));
  assert.equal(snaps.at(-1).records.get('item'), 'c');
  await d.remove('item'); // already pending
  await until(() => snaps.length >= 2, 2000, 'a new snapshot');
  const last = snaps.at(-1);
  assert.equal(last.records.has('item'), false, 'the removed pending item is gone from the snapshot at once');
  assert.equal(last.hasPendingWrites, true);
  assert.equal(last.fromServer, false);
  off();
  await ctl.client.close();
});

// --- S2 conflicts ---------------------------------------------------------------------------

test('S2.1 both sides edit one key offline: the later edit wins on both, the other side is told', async () => {
  const name = uniqueName();
  const a = controlledClient(server, 'alice');
  const b = controlledClient(server, 'alice');
  await Promise.all([a.client.waitOnline(5000), b.client.waitOnline(5000)]);
  const da = await a.client.open(name);
  const db = await b.client.open(name);
  await da.put('title', 'v0');
  await da.sync();
  await until(() => db.get('title') === 'v0', 2000, 'b to see v0');
  a.cut();
  b.cut();
  await da.put('title', 'from-a');
  await sleep(5); // device clocks must differ for latestDeviceTime
  await db.put('title', 'from-b');
  a.restore();
  await until(() => da.pending === 0, 5000, 'a to sync');
  const conflict = nextEvent(db, 'conflict');
  b.restore();
  const ev = await conflict;
  assert.equal(ev.key, 'title');
  assert.equal(ev.resolution.type, 'keepLocal', 'b edited later');
  await until(() => db.pending === 0 && da.get('title') === 'from-b', 5000, 'both to converge on from-b');
  assert.equal(db.get('title'), 'from-b');
  await Promise.all([a.client.close(), b.client.close()]);
});

// --- S3 delete and re-create ----------------------------------------------------------------

/** Alice's dataset open on device 1 (`d`) with one synced record; device 2 (`other`) deletes it. */
async function deletedUnderneath(options = {}) {
  const name = uniqueName();
  const ctl = controlledClient(server, 'alice', options);
  await ctl.client.waitOnline(5000);
  const d = await ctl.client.open(name);
  await d.put('kept', 'clean');
  await d.sync();
  const other = await onlineClient(server, 'alice');
  return { name, ctl, d, other };
}

test('S3.1 after a remote delete, a later put with autoSync re-creates the dataset', async () => {
  const { name, ctl, d, other } = await deletedUnderneath({ autoSync: true });
  const deleted = nextEvent(d, 'deleted');
  await other.deleteDataset(name);
  await deleted;
  assert.equal(d.get('kept'), undefined, 'the clean record went with the dataset');
  await d.put('after', '1');
  await until(() => d.pending === 0, 5000, 'the put after the delete to be synced by autoSync');
  const o = await other.open(name);
  await until(() => o.get('after') === '1', 2000, 'the other device to see the re-created dataset');
  await Promise.all([ctl.client.close(), other.close()]);
});

test('S3.2 after a remote delete, a put made offline is sent by the reconnect catch-up', async () => {
  const { name, ctl, d, other } = await deletedUnderneath();
  const deleted = nextEvent(d, 'deleted');
  await other.deleteDataset(name);
  await deleted;
  ctl.cut();
  await d.put('after', '2');
  ctl.restore();
  await until(() => d.pending === 0, 5000, 'the put after the delete to be sent on reconnect');
  const o = await other.open(name);
  await until(() => o.get('after') === '2', 2000, 'the other device to see it');
  // And it is followed again: a change from elsewhere arrives live.
  await o.put('live', 'yes');
  await o.sync();
  await until(() => d.get('live') === 'yes', 2000, 'the re-created dataset to be followed');
  await Promise.all([ctl.client.close(), other.close()]);
});

test("S3.3 onDatasetDeleted 'drop' drops the local data, pending writes included", async () => {
  const { name, ctl, d, other } = await deletedUnderneath({ onDatasetDeleted: 'drop' });
  await d.put('unsynced', 'x');
  const deleted = nextEvent(d, 'deleted');
  await other.deleteDataset(name);
  const ev = await deleted;
  assert.equal(ev.policy, 'drop');
  assert.equal(d.records().size, 0);
  assert.equal(d.pending, 0);
  // Still followed: a re-creation elsewhere arrives.
  const o = await other.open(name);
  await o.put('new', '1');
  await o.sync();
  await until(() => d.get('new') === '1', 2000, 'the re-creation to arrive');
  await Promise.all([ctl.client.close(), other.close()]);
});

test("S3.4 onDatasetDeleted 'keepAll' keeps the whole local copy as a new dataset", async () => {
  const calls = [];
  const { name, ctl, d, other } = await deletedUnderneath({
    onDatasetDeleted: (ev) => {
      calls.push(ev);
      return 'keepAll';
    },
  });
  await d.put('unsynced', 'x');
  const deleted = nextEvent(d, 'deleted');
  await other.deleteDataset(name);
  await deleted;
  assert.equal(calls.length, 1);
  assert.equal(calls[0].dataset, d);
  assert.deepEqual([...d.records()], [['kept', 'clean'], ['unsynced', 'x']]);
  assert.equal(d.pending, 2, 'every record is a pending write now');
  await d.sync();
  const o = await other.open(name);
  await until(() => o.records().size === 2, 2000, 'the other device to see the re-created copy');
  await Promise.all([ctl.client.close(), other.close()]);
});

// --- S4 revoke and re-grant -----------------------------------------------------------------

test('S4.1 a revoke stops syncing and keeps local edits; after a re-grant subscribe() follows again and they sync', async () => {
  const name = uniqueName();
  const alice = await onlineClient(server, 'alice');
  const bob = await onlineClient(server, 'bob');
  const a = await alice.open(name);
  await a.put('k', '1');
  await a.sync();
  await alice.grant(name, 'bob', 'write');
  const b = await bob.open(name, { owner: 'alice' });
  const revoked = nextEvent(b, 'revoked');
  await alice.revoke(name, 'bob');
  await revoked;
  await b.put('k', 'bob');
  await assert.rejects(b.sync(), (e) => e.code === 'revoked');
  assert.equal(b.pending, 1);
  await alice.grant(name, 'bob', 'write');
  await b.subscribe();
  assert.equal(b.revoked, false);
  await b.sync();
  assert.equal(b.pending, 0);
  await until(() => a.get('k') === 'bob', 2000, 'alice to see bob\'s edit');
  await Promise.all([alice.close(), bob.close()]);
});

// --- S5 server limits -----------------------------------------------------------------------

test('S5.1 the limits come with ready; a key or value over them is refused before it is queued', async () => {
  const c = await onlineClient(small, 'alice');
  assert.equal(c.limits.maxKeyLength, 8);
  assert.equal(c.limits.maxPatches, 3);
  const d = await c.open(uniqueName());
  await assert.rejects(d.put('123456789', 'x'), (e) => e.code === 'too_large' && e.limit === 'max_key_length' && e.max === 8 && e.key === '123456789');
  await assert.rejects(d.put('big', 'x'.repeat(5000)), (e) => e.code === 'too_large' && e.limit === 'max_dataset_bytes' && e.max === 4096);
  assert.equal(d.pending, 0, 'nothing was queued');
  assert.equal(d.get('123456789'), undefined);
  // Counted in Unicode scalar values, as the server counts: 8 emoji are 16 UTF-16 units.
  await d.put('😀'.repeat(8), 'ok');
  await d.sync();
  assert.equal(d.pending, 0);
  await c.close();
});

test('S5.2 a too-long key queued before the limits were known is set aside once and blocks nothing', async () => {
  const ctl = controlledClient(small, 'alice', {}, { startDown: true });
  const d = await ctl.client.open(uniqueName());
  await d.put('much-too-long-1', 'x');
  await d.put('much-too-long-2', 'y');
  await d.put('ok', '1');
  const seen = errors(d);
  ctl.restore();
  ctl.client.reconnect();
  await until(() => d.record('ok')?.dirty === false, 5000, 'the valid key to sync');
  await until(() => seen.length === 2, 2000, 'one error per set-aside key');
  assert.deepEqual(seen.map((e) => [e.code, e.limit, e.key]).sort(), [
    ['too_large', 'max_key_length', 'much-too-long-1'],
    ['too_large', 'max_key_length', 'much-too-long-2'],
  ]);
  assert.deepEqual(d.setAside().map((s) => s.key), ['much-too-long-1', 'much-too-long-2']);
  assert.equal(d.pending, 2, 'set aside, not dropped');
  assert.equal(d.get('much-too-long-1'), 'x');
  // Later syncs go on, without reporting them again.
  await d.put('ok', '2');
  const out = await d.sync();
  assert.equal(out.pushed, 1);
  assert.equal(seen.length, 2, 'reported once');
  // Removing a set-aside key that the server never had drops it; discard() drops the other.
  await d.remove('much-too-long-1');
  d.discard('much-too-long-2');
  assert.equal(d.pending, 0);
  assert.deepEqual(d.setAside(), []);
  assert.deepEqual([...d.records()], [['ok', '2']]);
  await ctl.client.close();
});

test('S5.3 more dirty keys than max_patches go in several updates of one sync()', async () => {
  const c = await onlineClient(small, 'alice');
  const d = await c.open(uniqueName());
  for (const k of ['a', 'b', 'c', 'd', 'e', 'f', 'g']) await d.put(k, k);
  const out = await d.sync();
  assert.equal(out.pushed, 7);
  assert.equal(d.pending, 0);
  assert.equal(out.syncCount, 3, 'three updates: 3 + 3 + 1 patches');
  await c.close();
});

test('S5.6 pending changes larger together than max_frame_bytes go in several updates', async () => {
  const c = await onlineClient(small, 'alice');
  const d = await c.open(uniqueName());
  // Alone each fits in a frame and the three fit in the dataset; two do not fit in one frame.
  for (const k of ['a', 'b', 'c']) await d.put(k, k.repeat(1000));
  const out = await d.sync();
  assert.equal(out.pushed, 3);
  assert.equal(out.syncCount, 3, 'one update per change');
  assert.equal(d.pending, 0);
  assert.equal(c.state, 'online', 'no frame too large closed the connection');
  assert.equal(c.limits.maxFrameBytes, 2048);
  await assert.rejects(d.put('d', 'd'.repeat(2100)), (e) => e.code === 'too_large' && e.limit === 'max_frame_bytes' && e.max === 2048);
  await c.close();
});

test('S5.4 max_patches is learnt from the error when ready does not announce it', async () => {
  const ctl = controlledClient(small, 'alice', {}, { stripReady: ['limits'] });
  await ctl.client.waitOnline(5000);
  assert.equal(ctl.client.limits.maxPatches, undefined, 'not announced');
  const d = await ctl.client.open(uniqueName());
  for (const k of ['a', 'b', 'c', 'd']) await d.put(k, k);
  const out = await d.sync();
  assert.equal(out.pushed, 4);
  assert.equal(d.pending, 0);
  assert.equal(ctl.client.limits.maxPatches, 3, 'learnt from limit_exceeded.max');
  await ctl.client.close();
});

test('S5.5 a change the server refuses for good is set aside; the rest commits; revert() drops it', async () => {
  const c = await onlineClient(small, 'alice');
  const d = await c.open(uniqueName());
  for (const k of ['r1', 'r2', 'r3', 'r4', 'r5', 'r6', 'r7']) await d.put(k, '1');
  await d.sync();
  const seen = errors(d);
  await d.put('r8', '1'); // fits: the 8th record
  await d.put('r9', '1'); // over max_records
  await d.put('r1', '2'); // an edit: fits
  const out = await d.sync();
  assert.equal(out.pushed, 2);
  assert.deepEqual(d.setAside().map((s) => [s.key, s.code, s.limit]), [['r9', 'limit_exceeded', 'max_records']]);
  assert.deepEqual(seen.map((e) => [e.key, e.code]), [['r9', 'limit_exceeded']]);
  assert.equal(d.record('r1').dirty, false);
  assert.equal(d.record('r8').dirty, false);
  // A new edit of a set-aside key is tried again (after making room it fits).
  await d.remove('r2');
  await d.sync();
  await d.put('r9', '2');
  await d.sync();
  assert.equal(d.record('r9').dirty, false);
  // revert() drops every pending local change, set aside or not.
  await d.put('r10', '1');
  await d.sync();
  assert.deepEqual(d.setAside().map((s) => s.key), ['r10']);
  await d.put('r3', 'local only');
  const dropped = d.revert();
  assert.deepEqual(dropped, ['r10', 'r3']);
  assert.equal(d.pending, 0);
  await until(() => d.get('r3') === '1', 2000, 'the server value of r3 to come back');
  assert.equal(d.get('r10'), undefined);
  await c.close();
});

// --- S6 sign-out with pending writes ----------------------------------------------------------

test('S6.1 client.pending counts the pending writes of closed datasets too', async () => {
  const store = new MemoryStore();
  const c = client(server, 'alice', { store });
  const d = await c.open(uniqueName());
  await d.put('k', 'v');
  const e = await c.open(uniqueName());
  await e.put('k', 'v');
  await d.close();
  assert.equal(c.pending, 2, 'a closed dataset still holds its pending write');
  await c.close();
});

test('S6.2 wipe refuses while writes are pending; forced, it deletes every cached dataset of the identity', async () => {
  const store = new MemoryStore();
  const [n1, n2] = [uniqueName(), uniqueName()];
  const c = await onlineClient(server, 'alice', { store });
  const d = await c.open(n1);
  await d.put('k', 'v');
  await (await c.open(n2)).close();
  await assert.rejects(c.wipe(), (e) => e.code === 'pending_writes' && /^1 local change not yet synced/.test(e.message));
  assert.equal((await store.list('alice')).length > 0, true, 'nothing deleted');
  assert.equal(d.get('k'), 'v');
  await c.wipe({ force: true });
  assert.deepEqual(await store.list('alice'), []);
  const again = client(server, 'alice', { store });
  await again.pause(); // the local cache only: nothing may come back from the server
  const d2 = await again.open(n1);
  assert.deepEqual([...d2.records()], [], 'reopening reads nothing');
  await again.close();
  // With nothing pending, an unforced wipe succeeds.
  const c3 = await onlineClient(server, 'alice', { store });
  await (await c3.open(n2)).put('k', 'v');
  await c3.flush();
  assert.equal((await c3.wipe()).length, 1);
});

test('S6.3 sign-out with a pending write: refused and kept, sent after reconnecting, then wiped', async () => {
  const name = uniqueName();
  const store = new MemoryStore();
  const ctl = controlledClient(server, 'alice', { store });
  await ctl.client.waitOnline(5000);
  const d = await ctl.client.open(name);
  ctl.cut();
  await d.put('draft', '1');
  assert.equal(ctl.client.status.pending, 1);
  // The app asks to sign out: refused, naming the dataset and the count; nothing deleted.
  await assert.rejects(ctl.client.wipe(), (e) => {
    assert.equal(e.code, 'pending_writes');
    assert.deepEqual(e.keys, [`alice/${name}`]);
    assert.match(e.message, /^1 local change not yet synced/);
    return true;
  });
  assert.equal(d.get('draft'), '1');
  assert.deepEqual(await store.list('alice'), [{ owner: 'alice', name }]);
  // The app waits for the write instead; the reconnect sends it (no sync call here).
  const waited = ctl.client.waitForPendingWrites({ timeoutMs: 10_000 });
  ctl.restore();
  await waited;
  assert.equal(ctl.client.status.pending, 0);
  await ctl.client.wipe();
  assert.deepEqual(await store.list('alice'), []);
  assert.equal(ctl.client.state, 'closed');
  const b = await onlineClient(server, 'alice');
  assert.deepEqual([...(await b.open(name)).records()], [['draft', '1']], 'the write reached the server before the wipe');
  await b.close();
});

// --- handles and listeners -----------------------------------------------------------------

test('H1 onSnapshot: one stable snapshot per version, for local, other-tab and remote changes', async () => {
  const store = new MemoryStore();
  const name = uniqueName();
  const tab1 = await onlineClient(server, 'alice', { store, crossTab: true });
  const tab2 = await onlineClient(server, 'alice', { store, crossTab: true });
  const other = await onlineClient(server, 'alice');
  const d = await tab1.open(name);
  const d2 = await tab2.open(name);
  const o = await other.open(name);
  const snaps = [];
  const off = d.onSnapshot((s) => snaps.push(s));
  assert.equal(snaps.length, 1, 'called at once with the current snapshot');
  assert.equal(d.snapshot, d.snapshot, 'the same object while nothing changed');
  const v0 = d.snapshot.version;

  await d.put('local', '1');
  await until(() => snaps.at(-1).records.get('local') === '1', 2000, 'the local edit');
  assert.deepEqual([snaps.at(-1).hasPendingWrites, snaps.at(-1).fromServer], [true, false]);

  await d2.put('tab', '1');
  await until(() => snaps.at(-1).records.get('tab') === '1', 2000, 'the other tab\'s edit');
  assert.equal(snaps.at(-1).fromServer, false);

  await d.sync();
  await until(() => !snaps.at(-1).hasPendingWrites, 2000, 'the ack');
  assert.equal(snaps.at(-1).fromServer, true);

  await o.put('remote', '1');
  await o.sync();
  await until(() => snaps.at(-1).records.get('remote') === '1', 2000, 'the remote change');
  assert.equal(snaps.at(-1).fromServer, true);

  const versions = snaps.map((s) => s.version);
  assert.ok(versions.every((v, i) => i === 0 || v > versions[i - 1]), `monotonic: ${versions}`);
  assert.ok(versions[0] >= v0);
  assert.equal(d.snapshot, snaps.at(-1), 'getSnapshot returns the last notified object');
  assert.ok(Object.isFrozen(d.snapshot));
  off();
  const n = snaps.length;
  await d.put('after-off', '1');
  await sleep(50);
  assert.equal(snaps.length, n, 'unsubscribed');
  await Promise.all([tab1.close(), tab2.close(), other.close()]);
});

test('H2 a second open() with another conflict handler is refused; setConflictHandler() replaces it', async () => {
  const c = client(server, 'alice');
  const name = uniqueName();
  const mine = () => 'keepLocal';
  const d = await c.open(name, { conflictHandler: mine });
  assert.equal(await c.open(name), d, 'no handler named: the same handle');
  assert.equal(await c.open(name, { conflictHandler: mine }), d, 'the same handler: the same handle');
  await assert.rejects(c.open(name, { conflictHandler: 'takeRemote' }), (e) => e.code === 'bad_request' && /conflict handler/.test(e.message));
  d.setConflictHandler('takeRemote');
  assert.equal(await c.open(name, { conflictHandler: 'takeRemote' }), d);
  await c.close();
});
