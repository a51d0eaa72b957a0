// A move from Cognito Sync to Tandem with `tandem import cognito`, seen by amazon-cognito-js
// 1.1.0: a node with a developer key stands in for AWS; the app's devices sync with it; the
// importer (the AWS SDK for Rust, `--endpoint` at that node) copies the pool into a second
// node's data dir; the app is restarted with its endpoint at the second node and its local
// cache (the library's `window.localStorage`) as it was, with an edit made offline before
// the move. Its next sync must succeed without a conflict, push the edit on top of the
// copied sync counts, and pull what another device wrote before the move.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { POOL, REGION, startServer, tandemBin } from './helpers.mjs';

const AKID = 'AKIDTANDEMJSIMPORT';
const SECRET_KEY = 'js-import-secret-0123456789/abc';

process.env.AWS_SDK_JS_SUPPRESS_MAINTENANCE_MODE_MESSAGE = '1';
const require = createRequire(import.meta.url);
const AWS = require('aws-sdk');
require('amazon-cognito-js');

/** The part of the Web Storage API the library uses, in memory: a device's cache. */
class MemoryLocalStorage {
  #items = new Map();
  getItem(k) {
    return this.#items.has(k) ? this.#items.get(k) : null;
  }
  setItem(k, v) {
    this.#items.set(k, String(v));
  }
  removeItem(k) {
    this.#items.delete(k);
  }
  clear() {
    this.#items.clear();
  }
}

const call = (fn) => new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));

/** The app starting on a device: the endpoints it is configured with, credentials, a manager. */
async function startApp(endpoint, storage, identityId) {
  AWS.config.update({ cognitoidentity: { endpoint }, cognitosync: { endpoint } });
  AWS.config.region = REGION;
  AWS.config.credentials = new AWS.CognitoIdentityCredentials(
    identityId ? { IdentityPoolId: POOL, IdentityId: identityId } : { IdentityPoolId: POOL },
  );
  await call((cb) => AWS.config.credentials.get(cb));
  globalThis.window = { localStorage: storage };
  return new AWS.CognitoSyncManager();
}

function synchronize(dataset) {
  return new Promise((resolve, reject) => {
    dataset.synchronize({
      onSuccess: (ds, newRecords) => resolve(newRecords),
      onFailure: (err) => reject(err),
      onConflict: (ds, conflicts) => reject(new Error(`unexpected conflict on ${conflicts.map((c) => c.getKey())}`)),
      onDatasetDeleted: (ds, name, callback) => callback(true),
      onDatasetsMerged: (ds, names, callback) => callback(false),
    });
  });
}

let source;
let target;
let targetDir;

before(async () => {
  source = await startServer(['--cognito-admin-key', `${AKID}:${SECRET_KEY}`]);
  targetDir = mkdtempSync(join(tmpdir(), 'tandem-js-cognito-import-'));
});

after(async () => {
  await source?.close();
  await target?.close();
  if (targetDir) rmSync(targetDir, { recursive: true, force: true });
});

test('test_cognito_js_device_syncs_without_conflict_after_the_pool_is_imported', async () => {
  // Before the move: the phone and the tablet of one guest identity, both on the source.
  const phoneCache = new MemoryLocalStorage();
  const phone = await startApp(source.endpoint, phoneCache);
  const identityId = AWS.config.credentials.identityId;
  const notes = await call((cb) => phone.openOrCreateDataset('notes', cb));
  await call((cb) => notes.put('a', 'alpha', cb));
  await call((cb) => notes.put('b', 'beta', cb));
  await synchronize(notes);
  await call((cb) => notes.remove('b', cb));
  await call((cb) => notes.put('c', 'gamma', cb));
  await synchronize(notes);

  const tablet = await startApp(source.endpoint, new MemoryLocalStorage(), identityId);
  const tabletNotes = await call((cb) => tablet.openOrCreateDataset('notes', cb));
  await synchronize(tabletNotes);
  await call((cb) => tabletNotes.put('d', 'delta', cb));
  await synchronize(tabletNotes);

  // The phone is offline: an edit waits in its cache.
  await call((cb) => notes.put('a', 'edited offline', cb));

  // The move: the pool is copied into the second node's data dir, which then serves it.
  const output = execFileSync(
    tandemBin(),
    ['import', 'cognito', '--identity-pool-id', POOL, '--endpoint', source.endpoint, '--data-dir', targetDir, '--progress', 'none'],
    {
      env: {
        ...process.env,
        AWS_ACCESS_KEY_ID: AKID,
        AWS_SECRET_ACCESS_KEY: SECRET_KEY,
        AWS_SESSION_TOKEN: '',
        AWS_PROFILE: '',
        AWS_CONFIG_FILE: '/dev/null',
        AWS_SHARED_CREDENTIALS_FILE: '/dev/null',
        AWS_EC2_METADATA_DISABLED: 'true',
        RUST_LOG: 'warn',
      },
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  assert.equal(output, '');
  target = await startServer([], { dataDir: targetDir });

  // The app restarts pointed at the second node, its cache as it was.
  const moved = await startApp(target.endpoint, phoneCache, identityId);
  assert.equal(AWS.config.credentials.identityId, identityId);
  const movedNotes = await call((cb) => moved.openOrCreateDataset('notes', cb));
  await synchronize(movedNotes);

  // Pulled the tablet's write, kept the removal, pushed the offline edit above the copied count.
  assert.equal(await call((cb) => movedNotes.get('d', cb)), 'delta');
  // (The library reads a removed record as '': docs/COGNITO.md, gotcha 3.)
  assert.equal(await call((cb) => movedNotes.get('b', cb)), '');
  const sync = new AWS.CognitoSync({ maxRetries: 0 });
  const answer = await sync.listRecords({ IdentityPoolId: POOL, IdentityId: identityId, DatasetName: 'notes', LastSyncCount: 0 }).promise();
  assert.equal(answer.DatasetSyncCount, 4);
  assert.deepEqual(
    Object.fromEntries(answer.Records.map((r) => [r.Key, [r.Value, r.SyncCount]])),
    { a: ['edited offline', 4], c: ['gamma', 2], d: ['delta', 3] },
  );
});
