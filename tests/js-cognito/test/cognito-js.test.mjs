// amazon-cognito-js 1.1.0 on aws-sdk v2: the library's README example, unchanged but for the
// endpoint configuration, against a real node. The library keeps its cache in the browser's
// `window.localStorage`; here each "device" gets its own in-memory one.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { POOL, REGION, mintLogin, startServer } from './helpers.mjs';

const ISSUER = 'https://login.example.com';
/** The Logins key of `ISSUER`: the issuer without `https://`. */
const PROVIDER = 'login.example.com';

process.env.AWS_SDK_JS_SUPPRESS_MAINTENANCE_MODE_MESSAGE = '1';
const require = createRequire(import.meta.url);
const AWS = require('aws-sdk');
require('amazon-cognito-js');

/** The part of the Web Storage API the library uses, in memory. */
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

/** A new device: its own local cache, then the README's `new AWS.CognitoSyncManager()`. */
function newDevice() {
  // StoreLocalStorage reads `window.localStorage` when the manager is made.
  globalThis.window = { localStorage: new MemoryLocalStorage() };
  return new AWS.CognitoSyncManager();
}

const call = (fn) => new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));

/** README step 6, with the conflict and merge handlers given by the test. */
function synchronize(dataset, onConflict, onDatasetsMerged) {
  return new Promise((resolve, reject) => {
    dataset.synchronize({
      onSuccess: (ds, newRecords) => resolve(newRecords),
      onFailure: (err) => reject(err),
      onConflict: onConflict ?? ((ds, conflicts, callback) => reject(new Error(`unexpected conflict on ${conflicts.map((c) => c.getKey())}`))),
      onDatasetDeleted: (ds, name, callback) => callback(true),
      onDatasetsMerged: onDatasetsMerged ?? ((ds, names, callback) => callback(false)),
    });
  });
}

let server;
let sync;

before(async () => {
  server = await startServer(['--jwt-issuer', ISSUER]);
  // The only change from the README: both clients' endpoint is the node.
  AWS.config.update({ cognitoidentity: { endpoint: server.endpoint }, cognitosync: { endpoint: server.endpoint } });
  AWS.config.region = REGION;
  AWS.config.credentials = new AWS.CognitoIdentityCredentials({
    IdentityPoolId: POOL,
  });
  await call((cb) => AWS.config.credentials.get(cb));
  // A plain aws-sdk v2 client with the same credentials, to see what the server holds.
  sync = new AWS.CognitoSync({ maxRetries: 0 });
});

after(async () => {
  await server?.close();
});

async function serverRecords(datasetName) {
  const answer = await sync
    .listRecords({ IdentityPoolId: POOL, IdentityId: sync.config.credentials.identityId, DatasetName: datasetName, LastSyncCount: 0 })
    .promise();
  return Object.fromEntries(answer.Records.map((r) => [r.Key, [r.Value, r.SyncCount]]));
}

test('test_cognito_js_readme_example_puts_and_synchronizes', async () => {
  assert.ok(AWS.config.credentials.identityId.startsWith(`${REGION}:`), AWS.config.credentials.identityId);
  const client = newDevice();
  const dataset = await call((cb) => client.openOrCreateDataset('myDatasetName', cb));
  await call((cb) => dataset.put('newRecord', 'newValue', cb));
  await synchronize(dataset);

  assert.deepEqual(await serverRecords('myDatasetName'), { newRecord: ['newValue', 1] });
  assert.equal(await call((cb) => dataset.get('newRecord', cb)), 'newValue');

  // A second device of the same identity pulls it.
  const other = await call((cb) => newDevice().openOrCreateDataset('myDatasetName', cb));
  // (onSuccess's records are those of the library's last round, empty after a pull.)
  await synchronize(other);
  assert.equal(await call((cb) => other.get('newRecord', cb)), 'newValue');
});

