"""The Cognito Sync data-plane walk with boto3, against a real tandem node.

Run by tests/tests/cognito_sync.rs with the venv's python (TANDEM_TEST_PYTHON). The test
passes, as JSON in TANDEM_COGNITO_WALK: the endpoint, the pool id, credentials for
identities A and B, A's credentials already expired, and the dataset names of the live
bridge. Any failed check raises, and the exit status is non-zero.
"""

import json
import os

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

WALK = json.loads(os.environ["TANDEM_COGNITO_WALK"])
POOL = WALK["pool"]


def client(creds, secret=None):
    return boto3.client(
        "cognito-sync",
        endpoint_url=WALK["endpoint"],
        region_name="us-east-1",
        aws_access_key_id=creds["access_key_id"],
        aws_secret_access_key=secret or creds["secret_key"],
        aws_session_token=creds["session_token"],
        config=Config(retries={"total_max_attempts": 1}),
    )


def refused(call, code, status):
    try:
        call()
    except ClientError as e:
        got = e.response["Error"]["Code"]
        got_status = e.response["ResponseMetadata"]["HTTPStatusCode"]
        assert (got, got_status) == (code, status), (got, got_status, e.response)
        return e
    raise AssertionError(f"expected {code}")


def main():
    a_id = WALK["a"]["identity_id"]
    a = client(WALK["a"])
    ident = dict(IdentityPoolId=POOL, IdentityId=a_id)

    def records(name, since=0):
        return a.list_records(DatasetName=name, LastSyncCount=since, **ident)

    def update(name, patches):
        token = records(name)["SyncSessionToken"]
        return a.update_records(
            DatasetName=name,
            SyncSessionToken=token,
            RecordPatches=patches,
            DeviceId="boto-device",
            **ident,
        )

    # Create, then list since.
    first = records("walk")
    assert first["DatasetExists"] is False and first["DatasetSyncCount"] == 0, first
    created = update(
        "walk",
        [
            {"Op": "replace", "Key": "a", "Value": "1", "SyncCount": 0},
            {"Op": "replace", "Key": "b", "Value": "2", "SyncCount": 0},
        ],
    )
    assert [(r["Key"], r["SyncCount"]) for r in created["Records"]] == [("a", 1), ("b", 1)]
    added = update("walk", [{"Op": "replace", "Key": "c", "Value": "3", "SyncCount": 0}])
    assert added["Records"][0]["SyncCount"] == 2
    since = records("walk", 1)
    assert [r["Key"] for r in since["Records"]] == ["c"], since
    assert since["DatasetSyncCount"] == 2 and since["DatasetExists"] is True

    # Pagination with boto3's own NextToken handling.
    keys = []
    kwargs = dict(DatasetName="walk", LastSyncCount=0, MaxResults=2, **ident)
    while True:
        page = a.list_records(**kwargs)
        keys += [r["Key"] for r in page["Records"]]
        if "NextToken" not in page:
            break
        kwargs["NextToken"] = page["NextToken"]
    assert keys == ["a", "b", "c"], keys

    # A stale count: 409 ResourceConflictException, nothing written.
    token = records("walk")["SyncSessionToken"]
    refused(
        lambda: a.update_records(
            DatasetName="walk",
            SyncSessionToken=token,
            RecordPatches=[{"Op": "replace", "Key": "a", "Value": "x", "SyncCount": 0}],
            **ident,
        ),
        "ResourceConflictException",
        409,
    )
    assert records("walk")["DatasetSyncCount"] == 2

    # Limits: the node runs with --max-records 3.
    refused(
        lambda: update("walk", [{"Op": "replace", "Key": "d", "Value": "4", "SyncCount": 0}]),
        "LimitExceededException",
        400,
    )

    # Remove: a tombstone, without a Value.
    removed = update("walk", [{"Op": "remove", "Key": "b", "SyncCount": 1}])
    assert removed["Records"][0]["SyncCount"] == 3
    tomb = records("walk", 2)["Records"]
    assert [r["Key"] for r in tomb] == ["b"] and "Value" not in tomb[0], tomb

    listed = a.list_datasets(**ident)
    assert "walk" in [d["DatasetName"] for d in listed["Datasets"]], listed
    assert a.describe_dataset(DatasetName="walk", **ident)["Dataset"]["NumRecords"] == 2

    # Delete: a client past an older count is told.
    a.delete_dataset(DatasetName="walk", **ident)
    gone = records("walk", 2)
    assert gone["DatasetDeletedAfterRequestedSyncCount"] is True, gone
    assert gone["DatasetExists"] is False and gone["Records"] == []

    # B's valid credentials on A's data; a wrong secret; an expired session token.
    b = client(WALK["b"])
    refused(
        lambda: b.list_records(DatasetName="walk", **ident), "NotAuthorizedException", 403
    )
    wrong = client(WALK["a"], secret="not-the-secret-key")
    refused(lambda: wrong.list_datasets(**ident), "InvalidSignatureException", 403)
    expired = client(WALK["a_expired"])
    refused(lambda: expired.list_datasets(**ident), "ExpiredTokenException", 403)

    # The live bridge: a WebSocket write is listed; a boto3 write is pushed (checked by
    # the Rust test, which subscribed before running this).
    ws_written = records(WALK["ws_dataset"])
    assert [r["Key"] for r in ws_written["Records"]] == ["from-ws"], ws_written
    update(WALK["push_dataset"], [{"Op": "replace", "Key": "from-boto", "Value": "1", "SyncCount": 0}])
    print("cognito sync walk: ok")


if __name__ == "__main__":
    main()
