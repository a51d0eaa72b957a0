// Sync status, pause/resume, waitForPendingWrites/flush and the protocol check (issue 14,
// items 5 and 7), against real servers.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { PROTOCOL_VERSION } from '../src/tandem.js';
import { startServer, client, onlineClient, controlledClient, until, uniqueName, sleep } from './helpers.mjs';

let server;
let small;
before(async () => {
  server = await startServer();
  small = await startServer({ extraArgs: ['--max-key-length', '8'] });
});
after(async () => {
  await server?.close();
  await small?.close();
});

/** Whether `p` settled within `ms`. */
async function settledWithin(p, ms) {
  let settled = false;
  p.then(
    () => (settled = true),
    () => (settled = true),
  );
  await sleep(ms);
  return settled;
}

test('status follows connection, pending writes, uploads and lastSyncedAt, one event per change', async () => {
  const ctl = controlledClient(server, 'alice', {}, { startDown: true });
  const c = ctl.client;
  const seen = [];
  const off = c.onStatus((s) => seen.push(s));
  assert.equal(seen.length, 1, 'called at once');
  assert.deepEqual({ ...seen[0] }, { connected: false, uploading: false, pending: 0, lastSyncedAt: null, hasSynced: false, lastError: null });
  assert.equal(c.status, c.status, 'the same object until something changes');
  assert.ok(Object.isFrozen(c.status));

  const d = await c.open(uniqueName());
  await d.put('a', '1');
  await d.put('b', '2');
  await until(() => c.status.pending === 2, 1000, 'pending in the status');
  assert.equal(c.status.hasSynced, false);
  const t0 = Date.now();
  ctl.restore();
  await until(() => c.status.connected && c.status.pending === 0 && c.status.hasSynced, 5000, 'synced');
  const s = c.status;
  assert.ok(s.lastSyncedAt >= t0 && s.lastSyncedAt <= Date.now(), `lastSyncedAt ${s.lastSyncedAt}`);
  assert.equal(s.uploading, false);
  assert.ok(
    seen.some((x) => x.uploading && x.connected),
    'an update on its way shows as uploading',
  );
  for (let i = 1; i < seen.length; i++) {
    const [p, q] = [seen[i - 1], seen[i]];
    assert.ok(Object.keys(q).some((k) => p[k] !== q[k]), `status event ${i} changes a field`);
  }
  await sleep(5); // a later ack moves lastSyncedAt on
  await d.put('c', '3');
  await d.sync();
  await until(() => c.status.lastSyncedAt > s.lastSyncedAt, 1000, 'lastSyncedAt to move');
  off();
  const count = seen.length;
  await d.put('d', '4');
  await sleep(20);
  assert.equal(seen.length, count, 'no calls after unsubscribing');
  await c.close();
});

test('status.lastError: a change set aside is reported, and the next ack clears it', async () => {
  // Started offline, the client does not know the server's limits yet: the long key is
  // queued, and refused for good when it is sent.
  const ctl = controlledClient(small, 'alice', {}, { startDown: true });
  const c = ctl.client;
  const d = await c.open(uniqueName());
  d.on('error', () => {});
  await d.put('much-too-long-key', 'x');
  ctl.restore();
  await c.waitOnline(5000);
  await until(() => c.status.lastError?.code === 'too_large', 5000, 'the error in the status');
  assert.equal(c.status.lastError.key, 'much-too-long-key');
  await d.put('ok', 'y');
  await c.flush().catch(() => {}); // rejects: the set-aside change will never be sent
  await until(() => d.record('ok')?.dirty === false, 5000, 'ok acknowledged');
  assert.equal(c.status.lastError, null, 'cleared by the ack');
  await c.close();
});

test('pause() keeps the client offline, writes stay pending; resume() sends them', async () => {
  const name = uniqueName();
  const c = await onlineClient(server, 'alice');
  const d = await c.open(name);
  c.pause();
  assert.equal(c.paused, true);
  assert.equal(c.state, 'offline');
  await d.put('while-paused', '1');
  await sleep(400); // several backoff periods (50-500 ms): no reconnect
  assert.equal(c.state, 'offline');
  assert.equal(c.status.connected, false);
  assert.equal(d.pending, 1);
  const other = await onlineClient(server, 'alice');
  const o = await other.open(name);
  assert.equal(o.get('while-paused'), undefined, 'not sent while paused');
  c.resume();
  assert.equal(c.paused, false);
  await c.waitOnline(5000);
  await until(() => d.pending === 0, 5000, 'sent after resume');
  await until(() => o.get('while-paused') === '1', 5000, 'the other device to see it');
  await Promise.all([c.close(), other.close()]);
});

