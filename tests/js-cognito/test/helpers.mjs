// Test harness: a real `tandem serve` with the Cognito endpoints on, one per test file.
//
// The binary comes from $TANDEM_BIN, else $CARGO_TARGET_DIR/debug/tandem, else
// ../../target/debug/tandem (relative to tests/js-cognito), built with
// `cargo build -p tandem-server`.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

export const REGION = 'us-east-1';
export const POOL = `${REGION}:6a1b3c2d-4e5f-4a6b-8c7d-9e0f1a2b3c4d`;
export const SECRET = 'tandem-js-cognito-tests-secret-0123456789abcdef';

export function tandemBin() {
  const candidates = [
    process.env.TANDEM_BIN,
    process.env.CARGO_TARGET_DIR && resolve(process.env.CARGO_TARGET_DIR, 'debug/tandem'),
    resolve(here, '../../../target/debug/tandem'),
  ];
  const bin = candidates.find((p) => p && existsSync(p));
  if (!bin) {
    throw new Error('tandem binary not found: run `cargo build -p tandem-server` or set TANDEM_BIN');
  }
  return bin;
}

/**
 * Starts `tandem serve` on a loopback port with the identity pool `POOL`, in `dataDir` or a
 * temp data dir (removed on close only when made here).
 */
export async function startServer(extraArgs = [], { dataDir: givenDir } = {}) {
  const dataDir = givenDir ?? mkdtempSync(join(tmpdir(), 'tandem-js-cognito-'));
  const args = ['serve', '--listen', '127.0.0.1:0', '--jwt-secret', SECRET, '--data-dir', dataDir, '--drain-delay', '0', '--cognito-identity-pool', POOL, ...extraArgs];
  const proc = spawn(tandemBin(), args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } });
  let log = '';
  proc.stderr.on('data', (d) => (log += d));
  const addr = await new Promise((resolveAddr, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`tandem did not start in 30 s: ${log}`)), 30_000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/tandem listening on (\S+)/);
      if (m) {
        clearTimeout(timer);
        resolveAddr(m[1]);
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`tandem exited early (${code}): ${log}`));
    });
  });
  proc.removeAllListeners('exit');
  // Keep draining stdout so the child never blocks on a full pipe.
  proc.stdout.resume();
  return {
    endpoint: `http://${addr}`,
    log: () => log,
    async close() {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGTERM');
        await exited;
      }
      if (!givenDir) rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** An HS256 JWT of `issuer` for `sub`, signed with the node's `--jwt-secret`: a login token. */
export function mintLogin(sub, issuer) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ iss: issuer, sub, iat: now, exp: now + 3600 })}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}
