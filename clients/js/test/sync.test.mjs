// Two clients converging, live pushes, conflicts and their handlers, bounded retries.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { ConflictHandlers, Resolution } from '../src/tandem.js';
import { startServer, onlineClient, nextEvent, until, uniqueName, sleep } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

/** Alice owns a dataset shared with Bob (write); both have it open and at the same state. */
async function sharedPair(aliceOpts = {}, bobOpts = {}) {
  const name = uniqueName();
  const alice = await onlineClient(server, 'alice');
  const bob = await onlineClient(server, 'bob');
  const a = await alice.open(name, aliceOpts);
  await alice.grant(name, 'bob', 'write');
  const b = await bob.open(name, { owner: 'alice', ...bobOpts });
  await a.put('milk', '1');
  await a.sync();
  await until(() => b.get('milk') === '1', 2000, 'bob to see milk=1');
  return { name, alice, bob, a, b, close: () => Promise.all([alice.close(), bob.close()]) };
}

test('two clients converge', async () => {
  const { a, b, close } = await sharedPair();
  await a.put('bread', '1');
  await b.put('eggs', '12');
  await Promise.all([a.sync(), b.sync()]);
  const want = [['bread', '1'], ['eggs', '12'], ['milk', '1']];
  await until(() => JSON.stringify([...a.records()]) === JSON.stringify(want) && JSON.stringify([...b.records()]) === JSON.stringify(want), 3000, 'both to converge');
  assert.equal(a.syncCount, b.syncCount);
  await close();
});

test('a live change reaches the other client within a second', async () => {
  const { a, b, close } = await sharedPair();
  const changes = b.remoteChanges();
  const t0 = Date.now();
  await a.put('milk', '2');
  await a.sync();
  const { value } = await changes.next();
  const ms = Date.now() - t0;
  assert.deepEqual(value.keys, ['milk']);
  assert.equal(value.source, 'remote');
  assert.equal(b.get('milk'), '2');
  assert.ok(ms < 1000, `took ${ms} ms`);
  // Removals arrive as absence from the whole-dataset push.
  await a.remove('milk');
  await a.sync();
  const next = await changes.next();
  assert.deepEqual(next.value.keys, ['milk']);
  assert.equal(b.get('milk'), undefined);
  await changes.return();
  await close();
});

test('a push does not overwrite a dirty local record; the next sync conflicts instead', async () => {
  const { a, b, close } = await sharedPair({}, { conflictHandler: 'keepLocal' });
  await b.put('milk', 'bob');
  const seen = nextEvent(b, 'change');
  await a.put('milk', 'alice');
  await a.put('tea', 'yes');
  await a.sync();
  const ev = await seen;
  assert.deepEqual(ev.keys, ['tea'], 'only the clean key changed');
  assert.equal(b.get('milk'), 'bob', 'the local edit is kept');
  assert.equal(b.record('milk').syncCount, 1, 'based on what bob had seen');
  const conflicts = [];
  b.on('conflict', (c) => conflicts.push(c));
  const out = await b.sync();
  assert.equal(out.conflicts, 1);
  assert.equal(conflicts[0].key, 'milk');
  assert.equal(conflicts[0].server.value, 'alice');
  assert.equal(conflicts[0].resolution.type, 'keepLocal');
  await until(() => a.get('milk') === 'bob', 2000, 'alice to see the kept value');
  await close();
});

test('conflict: keepLocal writes the local value over the server', async () => {
  const { a, b, close } = await sharedPair({}, { conflictHandler: ConflictHandlers.keepLocal });
  await b.put('milk', 'bob');
  await a.put('milk', 'alice');
  await a.sync();
  const out = await b.sync();
  assert.equal(out.conflicts, 1);
  assert.equal(b.get('milk'), 'bob');
  assert.equal(b.pending, 0);
  await until(() => a.get('milk') === 'bob', 2000, 'alice to converge');
  await close();
});

test('conflict: takeRemote drops the local change for the server record', async () => {
  const { a, b, close } = await sharedPair({}, { conflictHandler: 'takeRemote' });
  await b.put('milk', 'bob');
  await b.put('bread', 'bob-only');
  await a.put('milk', 'alice');
  await a.sync();
  const out = await b.sync();
  assert.equal(out.conflicts, 1);
  assert.equal(b.get('milk'), 'alice');
  assert.equal(b.get('bread'), 'bob-only', 'the non-conflicting change went through');
  assert.equal(b.pending, 0);
  await until(() => a.get('bread') === 'bob-only' && a.get('milk') === 'alice', 2000, 'alice to converge');
  await close();
});

test('conflict: takeRemote of a remote removal removes locally', async () => {
  const { a, b, close } = await sharedPair({}, { conflictHandler: 'takeRemote' });
  await b.put('milk', 'bob');
  await a.remove('milk');
  await a.sync();
  await b.sync();
  assert.equal(b.get('milk'), undefined);
  assert.equal(b.pending, 0);
  await close();
});

