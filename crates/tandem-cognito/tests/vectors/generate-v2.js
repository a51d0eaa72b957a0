// Signs Cognito Sync requests with the AWS SDK for JavaScript v2's real client (the SDK
// amazon-cognito-js runs on; its signer is lib/signers/v4.js) and writes them to
// sdk-js-v2.json, more test vectors for tandem-cognito's verifier. Each request runs up to
// its `send` step, so it is built and signed but never sent. CI does not run this; rerun it
// by hand in a throwaway directory outside the repo:
//
//   mkdir /tmp/sigv4-js && cd /tmp/sigv4-js && npm init -y && npm install aws-sdk@2
//   node /path/to/crates/tandem-cognito/tests/vectors/generate-v2.js
const path = require("node:path");
const { writeFileSync } = require("node:fs");
const { createRequire } = require("node:module");

const local = createRequire(path.join(process.cwd(), "package.json"));
const AWS = local("aws-sdk");

const ACCESS_KEY_ID = "ASIAQ2FKZ7TX4MHB3VWE";
const SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const SESSION_TOKEN = "eyJ2IjoxfQ.c2lnbmF0dXJl";
const POOL = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";
const IDENTITY = "us-east-1:abc12345-6789-4def-8123-456789abcdef";

function client(endpoint, region) {
  return new AWS.CognitoSync({
    endpoint,
    region,
    credentials: new AWS.Credentials(ACCESS_KEY_ID, SECRET_KEY, SESSION_TOKEN),
  });
}

function capture(request) {
  return new Promise((resolve, reject) => {
    request.runTo("send", (err) => {
      if (err) return reject(err);
      const h = request.httpRequest;
      const [p, q] = h.path.split(/\?(.*)/s);
      resolve({
        method: h.method,
        path: p,
        query: q ?? "",
        headers: Object.entries(h.headers).map(([n, v]) => [n, String(v)]),
        body: typeof h.body === "string" ? h.body : h.body ? Buffer.from(h.body).toString() : "",
      });
    });
  });
}

async function main() {
  const localClient = client("http://127.0.0.1:4000", "us-east-1");
  const aws = client("https://cognito-sync.eu-west-1.amazonaws.com", "eu-west-1");
  const cases = [
    ["v2_list_records", localClient.listRecords({
      IdentityPoolId: POOL, IdentityId: IDENTITY, DatasetName: "settings",
      LastSyncCount: 3, MaxResults: 100, NextToken: "a+b/c=d==", SyncSessionToken: "tok.en-1_2" })],
    ["v2_list_datasets", aws.listDatasets({
      IdentityPoolId: POOL, IdentityId: IDENTITY, MaxResults: 64, NextToken: "eyJ0IjoxfQ==/x+y" })],
    ["v2_describe_dataset_dotted_name", aws.describeDataset({
      IdentityPoolId: POOL, IdentityId: IDENTITY, DatasetName: "app.prefs:v2" })],
    ["v2_update_records", localClient.updateRecords({
      IdentityPoolId: POOL, IdentityId: IDENTITY, DatasetName: "settings",
      DeviceId: "device-1", SyncSessionToken: "tok.en-1_2", ClientContext: "eyJjbGllbnQiOnt9fQ==",
      RecordPatches: [
        { Op: "replace", Key: "theme", Value: "dark \u00e9\u00e8 \"q\"", SyncCount: 0 },
        { Op: "remove", Key: "old key", SyncCount: 2 },
      ] })],
    ["v2_delete_dataset", localClient.deleteDataset({
      IdentityPoolId: POOL, IdentityId: IDENTITY, DatasetName: "settings" })],
  ];
  const vectors = [];
  for (const [name, request] of cases) {
    const captured = await capture(request);
    vectors.push({ ...captured, name, access_key_id: ACCESS_KEY_ID, secret_key: SECRET_KEY });
  }
  const out = path.join(__dirname, "sdk-js-v2.json");
  writeFileSync(out, JSON.stringify({ generator: `aws-sdk ${AWS.VERSION} (JS v2)`, vectors }, null, 2) + "\n");
  console.error(`wrote ${vectors.length} vectors to ${out}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
