// Opt-in protocol features (docs/PROTOCOL.md §1): `delta` pushes, the `lean` record encoding
// and re-subscribing with `since`. Against a real server, with the frames on the wire
// recorded; the gap case (a `delta` whose base this copy lacks), which a real server never
// produces for a client that reads every frame, against a scripted peer on a real socket.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocketServer } from 'ws';
import { TandemClient, MemoryStore } from '../src/tandem.js';
import { startServer, mintToken, WebSocketImpl, until, uniqueName, sleep } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

/** A WebSocket class that keeps every frame sent and received (parsed) on `wire`. */
function recordingSocket(wire) {
  return class RecordingWebSocket extends WebSocketImpl {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (ev) => wire.received.push(JSON.parse(String(ev.data))));
    }
    send(data) {
      wire.sent.push(JSON.parse(String(data)));
      super.send(data);
    }
  };
}

function recordedClient(sub, options = {}) {
  const wire = { sent: [], received: [] };
  const client = TandemClient.connect(server.url, () => mintToken(sub), {
    WebSocket: recordingSocket(wire),
    identity: sub,
    store: new MemoryStore(),
    backoff: { initialMs: 20, maxMs: 200 },
    ...options,
  });
  return { client, wire };
}

/** The server's state of a dataset as `changes{since:0}` tells it (live records only). */
async function serverRecords(owner, name, srv = server) {
  const ws = new WebSocketImpl(srv.url);
  const frames = [];
  const reply = new Promise((resolve, reject) => {
    ws.addEventListener('message', (ev) => {
      const f = JSON.parse(String(ev.data));
      frames.push(f);
      if (f.type === 'changes' || f.type === 'error') resolve(f);
    });
    ws.addEventListener('error', () => reject(new Error('socket error')));
  });
  await new Promise((r) => ws.addEventListener('open', r));
  ws.send(JSON.stringify({ type: 'auth', token: mintToken(owner) }));
  ws.send(JSON.stringify({ type: 'changes', id: 1, dataset: { owner, name }, since: 0 }));
  const f = await reply;
  ws.close();
  assert.equal(f.type, 'changes', JSON.stringify(f));
  const live = new Map(f.records.filter((r) => r.value !== null).map((r) => [r.key, r.value]));
  return { syncCount: f.syncCount, records: new Map([...live].sort(([a], [b]) => (a < b ? -1 : 1))) };
}

/** Puts, syncs, removes, syncs again: a few commits, tombstones included. */
async function writeSome(ds, round) {
  for (let i = 0; i < 5; i++) await ds.put(`k${i}`, `v${i}-${round}`);
  await ds.sync();
  await ds.put(`only-${round}`, 'x');
  await ds.remove('k1');
  await ds.sync();
  await ds.remove('k3');
  await ds.put('k4', `again-${round}`);
  await ds.sync();
}

test('a subscriber with deltas gets delta frames and ends equal to the server', async () => {
  const name = uniqueName('delta');
  const writer = recordedClient('alice');
  const reader = recordedClient('alice');
  await Promise.all([writer.client.waitOnline(5000), reader.client.waitOnline(5000)]);
  assert.deepEqual(reader.client.features.sort(), ['delta', 'lean']);
  assert.deepEqual(reader.wire.sent[0].features, ['delta', 'lean']);
  const w = await writer.client.open(name);
  const r = await reader.client.open(name);

  await writeSome(w, 1);
  const want = await serverRecords('alice', name);
  await until(() => r.syncCount === want.syncCount, 5000, 'the reader to reach the last commit');
  assert.deepEqual(r.records(), want.records);
  assert.equal(r.get('k1'), undefined, 'a removed key is gone');
  assert.equal(r.get('k3'), undefined);
  assert.equal(r.pending, 0);

  const pushes = reader.wire.received.filter((f) => f.type === 'delta' || f.type === 'dataset');
  assert.ok(pushes.length > 0, 'the reader got pushes');
  assert.ok(pushes.every((f) => f.type === 'delta'), `only delta pushes, got ${pushes.map((f) => f.type)}`);
  // Tombstones travel in deltas, and records are lean: no syncCount equal to the frame's,
  // no lastModifiedBy naming the owner.
  assert.ok(pushes.some((f) => f.records.some((rec) => rec.value === null)), 'a delta carried a tombstone');
  for (const f of pushes) {
    assert.ok(f.baseSyncCount < f.syncCount);
    assert.equal(f.dataset.owner, 'alice');
    for (const rec of f.records) {
      assert.notEqual(rec.syncCount, f.syncCount);
      assert.equal(rec.lastModifiedBy, undefined);
    }
  }
  // What the SDK kept is full again (filled in from the frame).
  assert.equal(r.record('k0').syncCount > 0, true);
  await Promise.all([writer.client.close(), reader.client.close()]);
});

