// The package as published: version agreement, the exports map, the committed minified
// build (which the gateway embeds) and the generated README parts are up to date, and the
// minified module works against a real server.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as sdk from '../src/tandem.js';
import { startServer, mintToken, WebSocketImpl, uniqueName } from './helpers.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.close();
});

test('VERSION, package.json and CHANGELOG.md agree; the package is publishable', () => {
  assert.match(pkg.version, /^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$/, 'semver');
  assert.equal(sdk.VERSION, pkg.version);
  assert.equal(pkg.private, undefined, 'not marked private');
  assert.ok(readFileSync(join(root, 'CHANGELOG.md'), 'utf8').includes(`## ${pkg.version}\n`), 'CHANGELOG.md has a section for this version');
  assert.deepEqual(pkg.peerDependencies, { react: '>=18' });
  assert.deepEqual(pkg.dependencies, undefined, 'no runtime dependencies');
  for (const [entry, target] of Object.entries(pkg.exports)) {
    for (const file of typeof target === 'string' ? [target] : Object.values(target)) {
      assert.ok(existsSync(join(root, file)), `${entry} → ${file} exists`);
      assert.ok(pkg.files.some((f) => file.replace(/^\.\//, '').startsWith(f)) || file === './package.json', `${file} is in "files"`);
    }
  }
});

test('dist/, the bundle sizes and the API reference in README.md are up to date', () => {
  // Each script exits non-zero, saying what to run, when its output is stale.
  for (const script of ['scripts/build.mjs', 'scripts/api-docs.mjs']) {
    try {
      execFileSync(process.execPath, [script, '--check'], { cwd: root, encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      assert.fail(`${script} --check: ${e.stderr || e.message}`);
    }
  }
  // Every export appears in the reference.
  const readme = readFileSync(join(root, 'README.md'), 'utf8');
  for (const name of Object.keys(sdk)) assert.ok(readme.includes(name), `${name} in README.md`);
});

test('the minified module exports the same API and syncs against the server', async () => {
  const min = await import('@tandem/client/min');
  assert.deepEqual(Object.keys(min).sort(), Object.keys(sdk).sort());
  assert.equal(min.VERSION, pkg.version);
  const name = uniqueName();
  const c = min.TandemClient.connect(server.url, () => mintToken('alice'), { WebSocket: WebSocketImpl, identity: 'alice', store: new min.MemoryStore() });
  await c.waitOnline(5000);
  const d = await c.open(name);
  await d.put('k', 'from the minified build');
  await c.flush({ timeoutMs: 5000 });
  assert.equal(c.status.pending, 0);
  assert.ok(c.status.hasSynced);
  await c.close();
  const check = sdk.TandemClient.connect(server.url, () => mintToken('alice'), { WebSocket: WebSocketImpl, identity: 'alice', store: new sdk.MemoryStore() });
  await check.waitOnline(5000);
  assert.equal((await check.open(name)).get('k'), 'from the minified build');
  await check.close();
});

test('the gateway serves the minified build at /sdk/<version>/tandem.js, gzip when accepted', async (t) => {
  const res = await fetch(`${server.httpUrl}/sdk/${pkg.version}/tandem.js`, { headers: { 'accept-encoding': 'identity' } });
  if (res.status === 404) {
    assert.fail(`GET /sdk/${pkg.version}/tandem.js answers 404: rebuild the server (cargo build -p tandem-server) so that it embeds this version`);
  }
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /javascript/);
  assert.match(res.headers.get('cache-control'), /immutable/);
  assert.equal(await res.text(), readFileSync(join(root, 'dist/tandem.min.js'), 'utf8'));
  // fetch decodes gzip itself: the header says it was sent compressed.
  const gz = await fetch(`${server.httpUrl}/sdk/${pkg.version}/tandem.js`, { headers: { 'accept-encoding': 'gzip, br' } });
  assert.equal(gz.headers.get('content-encoding'), 'gzip');
  assert.match(gz.headers.get('vary') ?? '', /accept-encoding/i);
  assert.equal(await gz.text(), readFileSync(join(root, 'dist/tandem.min.js'), 'utf8'));
  const other = await fetch(`${server.httpUrl}/sdk/0.0.1/tandem.js`);
  assert.equal(other.status, 404, 'another version is not served');
  t.diagnostic(`served ${res.headers.get('content-length') ?? '?'} B plain, ${gz.headers.get('content-length') ?? '?'} B gzip`);
});