test('waitForPendingWrites resolves once the writes pending at the call are acknowledged, across a reconnect', async () => {
  const name = uniqueName();
  const ctl = controlledClient(server, 'alice');
  const c = ctl.client;
  await c.waitOnline(5000);
  const d = await c.open(name);
  await c.waitForPendingWrites({ timeoutMs: 100 }); // nothing pending: at once
  ctl.cut();
  await d.put('a', '1');
  await d.put('x', 'first');
  const waited = c.waitForPendingWrites();
  await d.put('x', 'second'); // edited again after the call: its later version carries it
  assert.equal(await settledWithin(waited, 300), false, 'still waiting while offline');
  ctl.restore();
  await waited;
  const other = await onlineClient(server, 'alice');
  const o = await other.open(name);
  assert.deepEqual([...o.records()], [['a', '1'], ['x', 'second']], 'acknowledged means on the server');
  await Promise.all([c.close(), other.close()]);
});

test('waitForPendingWrites rejects on timeout, on close, and for a change set aside', async () => {
  const ctl = controlledClient(server, 'alice');
  await ctl.client.waitOnline(5000);
  const d = await ctl.client.open(uniqueName());
  ctl.cut();
  await d.put('k', 'v');
  await assert.rejects(ctl.client.waitForPendingWrites({ timeoutMs: 100 }), { code: 'timeout' });
  const onClose = ctl.client.waitForPendingWrites();
  await ctl.client.close();
  await assert.rejects(onClose, { code: 'closed' });

  const ctl2 = controlledClient(small, 'alice', {}, { startDown: true });
  const d2 = await ctl2.client.open(uniqueName());
  d2.on('error', () => {});
  await d2.put('much-too-long-key', 'x');
  const never = ctl2.client.waitForPendingWrites();
  ctl2.restore();
  await assert.rejects(never, (e) => e.code === 'too_large' && e.key === 'much-too-long-key');
  await ctl2.client.close();

  // A client that fails for good (here: a server of another protocol version) cannot send.
  const ctl3 = controlledClient(server, 'alice', {}, { startDown: true, patchReady: { protocol: PROTOCOL_VERSION + 1 } });
  const d3 = await ctl3.client.open(uniqueName());
  await d3.put('k', 'v');
  const failing = ctl3.client.waitForPendingWrites();
  ctl3.restore();
  await assert.rejects(failing, { code: 'unsupported_protocol' });
  await assert.rejects(ctl3.client.flush(), { code: 'unsupported_protocol' }, 'and at once once failed');
  await ctl3.client.close();
});

test('flush() sends the pending writes of every open dataset (auto-sync off) and waits for them', async () => {
  const [n1, n2] = [uniqueName(), uniqueName()];
  const c = await onlineClient(server, 'alice');
  const [d1, d2] = [await c.open(n1), await c.open(n2)];
  await d1.put('a', '1');
  await d2.put('b', '2');
  await sleep(100);
  assert.equal(c.pending, 2, 'auto-sync is off: nothing sent by itself');
  await c.flush({ timeoutMs: 5000 });
  assert.equal(c.pending, 0);
  const other = await onlineClient(server, 'alice');
  assert.equal((await other.open(n1)).get('a'), '1');
  assert.equal((await other.open(n2)).get('b'), '2');
  await Promise.all([c.close(), other.close()]);
});

test('ready.protocol: the version the server states is checked; another one fails the client', async () => {
  const ok = await onlineClient(server, 'alice');
  assert.equal(ok.protocol, PROTOCOL_VERSION);
  await ok.close();

  const ctl = controlledClient(server, 'alice', {}, { patchReady: { protocol: PROTOCOL_VERSION + 1 } });
  const failed = new Promise((resolve) => ctl.client.on('failed', resolve));
  await assert.rejects(ctl.client.waitOnline(5000), { code: 'unsupported_protocol' });
  const e = await failed;
  assert.equal(e.code, 'unsupported_protocol');
  assert.match(e.message, /protocol version 2.*speaks version 1/);
  assert.equal(ctl.client.state, 'failed');
  assert.equal(ctl.client.protocol, PROTOCOL_VERSION + 1);
  assert.equal(ctl.client.status.lastError?.code, 'unsupported_protocol');
  await sleep(200);
  assert.equal(ctl.client.state, 'failed', 'no reconnecting to a server it cannot speak to');
  await ctl.client.close();
});