test('a client that reconnects resumes with since and gets only the changes', async () => {
  const name = uniqueName('since');
  const writer = recordedClient('alice');
  const store = new MemoryStore(); // the reader's cache outlives its first client
  const first = recordedClient('alice', { store });
  await Promise.all([writer.client.waitOnline(5000), first.client.waitOnline(5000)]);
  const w = await writer.client.open(name);
  const r1 = await first.client.open(name);
  await writeSome(w, 1);
  await until(async () => r1.syncCount === (await serverRecords('alice', name)).syncCount, 5000, 'the reader to catch up');
  const held = r1.syncCount;
  await first.client.close();

  // Offline meanwhile: more commits, removals among them.
  await writeSome(w, 2);
  await w.remove('k0');
  await w.sync();

  const second = recordedClient('alice', { store });
  await second.client.waitOnline(5000);
  const r2 = await second.client.open(name);
  const sub = second.wire.sent.find((f) => f.type === 'subscribe');
  assert.equal(sub.since, held, 'the re-subscribe names the count the cache holds');
  const snap = second.wire.received.find((f) => f.type === 'snapshot');
  assert.equal(snap.since, held, 'the snapshot carries only the changes');
  assert.ok(snap.records.some((rec) => rec.value === null), 'the changes include tombstones');
  const want = await serverRecords('alice', name);
  assert.equal(r2.syncCount, want.syncCount);
  assert.deepEqual(r2.records(), want.records);
  assert.equal(r2.get('k0'), undefined);

  // The same on one client's own reconnect: it re-subscribes with since.
  const before = second.wire.sent.length;
  await w.put('after', 'reconnect');
  await w.sync();
  await until(() => r2.get('after') === 'reconnect', 5000, 'the push');
  second.client.reconnect();
  await second.client.waitOnline(5000);
  await until(() => second.wire.sent.slice(before).some((f) => f.type === 'subscribe'), 5000, 'the re-subscribe');
  assert.equal(second.wire.sent.slice(before).find((f) => f.type === 'subscribe').since, r2.syncCount);
  await w.remove('after');
  await w.sync();
  await until(() => r2.get('after') === undefined, 5000, 'the removal after the reconnect');
  assert.deepEqual(r2.records(), (await serverRecords('alice', name)).records);
  await Promise.all([writer.client.close(), second.client.close()]);
});

test('a client with features turned off gets whole dataset frames and full records', async () => {
  const name = uniqueName('plain');
  const writer = recordedClient('alice');
  const reader = recordedClient('alice', { features: [] });
  await Promise.all([writer.client.waitOnline(5000), reader.client.waitOnline(5000)]);
  assert.deepEqual(reader.client.features, []);
  assert.equal(reader.wire.sent[0].features, undefined, 'no features asked for');
  const w = await writer.client.open(name);
  const r = await reader.client.open(name);
  await writeSome(w, 1);
  const want = await serverRecords('alice', name);
  await until(() => r.syncCount === want.syncCount, 5000, 'the reader to reach the last commit');
  assert.deepEqual(r.records(), want.records);
  const pushes = reader.wire.received.filter((f) => f.type === 'delta' || f.type === 'dataset');
  assert.ok(pushes.length > 0 && pushes.every((f) => f.type === 'dataset'), `whole frames only, got ${pushes.map((f) => f.type)}`);
  for (const f of pushes) for (const rec of f.records) assert.equal(typeof rec.syncCount, 'number');
  await Promise.all([writer.client.close(), reader.client.close()]);
});