test('test_cognito_js_conflict_between_two_devices_is_resolved_by_on_conflict', async () => {
  const phone = await call((cb) => newDevice().openOrCreateDataset('scores', cb));
  const laptop = await call((cb) => newDevice().openOrCreateDataset('scores', cb));

  await call((cb) => phone.put('best', 'phone', cb));
  await synchronize(phone);
  await call((cb) => laptop.put('best', 'laptop', cb));

  // The laptop's write is stale: the README's handler with custom logic joins both values.
  const seen = [];
  await synchronize(laptop, (dataset, conflicts, callback) => {
    const resolved = [];
    for (const conflict of conflicts) {
      seen.push([conflict.getKey(), conflict.getRemoteRecord().getValue(), conflict.getLocalRecord().getValue()]);
      resolved.push(conflict.resolveWithValue(`${conflict.getRemoteRecord().getValue()}+${conflict.getLocalRecord().getValue()}`));
    }
    dataset.resolve(resolved, () => callback(true));
  });
  assert.deepEqual(seen, [['best', 'phone', 'laptop']]);
  assert.deepEqual(await serverRecords('scores'), { best: ['phone+laptop', 2] });

  // The phone syncs again and gets the resolution.
  await synchronize(phone);
  assert.equal(await call((cb) => phone.get('best', cb)), 'phone+laptop');
});

test('test_cognito_js_guest_that_logs_in_is_merged_into_the_account', async () => {
  const logins = { [PROVIDER]: mintLogin('alice', ISSUER) };
  // Alice's account, made on a laptop that logged in, with a dataset.
  AWS.config.credentials = new AWS.CognitoIdentityCredentials({ IdentityPoolId: POOL, Logins: logins });
  await call((cb) => AWS.config.credentials.get(cb));
  const account = AWS.config.credentials.identityId;
  const laptop = await call((cb) => newDevice().openOrCreateDataset('profile', cb));
  await call((cb) => laptop.put('name', 'alice', cb));
  await synchronize(laptop);

  // A guest on a phone writes a dataset of the same name, then logs in as alice.
  const guestCredentials = new AWS.CognitoIdentityCredentials({ IdentityPoolId: POOL });
  AWS.config.credentials = guestCredentials;
  await call((cb) => guestCredentials.get(cb));
  const guest = guestCredentials.identityId;
  assert.notEqual(guest, account);
  const phoneManager = newDevice();
  const phone = await call((cb) => phoneManager.openOrCreateDataset('profile', cb));
  await call((cb) => phone.put('theme', 'dark', cb));
  await synchronize(phone);
  const guestKeys = new AWS.Credentials(guestCredentials.accessKeyId, guestCredentials.secretAccessKey, guestCredentials.sessionToken);

  // aws-sdk v2's way to log in: add Logins and refresh.
  guestCredentials.params.Logins = logins;
  guestCredentials.expired = true;
  await call((cb) => guestCredentials.get(cb));
  assert.equal(guestCredentials.identityId, account);

  // The phone opens `profile` again, now the account's (the library keys its cache by
  // identity), and its sync is told of the guest's copy under another name.
  const mine = await call((cb) => phoneManager.openOrCreateDataset('profile', cb));
  let merged = [];
  await assert.rejects(
    synchronize(mine, undefined, (ds, names, callback) => {
      merged = names;
      callback(false);
    }),
    /onDatasetsMerged/,
  );
  assert.equal(merged.length, 1, `merged: ${merged}`);
  assert.match(merged[0], /^profile\./);
  const copy = await call((cb) => phoneManager.openOrCreateDataset(merged[0], cb));
  await synchronize(copy);
  assert.equal(await call((cb) => copy.get('theme', cb)), 'dark');

  // The guest's old credentials no longer work.
  const old = new AWS.CognitoSync({ credentials: guestKeys, maxRetries: 0 });
  await assert.rejects(
    old.listRecords({ IdentityPoolId: POOL, IdentityId: guest, DatasetName: 'profile' }).promise(),
    (e) => e.code === 'NotAuthorizedException' && e.statusCode === 403,
  );
});
