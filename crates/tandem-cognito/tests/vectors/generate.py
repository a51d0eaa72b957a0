#!/usr/bin/env python3
"""Signs Cognito Sync requests with botocore's real client and SigV4 signer and writes them
to botocore.json, the test vectors of tandem-cognito's verifier.

Each request goes through botocore's own `cognito-sync` client (its serializer builds the
path, query and body as it would for AWS); a `before-send` hook captures the signed request
as it would go on the wire and stops it there. CI does not run this; rerun it by hand:

    python3 -m venv /tmp/sigv4-venv && /tmp/sigv4-venv/bin/pip install botocore
    /tmp/sigv4-venv/bin/python crates/tandem-cognito/tests/vectors/generate.py
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time
from urllib.parse import urlsplit

import botocore
import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY_ID = "ASIAQ2FKZ7TX4MHB3VWE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "eyJ2IjoxfQ.c2lnbmF0dXJl"
POOL = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10"
IDENTITY = "us-east-1:abc12345-6789-4def-8123-456789abcdef"


# Credentials as Tandem issues them (COGNITO.md §3), computed here independently of the
# Rust code: HKDF-SHA256 (no salt) of the shared secret under each label, the secret key a
# MAC of the key id, the session token a MACed payload.
SHARED_SECRET = "tandem-cognito test vectors: a shared secret"


def hkdf_sha256(secret, label):
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    return hmac.new(prk, label + b"\x01", hashlib.sha256).digest()


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tandem_credentials(identity_id, pool, now):
    secret = SHARED_SECRET.encode()
    k_secret = hkdf_sha256(secret, b"tandem-cognito secret-key v1")
    k_cred = hkdf_sha256(secret, b"tandem-cognito session-token v1")
    akid = "ASIAMZXW6YTBOI3DKNRQ"
    payload = json.dumps({"v": 1, "akid": akid, "pool": pool, "identityId": identity_id,
                          "exp": int(now) + 3600}).encode()
    token = b64url(payload) + "." + b64url(hmac.new(k_cred, payload, hashlib.sha256).digest())
    return akid, b64url(hmac.new(k_secret, akid.encode(), hashlib.sha256).digest()), token


class Captured(Exception):
    pass


def capture(client, operation, **params):
    """Returns the request `operation` would send, signed, without sending it."""
    seen = {}

    def before_send(request, **_):
        seen["request"] = request
        raise Captured()

    client.meta.events.register("before-send", before_send)
    try:
        getattr(client, operation)(**params)
    except Captured:
        pass
    finally:
        client.meta.events.unregister("before-send", before_send)
    request = seen["request"]
    url = urlsplit(request.url)
    headers = [[name, value.decode() if isinstance(value, bytes) else value]
               for name, value in request.headers.items()]
    # botocore signs the host from the URL; the HTTP client sends the same value.
    if not any(name.lower() == "host" for name, _ in headers):
        headers.append(["Host", url.netloc])
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    return {
        "method": request.method,
        "path": url.path,
        "query": url.query,
        "headers": headers,
        "body": body.decode(),
    }


def raw(method, url, headers, body):
    """Signs a hand-made request with SigV4Auth itself, for what the client never sends:
    dot segments in the path, whitespace runs in a signed header."""
    request = AWSRequest(method=method, url=url, headers=headers, data=body)
    SigV4Auth(Credentials(ACCESS_KEY_ID, SECRET_KEY, SESSION_TOKEN), "cognito-sync", "us-west-2").add_auth(request)
    parts = urlsplit(url)
    return {
        "method": method,
        "path": parts.path,
        "query": parts.query,
        "headers": [[n, v] for n, v in request.headers.items()] + [["Host", parts.netloc]],
        "body": body,
    }


def client(session, endpoint, region, token, akid=ACCESS_KEY_ID, secret=SECRET_KEY):
    return session.create_client(
        "cognito-sync",
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id=akid,
        aws_secret_access_key=secret,
        aws_session_token=token,
    )


def main():
    session = botocore.session.get_session()
    local = client(session, "http://127.0.0.1:4000", "us-east-1", SESSION_TOKEN)
    aws = client(session, "https://cognito-sync.eu-west-1.amazonaws.com", "eu-west-1", SESSION_TOKEN)
    static = client(session, "http://localhost:8080", "us-east-1", None)
    cases = [
        ("list_records", local, "list_records", dict(
            IdentityPoolId=POOL, IdentityId=IDENTITY, DatasetName="settings",
            LastSyncCount=3, MaxResults=100,
            NextToken="a+b/c=d==", SyncSessionToken="tok.en-1_2")),
        ("list_records_first_page", local, "list_records", dict(
            IdentityPoolId=POOL, IdentityId=IDENTITY, DatasetName="settings")),
        ("list_datasets", aws, "list_datasets", dict(
            IdentityPoolId=POOL, IdentityId=IDENTITY, MaxResults=64,
            NextToken="eyJ0IjoxfQ==/x+y")),
        ("describe_dataset_dotted_name", aws, "describe_dataset", dict(
            IdentityPoolId=POOL, IdentityId=IDENTITY, DatasetName="app.prefs:v2")),
        ("update_records", local, "update_records", dict(
            IdentityPoolId=POOL, IdentityId=IDENTITY, DatasetName="settings",
            DeviceId="device-1", SyncSessionToken="tok.en-1_2",
            ClientContext="eyJjbGllbnQiOnt9fQ==",
            RecordPatches=[
                {"Op": "replace", "Key": "theme", "Value": "dark \u00e9\u00e8 \"q\"", "SyncCount": 0},
                {"Op": "remove", "Key": "old key", "SyncCount": 2},
            ])),
        ("delete_dataset", aws, "delete_dataset", dict(
            IdentityPoolId=POOL, IdentityId=IDENTITY, DatasetName="settings")),
        ("describe_identity_usage_static_key", static, "describe_identity_usage", dict(
            IdentityPoolId=POOL, IdentityId=IDENTITY)),
    ]
    vectors = []
    request = raw(
        "POST",
        "http://127.0.0.1:4000/identitypools/./us-east-1%3Ax//identities/../identities/us-east-1%3Ay/datasets/d/"
        "?b=2&a=x%2By%3D&a=1&empty=",
        {"Content-Type": "application/json", "X-Amz-Meta-Note": "  several   spaces\there  "},
        '{"RecordPatches":[]}',
    )
    request["name"] = "raw_dot_segments_and_whitespace"
    request["access_key_id"] = ACCESS_KEY_ID
    request["secret_key"] = SECRET_KEY
    vectors.append(request)
    for name, c, operation, params in cases:
        request = capture(c, operation, **params)
        request["name"] = name
        request["access_key_id"] = ACCESS_KEY_ID
        request["secret_key"] = SECRET_KEY
        vectors.append(request)
    akid, secret, token = tandem_credentials(IDENTITY, POOL, time.time())
    issued = client(session, "http://127.0.0.1:4000", "us-east-1", token, akid, secret)
    request = capture(issued, "list_records", IdentityPoolId=POOL, IdentityId=IDENTITY,
                      DatasetName="settings", LastSyncCount=1)
    request["name"] = "tandem_issued_credentials"
    request["access_key_id"] = akid
    request["secret_key"] = secret
    request["shared_secret"] = SHARED_SECRET
    vectors.append(request)
    out = {
        "generator": f"botocore {botocore.__version__} SigV4Auth via the cognito-sync client",
        "vectors": vectors,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "botocore.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(vectors)} vectors to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