test('a client asking for lean only gets lean whole frames', async () => {
  const name = uniqueName('lean');
  const writer = recordedClient('alice');
  const reader = recordedClient('alice', { features: ['lean'] });
  await Promise.all([writer.client.waitOnline(5000), reader.client.waitOnline(5000)]);
  assert.deepEqual(reader.client.features, ['lean']);
  const w = await writer.client.open(name);
  const r = await reader.client.open(name);
  await writeSome(w, 1);
  const want = await serverRecords('alice', name);
  await until(() => r.syncCount === want.syncCount, 5000, 'the reader to reach the last commit');
  assert.deepEqual(r.records(), want.records);
  const pushes = reader.wire.received.filter((f) => f.type === 'delta' || f.type === 'dataset');
  assert.ok(pushes.every((f) => f.type === 'dataset'));
  assert.ok(pushes.some((f) => f.records.some((rec) => rec.syncCount === undefined)), 'lean records');
  await Promise.all([writer.client.close(), reader.client.close()]);
});

test('a client ahead of a replaced store takes its state and writes again', async () => {
  const first = await startServer();
  const name = uniqueName('restored');
  const wire = { sent: [], received: [] };
  // Reconnects to the same address, wherever the server behind it comes from.
  const client = TandemClient.connect(first.url, () => mintToken('alice'), {
    WebSocket: recordingSocket(wire),
    identity: 'alice',
    store: new MemoryStore(),
    backoff: { initialMs: 20, maxMs: 200 },
    conflictHandler: 'keepLocal',
  });
  await client.waitOnline(5000);
  const d = await client.open(name);
  await writeSome(d, 1);
  await writeSome(d, 2);
  const held = d.syncCount;
  assert.equal(held, 6);
  const events = { change: [], conflict: [] };
  d.on('change', (e) => events.change.push(e));
  d.on('conflict', (e) => events.conflict.push(e));

  // The store behind the address is replaced by one with fewer commits of the dataset.
  await first.stop();
  await d.put('offline', 'new key'); // absent there: written as new
  await d.put('k0', 'mine'); // held there at another version: the handler decides
  const older = await startServer();
  const other = TandemClient.connect(older.url, () => mintToken('alice'), { WebSocket: WebSocketImpl, identity: 'alice', store: new MemoryStore() });
  await other.waitOnline(5000);
  const o = await other.open(name);
  await o.put('k0', 'restored');
  await o.put('b', '1');
  await o.sync();
  await o.put('c', '2');
  await o.sync();
  await other.close();
  await older.stop();
  let server2;
  for (let i = 0; !server2; i++) {
    try {
      server2 = await startServer({ port: first.port, dataDir: older.dataDir });
    } catch (e) {
      if (i >= 20) throw e; // the port was just released
      await sleep(100);
    }
  }
  try {
    // The client reconnects, takes the server's state, and sends its edits on top of it.
    let want;
    await until(async () => {
      want = await serverRecords('alice', name, server2);
      return d.pending === 0 && d.syncCount === want.syncCount && JSON.stringify([...d.records()]) === JSON.stringify([...want.records]);
    }, 10_000, 'the client to take the new store\'s state');
    const sub = wire.sent.find((f) => f.type === 'subscribe' && f.since === held);
    assert.ok(sub, 'the re-subscribe named the count the copy held');
    const snap = wire.received.find((f) => f.type === 'snapshot' && f.id === sub.id);
    assert.ok(snap && snap.since === undefined && snap.syncCount < held, `a whole snapshot at a lower count: ${JSON.stringify(snap)}`);
    assert.equal(want.syncCount, 3, 'the two commits there, then the client\'s edits');
    assert.deepEqual(Object.fromEntries(want.records), { b: '1', c: '2', k0: 'mine', offline: 'new key' }, 'the old copy\'s other records are gone');
    assert.deepEqual(events.conflict.map((e) => [e.key, e.resolution.type]), [['k0', 'keepLocal']]);
    assert.ok(events.change.some((e) => e.source === 'remote' && e.keys.includes('k2')), 'the dropped records were announced');

    // Not stuck: pushes from the new store apply, and the client writes again.
    const writer = TandemClient.connect(server2.url, () => mintToken('alice'), { WebSocket: WebSocketImpl, identity: 'alice', store: new MemoryStore() });
    await writer.waitOnline(5000);
    const w = await writer.open(name);
    await w.put('later', 'pushed');
    await w.sync();
    await until(() => d.get('later') === 'pushed', 5000, 'the push after the reset');
    await d.put('again', 'written');
    assert.equal((await d.sync()).syncCount, 5);
    const after = await serverRecords('alice', name, server2);
    assert.equal(d.syncCount, after.syncCount);
    assert.deepEqual(d.records(), after.records);
    await Promise.all([writer.close(), client.close()]);
  } finally {
    await client.close();
    await server2.close();
    await first.close();
  }
});

