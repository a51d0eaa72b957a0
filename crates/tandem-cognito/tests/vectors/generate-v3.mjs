// Signs Cognito Sync requests with the AWS SDK for JavaScript v3's real client
// (@aws-sdk/client-cognito-sync, whose signer is @smithy/signature-v4) and writes them to
// sdk-js-v3.json, more test vectors for tandem-cognito's verifier. A request handler stands
// in for the network: it records the signed request and fails it. CI does not run this;
// rerun it by hand in a throwaway directory outside the repo:
//
//   mkdir /tmp/sigv4-js && cd /tmp/sigv4-js && npm init -y
//   npm install @aws-sdk/client-cognito-sync
//   node /path/to/crates/tandem-cognito/tests/vectors/generate-v3.mjs
import { createRequire } from "node:module";
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(join(process.cwd(), "package.json"));
const sync = require("@aws-sdk/client-cognito-sync");
const sdkVersion = require("@aws-sdk/client-cognito-sync/package.json").version;
const signerVersion = require("@smithy/signature-v4/package.json").version;

const ACCESS_KEY_ID = "ASIAQ2FKZ7TX4MHB3VWE";
const SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const SESSION_TOKEN = "eyJ2IjoxfQ.c2lnbmF0dXJl";
const POOL = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";
const IDENTITY = "us-east-1:abc12345-6789-4def-8123-456789abcdef";

// The query string as @smithy/querystring-builder puts it on the wire.
const escapeUri = (s) =>
  encodeURIComponent(s).replace(/[!'()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
function queryString(query) {
  const parts = [];
  for (const key of Object.keys(query ?? {})) {
    const values = Array.isArray(query[key]) ? query[key] : [query[key]];
    for (const value of values) {
      parts.push(value === null ? escapeUri(key) : `${escapeUri(key)}=${escapeUri(value)}`);
    }
  }
  return parts.join("&");
}

class Captured extends Error {}

function client(endpoint, region, sessionToken) {
  const seen = {};
  const c = new sync.CognitoSyncClient({
    endpoint,
    region,
    credentials: { accessKeyId: ACCESS_KEY_ID, secretAccessKey: SECRET_KEY, sessionToken },
    maxAttempts: 1,
    requestHandler: {
      handle: async (request) => {
        seen.request = request;
        throw new Captured();
      },
    },
  });
  return { c, seen };
}

async function capture({ c, seen }, command) {
  try {
    await c.send(command);
  } catch (e) {
    if (!(e instanceof Captured)) throw e;
  }
  const r = seen.request;
  return {
    method: r.method,
    path: r.path,
    query: queryString(r.query),
    headers: Object.entries(r.headers).map(([n, v]) => [n, String(v)]),
    body: typeof r.body === "string" ? r.body : r.body ? Buffer.from(r.body).toString() : "",
  };
}

const local = client("http://127.0.0.1:4000", "us-east-1", SESSION_TOKEN);
const aws = client("https://cognito-sync.eu-west-1.amazonaws.com", "eu-west-1", SESSION_TOKEN);
const cases = [
  ["v3_list_records", local, new sync.ListRecordsCommand({
    IdentityPoolId: POOL, IdentityId: IDENTITY, DatasetName: "settings",
    LastSyncCount: 3, MaxResults: 100, NextToken: "a+b/c=d==", SyncSessionToken: "tok.en-1_2" })],
  ["v3_list_datasets", aws, new sync.ListDatasetsCommand({
    IdentityPoolId: POOL, IdentityId: IDENTITY, MaxResults: 64, NextToken: "eyJ0IjoxfQ==/x+y" })],
  ["v3_describe_dataset_dotted_name", aws, new sync.DescribeDatasetCommand({
    IdentityPoolId: POOL, IdentityId: IDENTITY, DatasetName: "app.prefs:v2" })],
  ["v3_update_records", local, new sync.UpdateRecordsCommand({
    IdentityPoolId: POOL, IdentityId: IDENTITY, DatasetName: "settings",
    DeviceId: "device-1", SyncSessionToken: "tok.en-1_2", ClientContext: "eyJjbGllbnQiOnt9fQ==",
    RecordPatches: [
      { Op: "replace", Key: "theme", Value: "dark \u00e9\u00e8 \"q\"", SyncCount: 0 },
      { Op: "remove", Key: "old key", SyncCount: 2 },
    ] })],
  ["v3_delete_dataset", local, new sync.DeleteDatasetCommand({
    IdentityPoolId: POOL, IdentityId: IDENTITY, DatasetName: "settings" })],
];

const vectors = [];
for (const [name, c, command] of cases) {
  const request = await capture(c, command);
  vectors.push({ ...request, name, access_key_id: ACCESS_KEY_ID, secret_key: SECRET_KEY });
}
const out = join(dirname(fileURLToPath(import.meta.url)), "sdk-js-v3.json");
writeFileSync(out, JSON.stringify({
  generator: `@aws-sdk/client-cognito-sync ${sdkVersion}, @smithy/signature-v4 ${signerVersion}`,
  vectors,
}, null, 2) + "\n");
console.error(`wrote ${vectors.length} vectors to ${out}`);
