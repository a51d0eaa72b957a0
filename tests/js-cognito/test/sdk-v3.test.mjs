// The Cognito walk with the AWS SDK for JavaScript v3: a guest identity from
// @aws-sdk/client-cognito-identity, its credentials on @aws-sdk/client-cognito-sync, with only
// the endpoint pointing at the node.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { CognitoIdentityClient, GetCredentialsForIdentityCommand, GetIdCommand } from '@aws-sdk/client-cognito-identity';
import {
  CognitoSyncClient,
  DeleteDatasetCommand,
  ListRecordsCommand,
  NotAuthorizedException,
  ResourceConflictException,
  UpdateRecordsCommand,
} from '@aws-sdk/client-cognito-sync';
import { POOL, REGION, startServer } from './helpers.mjs';

let server;
let identity;

before(async () => {
  server = await startServer();
  identity = new CognitoIdentityClient({ region: REGION, endpoint: server.endpoint, maxAttempts: 1 });
});

after(async () => {
  await server?.close();
});

/** A guest identity and a cognito-sync client signed with its temporary credentials. */
async function guest() {
  const { IdentityId } = await identity.send(new GetIdCommand({ IdentityPoolId: POOL }));
  const answer = await identity.send(new GetCredentialsForIdentityCommand({ IdentityId }));
  assert.equal(answer.IdentityId, IdentityId);
  const c = answer.Credentials;
  assert.ok(c.AccessKeyId && c.SecretKey && c.SessionToken, 'credentials are complete');
  assert.ok(c.Expiration instanceof Date && c.Expiration > new Date(), 'credentials expire later');
  const sync = new CognitoSyncClient({
    region: REGION,
    endpoint: server.endpoint,
    maxAttempts: 1,
    credentials: { accessKeyId: c.AccessKeyId, secretAccessKey: c.SecretKey, sessionToken: c.SessionToken },
  });
  return { id: IdentityId, sync };
}

test('test_v3_walk_create_list_since_conflict_tombstone_delete', async () => {
  const { id, sync } = await guest();
  assert.ok(id.startsWith(`${REGION}:`), id);
  const ds = { IdentityPoolId: POOL, IdentityId: id, DatasetName: 'walk' };
  const list = (since = 0) => sync.send(new ListRecordsCommand({ ...ds, LastSyncCount: since }));
  const update = async (patches) => {
    const { SyncSessionToken } = await list();
    return sync.send(new UpdateRecordsCommand({ ...ds, SyncSessionToken, RecordPatches: patches, DeviceId: 'js-v3' }));
  };

  const empty = await list();
  assert.equal(empty.DatasetExists, false);
  assert.equal(empty.DatasetSyncCount, 0);

  // Create: one Records entry per patch, each at the new sync count.
  const created = await update([
    { Op: 'replace', Key: 'a', Value: '1', SyncCount: 0 },
    { Op: 'replace', Key: 'b', Value: '2', SyncCount: 0 },
  ]);
  assert.deepEqual(created.Records.map((r) => [r.Key, r.Value, r.SyncCount]), [['a', '1', 1], ['b', '2', 1]]);
  const added = await update([{ Op: 'replace', Key: 'c', Value: '3', SyncCount: 0 }]);
  assert.equal(added.Records[0].SyncCount, 2);

  const all = await list(0);
  assert.equal(all.DatasetExists, true);
  assert.equal(all.DatasetSyncCount, 2);
  assert.deepEqual(all.Records.map((r) => r.Key), ['a', 'b', 'c']);
  const since = await list(1);
  assert.deepEqual(since.Records.map((r) => [r.Key, r.Value]), [['c', '3']]);

  // A stale sync count: ResourceConflictException (409), nothing written.
  const { SyncSessionToken } = await list();
  await assert.rejects(
    sync.send(new UpdateRecordsCommand({ ...ds, SyncSessionToken, RecordPatches: [{ Op: 'replace', Key: 'a', Value: 'x', SyncCount: 0 }] })),
    (e) => e instanceof ResourceConflictException && e.$metadata.httpStatusCode === 409,
  );
  const unchanged = await list();
  assert.equal(unchanged.DatasetSyncCount, 2);
  assert.equal(unchanged.Records.find((r) => r.Key === 'a').Value, '1');

  // Remove: a tombstone (no Value) listed since the previous count.
  const removed = await update([{ Op: 'remove', Key: 'b', SyncCount: 1 }]);
  assert.equal(removed.Records[0].SyncCount, 3);
  const tomb = (await list(2)).Records;
  assert.deepEqual(tomb.map((r) => r.Key), ['b']);
  assert.equal(tomb[0].Value, undefined);
  assert.equal(tomb[0].SyncCount, 3);

  // Delete: gone, and a client past an older count is told.
  await sync.send(new DeleteDatasetCommand(ds));
  const gone = await list(2);
  assert.equal(gone.DatasetExists, false);
  assert.equal(gone.DatasetDeletedAfterRequestedSyncCount, true);
  assert.deepEqual(gone.Records ?? [], []);
});

test('test_v3_credentials_of_one_identity_are_refused_on_another', async () => {
  const a = await guest();
  const b = await guest();
  const bDataset = { IdentityPoolId: POOL, IdentityId: b.id, DatasetName: 'private' };
  const { SyncSessionToken } = await b.sync.send(new ListRecordsCommand(bDataset));
  await b.sync.send(new UpdateRecordsCommand({ ...bDataset, SyncSessionToken, RecordPatches: [{ Op: 'replace', Key: 'k', Value: 'b', SyncCount: 0 }] }));

  const refused = (e) => e instanceof NotAuthorizedException && e.$metadata.httpStatusCode === 403;
  await assert.rejects(a.sync.send(new ListRecordsCommand(bDataset)), refused);
  await assert.rejects(
    a.sync.send(new UpdateRecordsCommand({ ...bDataset, SyncSessionToken, RecordPatches: [{ Op: 'replace', Key: 'k', Value: 'a', SyncCount: 1 }] })),
    refused,
  );
  await assert.rejects(a.sync.send(new DeleteDatasetCommand(bDataset)), refused);

  const still = await b.sync.send(new ListRecordsCommand(bDataset));
  assert.deepEqual(still.Records.map((r) => [r.Key, r.Value]), [['k', 'b']]);
});
