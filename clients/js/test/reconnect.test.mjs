// Losing the connection: offline edits, reconnect with backoff, re-subscription.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { TandemClient, MemoryStore } from '../src/tandem.js';
import { startServer, onlineClient, mintToken, WebSocketImpl, nextEvent, until, uniqueName, sleep } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

/** A client whose "network" the test controls: its sockets are tracked, and while the
 * network is down its token provider fails, so reconnect attempts fail too. */
function controlledClient(sub, options = {}) {
  const sockets = [];
  const net = { up: true };
  class TrackedWebSocket extends WebSocketImpl {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  const c = TandemClient.connect(
    server.url,
    () => {
      if (!net.up) throw new Error('network is down');
      return mintToken(sub);
    },
    { WebSocket: TrackedWebSocket, identity: sub, store: new MemoryStore(), backoff: { initialMs: 20, maxMs: 100 }, ...options },
  );
  return {
    client: c,
    /** Cuts the network: the socket closes as a lost connection would, and stays down. */
    cut() {
      net.up = false;
      sockets.at(-1)?.close(4001, 'test: connection lost');
    },
    restore() {
      net.up = true;
    },
  };
}

test('offline edits (server stopped) are sent after the server is back', async () => {
  const name = uniqueName();
  const alice = await onlineClient(server, 'alice', { autoSync: true });
  const bob = await onlineClient(server, 'bob');
  const a = await alice.open(name);
  await alice.grant(name, 'bob', 'write');
  const b = await bob.open(name, { owner: 'alice' });
  await a.put('milk', '1');
  await until(() => b.get('milk') === '1', 2000, 'bob to see milk');

  const states = [];
  alice.on('state', (s) => states.push(s));
  const wentOffline = nextEvent(alice, 'offline');
  await server.stop(); // SIGTERM: the server closes sessions with 4000 "going away, reconnect"
  await wentOffline;
  await a.put('bread', '2');
  await a.put('milk', '3');
  await a.remove('nothing');
  assert.equal(a.pending, 3);
  assert.equal(a.get('bread'), '2', 'reads work offline');

  await server.restart();
  await alice.waitOnline(10_000);
  await until(() => a.pending === 0, 5000, 'the offline edits to be synced');
  await bob.waitOnline(10_000);
  await until(() => b.get('bread') === '2' && b.get('milk') === '3', 5000, 'bob to converge');
  assert.ok(states.includes('connecting') && states.at(-1) === 'online', states.join(','));
  await Promise.all([alice.close(), bob.close()]);
});

test('offline edits (socket lost) are sent after reconnect, and subscriptions are restored', async () => {
  const name = uniqueName();
  const net = controlledClient('alice', { autoSync: true });
  const alice = net.client;
  await alice.waitOnline(5000);
  const bob = await onlineClient(server, 'bob');
  const a = await alice.open(name);
  await alice.grant(name, 'bob', 'write');
  const b = await bob.open(name, { owner: 'alice' });

  const offline = nextEvent(alice, 'offline');
  net.cut();
  await offline;
  await a.put('offline-edit', 'yes');
  assert.equal(a.pending, 1);
  await sleep(300);
  assert.notEqual(alice.state, 'online', 'reconnect attempts fail while the network is down');
  assert.equal(b.get('offline-edit'), undefined);

  net.restore();
  await alice.waitOnline(5000);
  await until(() => b.get('offline-edit') === 'yes', 3000, 'bob to get the offline edit');
  assert.equal(a.pending, 0);

  // The subscription was restored: Bob's writes reach Alice live.
  await b.put('from-bob', 'hi');
  await b.sync();
  await until(() => a.get('from-bob') === 'hi', 1000, 'alice to get a push after the reconnect');
  await Promise.all([alice.close(), bob.close()]);
});

test('reconnect re-subscribes every open dataset and merges what changed meanwhile', async () => {
  const n1 = uniqueName();
  const n2 = uniqueName();
  const net = controlledClient('alice');
  const alice = net.client;
  await alice.waitOnline(5000);
  const other = await onlineClient(server, 'alice');
  const d1 = await alice.open(n1);
  const d2 = await alice.open(n2);
  const o1 = await other.open(n1);
  const o2 = await other.open(n2);

  // Changes made while Alice is away arrive with the re-subscriptions' snapshots.
  const offline = nextEvent(alice, 'offline');
  net.cut();
  await offline;
  await o1.put('a', '1');
  await o2.put('b', '2');
  await Promise.all([o1.sync(), o2.sync()]);
  await sleep(100);
  assert.equal(d1.get('a'), undefined);
  const changes = [nextEvent(d1, 'change'), nextEvent(d2, 'change')];
  net.restore();
  await alice.waitOnline(5000);
  await Promise.all(changes);
  assert.equal(d1.get('a'), '1');
  assert.equal(d2.get('b'), '2');

  // And live pushes flow on both again.
  await o1.put('a', 'after');
  await o2.put('b', 'after');
  await Promise.all([o1.sync(), o2.sync()]);
  await until(() => d1.get('a') === 'after' && d2.get('b') === 'after', 2000, 'pushes on both datasets after reconnect');

  // reconnect() drops and re-establishes the connection at once.
  const online = nextEvent(alice, 'online');
  alice.reconnect();
  await online;
  await o1.put('a', 'again');
  await o1.sync();
  await until(() => d1.get('a') === 'again', 2000, 'a push after reconnect()');
  await Promise.all([alice.close(), other.close()]);
});

test('reconnect attempts back off exponentially with jitter', async () => {
  const attempts = [];
  const c = TandemClient.connect(
    server.url,
    () => {
      attempts.push(Date.now());
      throw new Error('no token for you');
    },
    { WebSocket: WebSocketImpl, identity: 'alice', store: new MemoryStore(), backoff: { initialMs: 40, maxMs: 640 } },
  );
  await until(() => attempts.length >= 6, 5000, 'six attempts');
  await c.close();
  const gaps = attempts.slice(1).map((t, i) => t - attempts[i]);
  // Delays are in [base/2, base] with base 40, 80, 160, 320, 640.
  assert.ok(gaps[0] >= 15 && gaps[0] <= 150, `first gap ${gaps[0]}`);
  assert.ok(gaps[4] >= 300, `fifth gap ${gaps[4]}`);
  assert.ok(gaps[4] > gaps[0] * 3, gaps.join(','));
  assert.equal(c.state, 'closed');
});

test('the catch-up after a reconnect retries what the server refused for now (rate_limited)', async () => {
  const opts = { extraArgs: /** @type {string[]} */ ([]) };
  const own = await startServer(opts);
  try {
    const alice = await onlineClient(own, 'alice');
    const datasets = [];
    for (let i = 0; i < 4; i++) datasets.push(await alice.open(uniqueName()));
    const wentOffline = nextEvent(alice, 'offline');
    await own.stop();
    await wentOffline;
    for (const [i, ds] of datasets.entries()) await ds.put('offline', `v${i}`);
    // Back with a limit of 2 frames per second: auth + 4 subscribes + 4 updates do not fit
    // in one burst, so some are refused with the retriable rate_limited.
    opts.extraArgs.push('--max-requests-per-second', '2');
    await own.restart();
    await alice.waitOnline(10_000);
    await until(() => datasets.every((ds) => ds.pending === 0), 20_000, 'every offline edit to be synced');
    const metrics = await (await fetch(`${own.httpUrl}/metrics`)).text();
    assert.match(metrics, /tandem_gateway_errors_total\{code="rate_limited"\} [1-9]/);
    await alice.close();
  } finally {
    await own.close();
  }
});
