// Connecting, authenticating, the local cache and the basic sync round trip.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { TandemClient, TandemError, MemoryStore, shouldReconnect } from '../src/tandem.js';
import { startServer, client, onlineClient, mintToken, WebSocketImpl, nextEvent, until, uniqueName } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

test('connects, authenticates and answers pings', async () => {
  const states = [];
  const c = TandemClient.connect(server.url, () => mintToken('alice'), { WebSocket: WebSocketImpl, store: new MemoryStore() });
  c.on('state', (s) => states.push(s));
  const ready = await nextEvent(c, 'ready');
  assert.equal(ready.identity, 'alice');
  assert.equal(c.state, 'online');
  assert.equal(c.identity, 'alice', 'identity is read from the token when not given');
  assert.ok(c.session.expiresAt > Date.now());
  assert.ok((await c.ping()) >= 0);
  assert.deepEqual(states, ['online'], 'connecting was entered before the listener');
  await c.close();
  assert.equal(c.state, 'closed');
});

test('an http url is turned into the sync endpoint', async () => {
  const c = TandemClient.connect(server.httpUrl, mintToken('alice'), { WebSocket: WebSocketImpl, store: new MemoryStore() });
  await c.waitOnline(5000);
  await c.close();
});

test('a refused token stops the client with an error (close 4500)', async () => {
  const c = TandemClient.connect(server.url, () => mintToken('alice', 3600, 'a-different-secret-of-at-least-32-bytes!!'), {
    WebSocket: WebSocketImpl,
    store: new MemoryStore(),
    backoff: { initialMs: 10, maxMs: 20 },
  });
  const err = await nextEvent(c, 'failed');
  assert.ok(err instanceof TandemError);
  assert.equal(err.closeCode, 4500);
  assert.equal(c.state, 'failed');
  await assert.rejects(c.waitOnline(100), TandemError);
  await c.close();
});

test('close codes: 4000-4499 reconnect, 4500-4999 do not', () => {
  for (const code of [4000, 4001, 4002, 4003, 4004, 1001, 1006, 1011]) assert.ok(shouldReconnect(code), String(code));
  for (const code of [4500, 4501, 4502, 1000, 1008]) assert.ok(!shouldReconnect(code), String(code));
});

test('a client for another identity than the token names fails', async () => {
  const c = TandemClient.connect(server.url, () => mintToken('mallory'), { WebSocket: WebSocketImpl, identity: 'alice', store: new MemoryStore() });
  const err = await nextEvent(c, 'failed');
  assert.equal(err.code, 'forbidden');
  await c.close();
});

test('put, sync, get round trip', async () => {
  const name = uniqueName();
  const a = await onlineClient(server, 'alice');
  const ds = await a.open(name);
  assert.equal(ds.owner, 'alice');
  assert.equal(ds.syncCount, 0);
  await ds.put('milk', '2');
  await ds.put('eggs', '12');
  assert.equal(ds.get('milk'), '2');
  assert.equal(ds.pending, 2);
  assert.deepEqual(ds.record('milk').dirty, true);

  const out = await ds.sync();
  assert.equal(out.pushed, 2);
  assert.equal(out.conflicts, 0);
  assert.equal(out.syncCount, 1);
  assert.equal(ds.pending, 0);
  assert.equal(ds.record('milk').syncCount, 1);

  await ds.remove('eggs');
  assert.equal(ds.get('eggs'), undefined);
  assert.equal(ds.pending, 1);
  await ds.sync();
  assert.equal(ds.pending, 0);
  assert.equal(ds.record('eggs'), undefined, 'a synced removal leaves nothing locally');

  // A second device of the same user gets the server's state on open.
  const a2 = await onlineClient(server, 'alice');
  const ds2 = await a2.open(name);
  assert.deepEqual([...ds2.records()], [['milk', '2']]);
  assert.equal(ds2.syncCount, 2);
  await Promise.all([a.close(), a2.close()]);
});

test('reads and writes work offline and the cache survives a restart of the client', async () => {
  const store = new MemoryStore();
  const name = uniqueName();
  // A server that does not exist: the client stays offline.
  const off = TandemClient.connect('ws://127.0.0.1:9/v1/sync', () => mintToken('alice'), {
    WebSocket: WebSocketImpl,
    identity: 'alice',
    store,
    backoff: { initialMs: 20, maxMs: 50 },
  });
  const ds = await off.open(name);
  await ds.put('draft', 'hello');
  await ds.put('gone', 'x');
  await ds.remove('gone');
  assert.notEqual(off.state, 'online');
  assert.equal(ds.get('draft'), 'hello');
  assert.equal(ds.pending, 2);
  await assert.rejects(ds.sync(), (e) => e.code === 'offline');
  await off.close();

  // The same store with a real server: the pending changes are sent on open.
  const on = client(server, 'alice', { store });
  const ds2 = await on.open(name);
  assert.equal(ds2.get('draft'), 'hello');
  await until(() => ds2.pending === 0, 5000, 'the pending changes to be synced');
  const check = await onlineClient(server, 'alice');
  const ds3 = await check.open(name);
  assert.deepEqual([...ds3.records()], [['draft', 'hello']]);
  await Promise.all([on.close(), check.close()]);
});