test('conflict: latestDeviceTime keeps whichever edit was made later', async () => {
  // Bob edits first, Alice later: Alice's (the server's) edit wins on Bob's sync.
  {
    const { a, b, close } = await sharedPair({}, { conflictHandler: 'latestDeviceTime' });
    await b.put('milk', 'bob-early');
    await sleep(5);
    await a.put('milk', 'alice-late');
    await a.sync();
    const out = await b.sync();
    assert.equal(out.conflicts, 1);
    assert.equal(b.get('milk'), 'alice-late');
    await close();
  }
  // Alice edits first, Bob later: Bob's local edit wins.
  {
    const { a, b, close } = await sharedPair({}, { conflictHandler: 'latestDeviceTime' });
    await a.put('milk', 'alice-early');
    await sleep(5);
    await b.put('milk', 'bob-late'); // before Bob sees Alice's commit
    await a.sync();
    const out = await b.sync();
    assert.equal(out.conflicts, 1);
    assert.equal(b.get('milk'), 'bob-late');
    await until(() => a.get('milk') === 'bob-late', 2000, 'alice to converge');
    await close();
  }
});

test('conflict: a custom function merges', async () => {
  const cases = [];
  const merge = (c) => {
    cases.push(c);
    return Resolution.merge(`${c.server.value}+${c.local.value}`);
  };
  const { a, b, close } = await sharedPair({}, { conflictHandler: merge });
  await b.put('milk', 'oat');
  await a.put('milk', 'whole');
  await a.sync();
  const out = await b.sync();
  assert.equal(out.conflicts, 1);
  assert.equal(cases.length, 1);
  assert.equal(cases[0].key, 'milk');
  assert.equal(cases[0].local.value, 'oat');
  assert.equal(cases[0].local.dirty, true);
  assert.equal(cases[0].server.lastModifiedBy, 'alice');
  assert.equal(b.get('milk'), 'whole+oat');
  await until(() => a.get('milk') === 'whole+oat', 2000, 'alice to converge');
  // An async handler that merges to a removal.
  b.on('conflict', () => {});
  const { a: a2, b: b2, close: close2 } = await sharedPair({}, { conflictHandler: async () => Resolution.merge(null) });
  await b2.put('milk', 'x');
  await a2.put('milk', 'y');
  await a2.sync();
  await b2.sync();
  assert.equal(b2.get('milk'), undefined);
  await until(() => a2.get('milk') === undefined, 2000, 'alice to see the removal');
  await Promise.all([close(), close2()]);
});

test('retries are bounded: a conflict that keeps coming back rejects with the keys', async () => {
  let calls = 0;
  let aliceDs;
  // Every time Bob's handler runs, Alice changes the record again, so the retry conflicts.
  const stubborn = async () => {
    calls++;
    await aliceDs.put('milk', `alice-${calls}`);
    await aliceDs.sync();
    return Resolution.keepLocal();
  };
  const { a, b, close } = await sharedPair({}, { conflictHandler: stubborn });
  aliceDs = a;
  await b.put('milk', 'bob');
  await b.put('tea', 'bob');
  await a.put('milk', 'alice-0');
  await a.sync();
  await assert.rejects(b.sync(), (e) => e.code === 'conflict' && JSON.stringify(e.keys) === JSON.stringify(['milk', 'tea']));
  assert.equal(calls, 4, 'one attempt plus three retries');
  assert.equal(b.get('milk'), 'bob', 'nothing local was dropped');
  assert.equal(b.pending, 2);
  await close();
});

test('identical values are not a conflict', async () => {
  const handlerCalls = [];
  const { a, b, close } = await sharedPair({}, { conflictHandler: (c) => (handlerCalls.push(c), Resolution.keepLocal()) });
  await b.put('milk', 'same');
  await a.put('milk', 'same');
  await a.sync();
  const out = await b.sync();
  assert.equal(handlerCalls.length, 0);
  assert.equal(out.conflicts, 0);
  assert.equal(b.pending, 0);
  await close();
});

test('autoSync sends writes shortly after they are made', async () => {
  const { a, b, close } = await sharedPair({ autoSync: true });
  const t0 = Date.now();
  await a.put('fast', 'yes');
  await until(() => b.get('fast') === 'yes', 1000, 'bob to see the auto-synced write');
  assert.ok(Date.now() - t0 < 1000);
  assert.equal(a.pending, 0);
  await close();
});

test('an edit made while a sync is in flight stays pending and is rebased', async () => {
  const { a, b, close } = await sharedPair();
  await a.put('milk', 'v1');
  const inFlight = a.sync();
  for (let i = 0; i < 5; i++) await null; // the update is sent; its reply needs I/O
  await a.put('milk', 'v2');
  await inFlight;
  assert.equal(a.pending, 1, 'v2 is still pending');
  const out = await a.sync();
  assert.equal(out.conflicts, 0, 'v2 is based on the acknowledged v1, not on the old count');
  await until(() => b.get('milk') === 'v2', 2000, 'bob to see v2');
  await close();
});