// --- a scripted peer --------------------------------------------------------------------

/** A WebSocket server on loopback that answers `auth` with `ready` (with `features`) and
 * hands every other frame to `onFrame(frame, send)`. */
async function scriptedPeer(onFrame) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const sent = [];
  wss.on('connection', (ws) => {
    const send = (f) => ws.send(JSON.stringify(f));
    ws.on('message', (data) => {
      const f = JSON.parse(String(data));
      sent.push(f);
      if (f.type === 'auth') {
        send({ type: 'ready', id: f.id, identity: 'alice', session: 's-1', protocol: 1, expiresAt: Date.now() + 3_600_000, features: f.features });
      } else {
        onFrame(f, send);
      }
    });
  });
  return { url: `ws://127.0.0.1:${wss.address().port}/v1/sync`, sent, close: () => new Promise((r) => wss.close(r)) };
}

const ds = { owner: 'alice', name: 'list' };
const rec = (key, value, extra = {}) => ({ key, value, lastModified: 1, ...extra });

test('a delta whose base the copy lacks makes the SDK fetch changes since its count', async () => {
  let push;
  const peer = await scriptedPeer((f, send) => {
    push = send;
    if (f.type === 'subscribe') {
      // A lean snapshot: syncCount and lastModifiedBy come from the frame.
      send({ type: 'snapshot', id: f.id, dataset: ds, syncCount: 3, records: [rec('a', '1'), rec('b', '2', { syncCount: 2, lastModifiedBy: 'bob' }), rec('c', '3')] });
    } else if (f.type === 'changes') {
      assert.equal(f.since, 4);
      send({ type: 'changes', id: f.id, dataset: ds, syncCount: 7, records: [rec('a', null, { syncCount: 6 }), rec('d', '4'), rec('e', '5', { syncCount: 5 })] });
    }
  });
  const client = TandemClient.connect(peer.url, mintToken('alice'), { WebSocket: WebSocketImpl, identity: 'alice', store: new MemoryStore(), pingIntervalMs: 0 });
  await client.waitOnline(5000);
  const d = await client.open('list');
  assert.equal(d.syncCount, 3);
  assert.deepEqual(d.record('a'), { value: '1', syncCount: 3, dirty: false, deviceLastModified: undefined, version: 0, lastModified: 1, lastModifiedBy: 'alice', deviceId: undefined });
  assert.equal(d.record('b').syncCount, 2);
  assert.equal(d.record('b').lastModifiedBy, 'bob');

  // On base: applied (a tombstone removes, a missing key stays).
  push({ type: 'delta', dataset: ds, baseSyncCount: 3, syncCount: 4, records: [rec('c', null)] });
  await until(() => d.syncCount === 4, 2000, 'the delta at 4');
  assert.deepEqual([...d.records().keys()], ['a', 'b']);
  // Old: ignored.
  push({ type: 'delta', dataset: ds, baseSyncCount: 2, syncCount: 3, records: [rec('zzz', 'old')] });
  // A gap (base 6, we hold 4): a changes request since 4, whose answer is applied.
  push({ type: 'delta', dataset: ds, baseSyncCount: 6, syncCount: 7, records: [rec('d', '4')] });
  await until(() => d.syncCount === 7, 2000, 'the catch-up to 7');
  assert.deepEqual(Object.fromEntries(d.records()), { b: '2', d: '4', e: '5' });
  assert.equal(peer.sent.filter((f) => f.type === 'changes').length, 1);
  await client.close();
  await peer.close();
});

