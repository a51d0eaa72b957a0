// Test harness: a real `tandem` process per test file, HS256 tokens, client factories.
//
// The binary comes from $TANDEM_BIN, else $CARGO_TARGET_DIR/debug/tandem, else
// ../../target/debug/tandem (relative to clients/js), built with `cargo build -p tandem-server`.

import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TandemClient, MemoryStore } from '../src/tandem.js';

const here = dirname(fileURLToPath(import.meta.url));

/** Node 22+ has a global WebSocket; on Node 20 the tests use the `ws` dev dependency. */
export const WebSocketImpl = globalThis.WebSocket ?? (await import('ws')).WebSocket;

export function tandemBin() {
  const bin =
    process.env.TANDEM_BIN ??
    [process.env.CARGO_TARGET_DIR && resolve(process.env.CARGO_TARGET_DIR, 'debug/tandem'), resolve(here, '../../../target/debug/tandem')].find(
      (p) => p && existsSync(p),
    ) ??
    resolve(here, '../../../target/debug/tandem');
  if (!existsSync(bin)) {
    throw new Error(`tandem binary not found at ${bin}: run \`cargo build -p tandem-server\` or set TANDEM_BIN`);
  }
  return bin;
}

export const SECRET = 'tandem-js-sdk-tests-secret-0123456789abcdef';

/** An HS256 JWT for `sub`, valid for `ttlSeconds`. */
export function mintToken(sub, ttlSeconds = 3600, secret = SECRET) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, iat: now, exp: now + ttlSeconds })}`;
  const sig = createHmac('sha256', secret).update(body).digest('base64url');
  return `${body}.${sig}`;
}

/**
 * Starts `tandem serve` on a loopback port with a temp data dir. `restart()` stops it and
 * starts it again on the same port and data dir. `dataDir`: serve another (stopped) server's
 * store, which this one then owns and removes on `close()`.
 * @param {{ dev?: boolean, port?: number, dataDir?: string, extraArgs?: string[] }} [opts]
 */
export async function startServer(opts = {}) {
  const dataDir = opts.dataDir ?? mkdtempSync(join(tmpdir(), 'tandem-js-'));
  const server = {
    dataDir,
    port: opts.port ?? 0,
    addr: '',
    url: '',
    httpUrl: '',
    proc: /** @type {import('node:child_process').ChildProcess | null} */ (null),
    log: '',
    async start() {
      // No load balancer to drain for: a stopped server closes its sessions at once.
      const args = ['serve', '--listen', `127.0.0.1:${this.port}`, '--jwt-secret', SECRET, '--data-dir', dataDir, '--drain-delay', '0'];
      if (opts.dev) args.push('--dev');
      args.push(...(opts.extraArgs ?? []));
      const proc = spawn(tandemBin(), args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } });
      this.proc = proc;
      proc.stderr.on('data', (d) => (this.log += d));
      const addr = await new Promise((resolveAddr, reject) => {
        let out = '';
        const onData = (d) => {
          out += d;
          const m = out.match(/tandem listening on (\S+)/);
          if (m) {
            proc.stdout.off('data', onData);
            resolveAddr(m[1]);
          }
        };
        proc.stdout.on('data', onData);
        proc.once('exit', (code) => reject(new Error(`tandem exited early (${code}): ${this.log}`)));
        setTimeout(() => reject(new Error(`tandem did not start in 30 s: ${this.log}`)), 30_000).unref();
      });
      proc.removeAllListeners('exit');
      this.addr = addr;
      this.port = Number(addr.split(':').pop());
      this.url = `ws://${addr}/v1/sync`;
      this.httpUrl = `http://${addr}`;
      return this;
    },
    /** SIGTERM (clients get 4000 "going away") and wait for the exit. */
    async stop(signal = 'SIGTERM') {
      const proc = this.proc;
      if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill(signal);
      await exited;
      this.proc = null;
    },
    async restart() {
      await this.stop();
      // The port was just released; retry briefly in case it is not free yet.
      for (let i = 0; ; i++) {
        try {
          return await this.start();
        } catch (e) {
          if (i >= 20) throw e;
          await sleep(100);
        }
      }
    },
    async close() {
      await this.stop();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
  return server.start();
}

