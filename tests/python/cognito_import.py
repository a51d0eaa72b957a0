"""The source and the device of `tandem import cognito`, with boto3.

Run by tests/tests/cognito_import.rs with the venv's python (TANDEM_TEST_PYTHON), once per
phase (the first argument); the test passes its settings as JSON in TANDEM_COGNITO_IMPORT.

- `fill` writes a pool the way apps do, on the node that stands in for AWS: many guests
  with a dataset each (a tombstone in every one), some with a second, larger dataset, some
  with a dataset deleted and created again; a device that keeps its own cache of a dataset
  (last sync count, record sync counts, a local edit not yet pushed); an account linked to
  a login and a guest merged into it. Prints what the device holds.
- `device` is that device after the move: its app now points at the node the pool was
  imported into, and does what Cognito Sync clients do on their next sync (ListRecords
  from the last sync count, UpdateRecords with the record sync counts it holds and the
  session token). Any conflict, missing record or changed count fails it.

Any failed check raises, and the exit status is non-zero; findings go to stdout as JSON.
"""

import json
import os
import sys

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

CFG = json.loads(os.environ["TANDEM_COGNITO_IMPORT"])
POOL = CFG["pool"]
NO_RETRY = Config(retries={"total_max_attempts": 1})


def client(service, endpoint, akid=None, secret=None, token=None, unsigned=False):
    config = NO_RETRY.merge(Config(signature_version=UNSIGNED)) if unsigned else NO_RETRY
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=akid or "unused",
        aws_secret_access_key=secret or "unused",
        aws_session_token=token,
        config=config,
    )


def as_identity(endpoint, identity_id, logins=None):
    """A Cognito Sync client with the identity's own credentials, as a device has."""
    public = client("cognito-identity", endpoint, unsigned=True)
    args = {"IdentityId": identity_id}
    if logins:
        args["Logins"] = logins
    answer = public.get_credentials_for_identity(**args)
    assert answer["IdentityId"] == identity_id, answer
    creds = answer["Credentials"]
    return client(
        "cognito-sync",
        endpoint,
        creds["AccessKeyId"],
        creds["SecretKey"],
        creds["SessionToken"],
    )


def update(sync, identity_id, dataset, patches, device="filler"):
    """One sync's push: ListRecords for the token, then UpdateRecords."""
    token = sync.list_records(
        IdentityPoolId=POOL, IdentityId=identity_id, DatasetName=dataset
    )["SyncSessionToken"]
    return sync.update_records(
        IdentityPoolId=POOL,
        IdentityId=identity_id,
        DatasetName=dataset,
        DeviceId=device,
        SyncSessionToken=token,
        RecordPatches=[
            {"Op": op, "Key": key, "SyncCount": count, **({"Value": value} if value is not None else {})}
            for op, key, value, count in patches
        ],
    )["Records"]


def phase_fill():
    endpoint = CFG["source"]
    public = client("cognito-identity", endpoint, unsigned=True)
    dev = client("cognito-sync", endpoint, CFG["admin_akid"], CFG["admin_secret"])

    guests = [public.get_id(IdentityPoolId=POOL)["IdentityId"] for _ in range(CFG["guests"])]
    for n, who in enumerate(guests):
        update(dev, who, "profile", [
            ("replace", "name", f"user {n}", 0),
            ("replace", "tmp", "to be removed", 0),
            ("replace", "color", "blue", 0),
        ])
        update(dev, who, "profile", [("remove", "tmp", None, 1), ("replace", "color", "green", 1)])
        if n % 3 == 0:
            # A larger dataset, written over a few syncs, with unicode and a big value.
            update(dev, who, "settings", [
                ("replace", f"k{i:03}", f"v{i}-é✓" * (i % 5 + 1), 0) for i in range(60)
            ])
            update(dev, who, "settings", [("replace", "big", "x" * 20000, 0), ("remove", "k001", None, 1)])
        if n % 7 == 0:
            # Deleted, then created again: its count goes on above the delete.
            update(dev, who, "scratch", [("replace", "a", "1", 0)])
            update(dev, who, "scratch", [("replace", "a", "2", 1)])
            dev.delete_dataset(IdentityPoolId=POOL, IdentityId=who, DatasetName="scratch")
            update(dev, who, "scratch", [("replace", "b", "again", 0)])
        if n % 11 == 0:
            # A dataset deleted for good: it is not listed, so not copied.
            update(dev, who, "gone", [("replace", "a", "1", 0)])
            dev.delete_dataset(IdentityPoolId=POOL, IdentityId=who, DatasetName="gone")

    # The device: a guest whose phone caches `notes` (as amazon-cognito-js and the mobile
    # SDKs do: the last sync count and each record's sync count).
    phone_id = public.get_id(IdentityPoolId=POOL)["IdentityId"]
    phone = as_identity(endpoint, phone_id)
    update(phone, phone_id, "notes", [
        ("replace", "a", "alpha", 0), ("replace", "b", "beta", 0), ("replace", "c", "gamma", 0),
    ], device="phone")
    update(phone, phone_id, "notes", [("remove", "b", None, 1), ("replace", "c", "GAMMA", 1)], device="phone")
    # Another device of the same identity writes once more; the phone pulls it.
    update(phone, phone_id, "notes", [("replace", "d", "delta", 0)], device="tablet")
    pulled = phone.list_records(IdentityPoolId=POOL, IdentityId=phone_id, DatasetName="notes")
    cache = {r["Key"]: [r.get("Value"), r["SyncCount"]] for r in pulled["Records"]}
    tomb = phone.list_records(
        IdentityPoolId=POOL, IdentityId=phone_id, DatasetName="notes", LastSyncCount=1
    )
    for r in tomb["Records"]:
        cache[r["Key"]] = [r.get("Value"), r["SyncCount"]]
    assert cache["b"] == [None, 2], cache

    # An account with a login, and a guest that logs in with it and is merged into it.
    logins = {CFG["provider"]: CFG["login"]}
    account = public.get_id(IdentityPoolId=POOL, Logins=logins)["IdentityId"]
    mine = as_identity(endpoint, account, logins)
    update(mine, account, "profile", [("replace", "name", "alice", 0)], device="laptop")
    guest = public.get_id(IdentityPoolId=POOL)["IdentityId"]
    theirs = as_identity(endpoint, guest)
    update(theirs, guest, "profile", [("replace", "theme", "dark", 0)], device="phone")
    merged = public.get_credentials_for_identity(IdentityId=guest, Logins=logins)
    assert merged["IdentityId"] == account, merged
    listing = mine.list_records(IdentityPoolId=POOL, IdentityId=account, DatasetName="profile")
    assert len(listing.get("MergedDatasetNames", [])) == 1, listing

    print(json.dumps({
        "guests": guests,
        "phone": {
            "id": phone_id,
            "lastSyncCount": pulled["DatasetSyncCount"],
            "records": cache,
        },
        "account": account,
        "mergedGuest": guest,
        "mergedCopy": listing["MergedDatasetNames"][0],
    }))