test('a write over the limits the server announced is refused with its code, before it is queued', async () => {
  const c = await onlineClient(server, 'alice');
  const ds = await c.open(uniqueName());
  await assert.rejects(ds.put('k'.repeat(2000), 'too long a key'), (e) => e instanceof TandemError && e.code === 'too_large' && e.limit === 'max_key_length' && e.max === 1024);
  assert.equal(ds.pending, 0, 'nothing queued');
  await c.close();
});

test('sync errors from the server reject with their code', async () => {
  const c = await onlineClient(server, 'alice');
  const carol = await onlineClient(server, 'carol');
  const name = uniqueName();
  await carol.grant(name, 'alice', 'read');
  const ds = await c.open(name, { owner: 'carol' });
  await ds.put('k', 'v'); // read access only
  await assert.rejects(ds.sync(), (e) => e instanceof TandemError && e.code === 'forbidden' && e.server === true);
  assert.equal(ds.pending, 1, 'the change stays pending');
  await Promise.all([c.close(), carol.close()]);
});

test('the token provider is asked again before the token expires', async () => {
  const reasons = [];
  const c = TandemClient.connect(
    server.url,
    ({ reason }) => {
      reasons.push(reason);
      return mintToken('alice', 3); // expires in 3 s: refreshed after ~1.5 s
    },
    { WebSocket: WebSocketImpl, store: new MemoryStore() },
  );
  await c.waitOnline(5000);
  const first = c.session.expiresAt;
  let reconnects = 0;
  c.on('connecting', () => reconnects++);
  await until(() => reasons.includes('refresh') && c.session && c.session.expiresAt > first, 5000, 'a token refresh');
  await new Promise((r) => setTimeout(r, 2500)); // past the first token's expiry
  assert.equal(c.state, 'online');
  assert.equal(reconnects, 0, 'the session was extended, not replaced');
  await c.close();
});

test('invalid use throws clearly', async () => {
  assert.throws(() => TandemClient.connect(server.url, 'x', { WebSocket: 42 }), TandemError);
  const c = await onlineClient(server, 'alice');
  await assert.rejects(c.open('bad name'), (e) => e.code === 'bad_request');
  const ds = await c.open(uniqueName());
  await assert.rejects(ds.put('k', 42), TypeError);
  await assert.rejects(ds.put('', 'v'), TypeError);
  await c.close();
});

test('open() waiting for an identity rejects when the client is closed', async () => {
  const c = TandemClient.connect(server.url, () => new Promise(() => {}), { WebSocket: WebSocketImpl, store: new MemoryStore() });
  const opening = c.open('settings');
  await c.close();
  await assert.rejects(opening, (e) => e.code === 'closed');
});

test('an ack does not clean a newer edit of a key that was discarded and edited again meanwhile', async () => {
  const name = uniqueName();
  /** Runs once, right after the first update naming `k` went out (its ack cannot have come yet). */
  let onSent = null;
  class Watched extends WebSocketImpl {
    send(data) {
      super.send(data);
      if (onSent && typeof data === 'string' && data.includes('"update"') && data.includes('"k"')) {
        const hook = onSent;
        onSent = null;
        queueMicrotask(hook);
      }
    }
  }
  const a = TandemClient.connect(server.url, () => mintToken('alice'), { WebSocket: Watched, identity: 'alice', store: new MemoryStore(), autoSync: false });
  await nextEvent(a, 'ready');
  const ds = await a.open(name);
  await ds.put('k', 'a');
  // While the update with `a` is on its way, the key is dropped and edited again.
  const edited = new Promise((resolve) => {
    onSent = () => {
      assert.equal(ds.discard('k'), true);
      ds.put('k', 'b').then(resolve);
    };
  });
  await ds.sync();
  await edited;
  assert.deepEqual(ds.dirtyKeys(), ['k'], '`b` was never sent: still pending');
  assert.equal(ds.get('k'), 'b');
  await ds.sync();
  const b = await onlineClient(server, 'alice');
  const other = await b.open(name);
  assert.equal(other.get('k'), 'b');
  await Promise.all([a.close(), b.close()]);
});