/** A client for `sub` against `server`, with fast backoff for tests. */
export function client(server, sub, options = {}) {
  return TandemClient.connect(server.url, () => mintToken(sub), {
    WebSocket: WebSocketImpl,
    identity: sub,
    store: new MemoryStore(),
    backoff: { initialMs: 50, maxMs: 500 },
    ...options,
  });
}

/** A client that is online. */
export async function onlineClient(server, sub, options = {}) {
  const c = client(server, sub, options);
  await c.waitOnline(5000);
  return c;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns truthy, or fails after `timeoutMs`. */
export async function until(fn, timeoutMs = 5000, what = 'condition') {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** Resolves with the next `event` of `emitter`, or rejects after `timeoutMs`. */
export function nextEvent(emitter, event, timeoutMs = 5000) {
  return new Promise((resolveEv, reject) => {
    const t = setTimeout(() => {
      off();
      reject(new Error(`no ${event} event within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = emitter.on(event, (v) => {
      clearTimeout(t);
      off();
      resolveEv(v);
    });
  });
}

export function uniqueName(prefix = 'ds') {
  return `${prefix}-${randomBytes(4).toString('hex')}`;
}

/**
 * A client whose "network" the test controls: its sockets are tracked, and while the
 * network is down its token provider fails, so reconnect attempts fail too.
 * `startDown`: the network is down from the start (the client has never been online).
 * `stripReady`: fields to delete from `ready` frames, as from a server that does not send them.
 * `patchReady`: fields to set in `ready` frames, as from a server that sends other values
 * (e.g. `{ protocol: 2 }`: no server speaking another protocol version exists yet).
 * @param {{ startDown?: boolean, stripReady?: string[], patchReady?: object }} [net]
 */
export function controlledClient(server, sub, options = {}, net = {}) {
  const sockets = [];
  const state = { up: !net.startDown };
  const strip = net.stripReady ?? [];
  const patch = net.patchReady ?? null;
  class TrackedWebSocket extends WebSocketImpl {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
    set onmessage(fn) {
      super.onmessage = (ev) => {
        if ((strip.length || patch) && typeof ev.data === 'string' && ev.data.includes('"ready"')) {
          const frame = JSON.parse(ev.data);
          if (frame.type === 'ready') {
            for (const f of strip) delete frame[f];
            Object.assign(frame, patch ?? {});
            return fn({ data: JSON.stringify(frame) });
          }
        }
        return fn(ev);
      };
    }
    get onmessage() {
      return super.onmessage;
    }
  }
  const c = TandemClient.connect(
    server.url,
    () => {
      if (!state.up) throw new Error('network is down');
      return mintToken(sub);
    },
    { WebSocket: TrackedWebSocket, identity: sub, store: new MemoryStore(), backoff: { initialMs: 20, maxMs: 100 }, ...options },
  );
  return {
    client: c,
    /** Cuts the network: the socket closes as a lost connection would, and stays down. */
    cut() {
      state.up = false;
      sockets.at(-1)?.close(4001, 'test: connection lost');
    },
    restore() {
      state.up = true;
    },
  };
}

/** React Native's AsyncStorage contract, kept in memory: string keys and values only, every
 * method async. */
export class MemoryAsyncStorage {
  map = new Map();
  async getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }
  async setItem(key, value) {
    if (typeof key !== 'string' || typeof value !== 'string') throw new TypeError('AsyncStorage stores strings only');
    this.map.set(key, value);
  }
  async removeItem(key) {
    this.map.delete(key);
  }
  async getAllKeys() {
    return [...this.map.keys()];
  }
}