def phase_device():
    """The phone after the move: its next syncs against the target, with its old cache."""
    endpoint = CFG["target"]
    state = CFG["state"]
    phone_id = state["phone"]["id"]
    last = state["phone"]["lastSyncCount"]
    cache = state["phone"]["records"]
    phone = as_identity(endpoint, phone_id)

    # Pull: nothing new since the last sync, same dataset count.
    pulled = phone.list_records(
        IdentityPoolId=POOL, IdentityId=phone_id, DatasetName="notes", LastSyncCount=last
    )
    assert pulled["DatasetSyncCount"] == last, pulled
    assert pulled["Records"] == [], pulled["Records"]
    assert pulled["DatasetExists"] and not pulled["DatasetDeletedAfterRequestedSyncCount"], pulled
    # Push the local edits with the record sync counts the cache holds: a changed record,
    # a new one, a removed one, and the tombstoned key written again (0 or its count).
    written = phone.update_records(
        IdentityPoolId=POOL,
        IdentityId=phone_id,
        DatasetName="notes",
        DeviceId="phone",
        SyncSessionToken=pulled["SyncSessionToken"],
        RecordPatches=[
            {"Op": "replace", "Key": "a", "Value": "ALPHA", "SyncCount": cache["a"][1]},
            {"Op": "replace", "Key": "b", "Value": "back", "SyncCount": cache["b"][1]},
            {"Op": "remove", "Key": "d", "SyncCount": cache["d"][1]},
            {"Op": "replace", "Key": "e", "Value": "new", "SyncCount": 0},
        ],
    )["Records"]
    counts = {r["Key"]: r["SyncCount"] for r in written}
    assert set(counts.values()) == {last + 1}, written

    # A second device of the identity that had synced the whole dataset before the move
    # pulls exactly the phone's push.
    after = phone.list_records(
        IdentityPoolId=POOL, IdentityId=phone_id, DatasetName="notes", LastSyncCount=last
    )
    assert sorted(r["Key"] for r in after["Records"]) == ["a", "b", "d", "e"], after
    assert after["DatasetSyncCount"] == last + 1

    # A device that synced `scratch` before it was deleted and created again is told so.
    guests = state["guests"]
    dev = client("cognito-sync", endpoint, CFG["admin_akid"], CFG["admin_secret"])
    scratch = dev.list_records(
        IdentityPoolId=POOL, IdentityId=guests[0], DatasetName="scratch", LastSyncCount=2
    )
    assert scratch["DatasetDeletedAfterRequestedSyncCount"], scratch
    # One that synced the deleted-for-good dataset sees it gone, as on Cognito.
    gone = dev.list_records(
        IdentityPoolId=POOL, IdentityId=guests[0], DatasetName="gone", LastSyncCount=1
    )
    assert not gone["DatasetExists"], gone

    # The account: its login (linked by --logins) still opens it, and it still reports the
    # merged copy, which holds the guest's data.
    logins = {CFG["provider"]: CFG["login"]}
    account = state["account"]
    mine = as_identity(endpoint, account, logins)
    profile = mine.list_records(IdentityPoolId=POOL, IdentityId=account, DatasetName="profile")
    assert profile["MergedDatasetNames"] == [state["mergedCopy"]], profile
    copy = mine.list_records(
        IdentityPoolId=POOL, IdentityId=account, DatasetName=state["mergedCopy"]
    )
    assert {r["Key"]: r["Value"] for r in copy["Records"]} == {"theme": "dark"}, copy
    # GetId with the login answers the same identity, not a new one.
    public = client("cognito-identity", endpoint, unsigned=True)
    assert public.get_id(IdentityPoolId=POOL, Logins=logins)["IdentityId"] == account
    # The merged-away guest is not an identity on the target (nor on the source).
    try:
        public.get_credentials_for_identity(IdentityId=state["mergedGuest"])
        raise AssertionError("the merged guest got credentials")
    except ClientError as e:
        assert e.response["Error"]["Code"] == "NotAuthorizedException", e.response

    print(json.dumps({"pushed": counts}))


if __name__ == "__main__":
    {"fill": phase_fill, "device": phase_device}[sys.argv[1]]()