test('a delta keeps dirty local edits and settles the ones the server already holds', async () => {
  let push;
  const peer = await scriptedPeer((f, send) => {
    push = send;
    if (f.type === 'subscribe') send({ type: 'snapshot', id: f.id, dataset: ds, syncCount: 2, records: [rec('a', '1'), rec('b', '2')] });
  });
  const client = TandemClient.connect(peer.url, mintToken('alice'), { WebSocket: WebSocketImpl, identity: 'alice', store: new MemoryStore(), pingIntervalMs: 0 });
  await client.waitOnline(5000);
  const d = await client.open('list');
  await d.put('a', 'mine');
  await d.remove('b');
  await d.put('c', 'same');
  push({ type: 'delta', dataset: ds, baseSyncCount: 2, syncCount: 3, records: [rec('a', 'theirs'), rec('b', null), rec('c', 'same')] });
  await until(() => d.syncCount === 3, 2000, 'the delta');
  // `a` stays dirty with its old base (the next sync conflicts); `b` and `c` are done.
  assert.deepEqual(d.record('a'), { ...d.record('a'), value: 'mine', dirty: true, syncCount: 2 });
  assert.equal(d.record('b'), undefined);
  assert.equal(d.record('c').dirty, false);
  assert.deepEqual(d.dirtyKeys(), ['a']);
  await client.close();
  await peer.close();
});

test('a whole snapshot below the since sent replaces the copy and rebases local edits', async () => {
  const subscribes = [];
  const peer = await scriptedPeer((f, send) => {
    if (f.type !== 'subscribe') return; // updates stay unanswered: the state after the snapshot is what counts
    subscribes.push(f);
    if (subscribes.length === 1) {
      send({ type: 'snapshot', id: f.id, dataset: ds, syncCount: 9, records: [rec('gone', '1', { syncCount: 8 }), rec('same', '2', { syncCount: 2 }), rec('moved', '3', { syncCount: 7 }), rec('mine-same', 'x', { syncCount: 5 }), rec('mine-other', 'x', { syncCount: 6 }), rec('mine-based', 'x', { syncCount: 3 })] });
    } else {
      // The server's store was replaced: it is at 4 and cannot resume from 9.
      send({ type: 'snapshot', id: f.id, dataset: ds, syncCount: 4, records: [rec('mine-based', 'theirs', { syncCount: 3 }), rec('mine-other', 'theirs', { syncCount: 2 }), rec('mine-same', 'mine-same!', { syncCount: 4 }), rec('moved', 'old', { syncCount: 1 }), rec('new', 'n', { syncCount: 4 }), rec('same', '2', { syncCount: 2 })] });
    }
  });
  const client = TandemClient.connect(peer.url, mintToken('alice'), { WebSocket: WebSocketImpl, identity: 'alice', store: new MemoryStore(), pingIntervalMs: 0, conflictHandler: 'takeRemote' });
  await client.waitOnline(5000);
  const d = await client.open('list');
  assert.equal(d.syncCount, 9);
  for (const k of ['mine-new', 'mine-same', 'mine-other', 'mine-based']) await d.put(k, `${k}!`);
  const changes = [];
  const conflicts = [];
  d.on('change', (e) => changes.push(e));
  d.on('conflict', (e) => conflicts.push(e.key));
  client.reconnect();
  await until(() => d.syncCount === 4, 2000, 'the lower snapshot to be taken');
  assert.equal(subscribes[1].since, 9);
  assert.deepEqual(Object.fromEntries(d.records()), { 'mine-based': 'mine-based!', 'mine-new': 'mine-new!', 'mine-other': 'theirs', 'mine-same': 'mine-same!', moved: 'old', new: 'n', same: '2' });
  assert.deepEqual([d.record('mine-new').dirty, d.record('mine-new').syncCount], [true, 0], 'absent there: written as new');
  assert.deepEqual([d.record('mine-same').dirty, d.record('mine-same').syncCount], [false, 4], 'the server holds it: done');
  assert.deepEqual([d.record('mine-based').dirty, d.record('mine-based').syncCount], [true, 3], 'a base the server accepts is kept');
  assert.equal(d.record('mine-other').dirty, false, 'stale: the handler took the remote one');
  assert.deepEqual(conflicts, ['mine-other']);
  assert.deepEqual(changes.flatMap((e) => e.keys).sort(), ['gone', 'mine-other', 'moved', 'new']);
  assert.ok(changes.every((e) => e.source === 'remote'));
  await client.close();
  await peer.close();
});
