"""The Cognito developer operations with boto3, against real tandem nodes.

Run by tests/tests/cognito_developer.rs with the venv's python (TANDEM_TEST_PYTHON), once per
phase (the first argument), so the test can change what the stream's webhook answers in
between. The test passes, as JSON in TANDEM_COGNITO_DEV: the endpoints (`endpoint` has a
change stream sink, `endpoint_no_sinks` has none), the pool id, the developer key, a login
token of the configured provider, the SyncTrigger URL the test serves and a URL where
nothing listens. Any failed check raises, and the exit status is non-zero; the phase's
findings go to stdout as JSON.
"""

import datetime
import json
import os
import sys
import time

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

DEV = json.loads(os.environ["TANDEM_COGNITO_DEV"])
POOL = DEV["pool"]
NO_RETRY = Config(retries={"total_max_attempts": 1})


def client(service, endpoint=None, akid=None, secret=None, token=None, unsigned=False):
    config = NO_RETRY.merge(Config(signature_version=UNSIGNED)) if unsigned else NO_RETRY
    return boto3.client(
        service,
        endpoint_url=endpoint or DEV["endpoint"],
        region_name="us-east-1",
        aws_access_key_id=akid or "unused",
        aws_secret_access_key=secret or "unused",
        aws_session_token=token,
        config=config,
    )


def developer(service, endpoint=None, secret=None):
    return client(service, endpoint, DEV["admin_akid"], secret or DEV["admin_secret"])


def refused(call, code, status=None):
    try:
        call()
    except ClientError as e:
        got = e.response["Error"]["Code"]
        got_status = e.response["ResponseMetadata"]["HTTPStatusCode"]
        assert got == code, (got, got_status, e.response)
        if status is not None:
            assert got_status == status, (got, got_status, e.response)
        return e
    raise AssertionError(f"expected {code}")


def identity_credentials(public, identity_id):
    creds = public.get_credentials_for_identity(IdentityId=identity_id)["Credentials"]
    return creds["AccessKeyId"], creds["SecretKey"], creds["SessionToken"]


def phase_main():
    public = client("cognito-identity", unsigned=True)
    ident = developer("cognito-identity")
    sync = developer("cognito-sync")

    created = [public.get_id(IdentityPoolId=POOL)["IdentityId"] for _ in range(65)]
    linked = public.get_id(
        IdentityPoolId=POOL, Logins={DEV["provider"]: DEV["login"]}
    )["IdentityId"]
    created.append(linked)

    # Paging over more than 60, with an identity created between the pages.
    first = ident.list_identities(IdentityPoolId=POOL, MaxResults=60)
    assert first["IdentityPoolId"] == POOL
    assert len(first["Identities"]) == 60, len(first["Identities"])
    assert "NextToken" in first
    late = public.get_id(IdentityPoolId=POOL)["IdentityId"]
    listed = [i["IdentityId"] for i in first["Identities"]]
    token = first["NextToken"]
    while token:
        page = ident.list_identities(
            IdentityPoolId=POOL, MaxResults=60, NextToken=token, HideDisabled=True
        )
        listed += [i["IdentityId"] for i in page["Identities"]]
        token = page.get("NextToken")
    assert listed == sorted(listed), "listed by id"
    assert len(listed) == len(set(listed)), "no identity twice"
    assert set(created) <= set(listed), set(created) - set(listed)
    # The late one sorts either before the cursor (not in this walk) or after it (once).
    assert listed.count(late) == (1 if late > listed[59] else 0)
    for i in first["Identities"]:
        assert isinstance(i["CreationDate"], datetime.datetime)
        assert i["LastModifiedDate"] >= i["CreationDate"]

    described = ident.describe_identity(IdentityId=linked)
    assert described["IdentityId"] == linked
    assert described["Logins"] == [DEV["provider"]], described
    guest = ident.describe_identity(IdentityId=created[0])
    assert "Logins" not in guest and isinstance(guest["CreationDate"], datetime.datetime)
    refused(
        lambda: ident.describe_identity(
            IdentityId="us-east-1:00000000-0000-4000-8000-000000000000"
        ),
        "ResourceNotFoundException",
    )
    refused(
        lambda: ident.list_identities(IdentityPoolId="us-east-1:" + "0" * 8 + "-0000-4000-8000-" + "0" * 12, MaxResults=5),
        "ResourceNotFoundException",
    )

    # Identity credentials are refused on developer operations of both APIs.
    user_id = created[0]
    akid, secret, session = identity_credentials(public, user_id)
    as_user = client("cognito-identity", akid=akid, secret=secret, token=session)
    refused(
        lambda: as_user.list_identities(IdentityPoolId=POOL, MaxResults=5),
        "NotAuthorizedException",
        400,
    )
    refused(lambda: as_user.describe_identity(IdentityId=user_id), "NotAuthorizedException", 400)
    user = client("cognito-sync", akid=akid, secret=secret, token=session)
    refused(lambda: user.get_cognito_events(IdentityPoolId=POOL), "NotAuthorizedException", 403)
    refused(lambda: user.bulk_publish(IdentityPoolId=POOL), "NotAuthorizedException", 403)
    refused(
        lambda: user.describe_identity_pool_usage(IdentityPoolId=POOL),
        "NotAuthorizedException",
        403,
    )
    # A bad developer signature is refused too.
    forged = "x" * len(DEV["admin_secret"])
    refused(
        lambda: developer("cognito-identity", secret=forged).list_identities(
            IdentityPoolId=POOL, MaxResults=5
        ),
        "InvalidSignatureException",
    )
    refused(
        lambda: developer("cognito-sync", secret=forged).get_cognito_events(IdentityPoolId=POOL),
        "InvalidSignatureException",
        403,
    )

    # Pool usage and configuration.
    usage = sync.describe_identity_pool_usage(IdentityPoolId=POOL)["IdentityPoolUsage"]
    assert usage["IdentityPoolId"] == POOL, usage
    pools = sync.list_identity_pool_usage(MaxResults=10)
    assert [p["IdentityPoolId"] for p in pools["IdentityPoolUsages"]] == [POOL]
    config = sync.get_identity_pool_configuration(IdentityPoolId=POOL)
    assert config["CognitoStreams"]["StreamingStatus"] == "ENABLED", config
    refused(
        lambda: sync.set_identity_pool_configuration(
            IdentityPoolId=POOL, CognitoStreams={"StreamingStatus": "ENABLED"}
        ),
        "InvalidParameterException",
        400,
    )

    # Events: the SyncTrigger.
    assert sync.get_cognito_events(IdentityPoolId=POOL)["Events"] == {}
    refused(
        lambda: sync.set_cognito_events(
            IdentityPoolId=POOL,
            Events={"SyncTrigger": "arn:aws:lambda:us-east-1:123456789012:function:f"},
        ),
        "InvalidParameterException",
        400,
    )
    sync.set_cognito_events(IdentityPoolId=POOL, Events={"SyncTrigger": DEV["trigger"]})
    assert sync.get_cognito_events(IdentityPoolId=POOL)["Events"] == {
        "SyncTrigger": DEV["trigger"]
    }

    ids = dict(IdentityPoolId=POOL, IdentityId=user_id, DatasetName="profile")

    def values(as_client=user):
        records = as_client.list_records(**ids)["Records"]
        return {r["Key"]: r.get("Value") for r in records}

    def update(patches, as_client=user):
        token = as_client.list_records(**ids)["SyncSessionToken"]
        return as_client.update_records(
            SyncSessionToken=token, RecordPatches=patches, DeviceId="boto", **ids
        )

    def replace(key, value, count=0):
        return {"Op": "replace", "Key": key, "Value": value, "SyncCount": count}

    written = update([replace("title", "hello"), replace("note", "ok")])["Records"]
    assert [(r["Key"], r["Value"]) for r in written] == [("title", "HELLO"), ("note", "ok")]
    assert values() == {"title": "HELLO", "note": "ok"}
    count = {r["Key"]: r["SyncCount"] for r in written}

    e = refused(
        lambda: update([replace("note", "far too long a value", count["note"])]),
        "InvalidLambdaFunctionOutputException",
        400,
    )
    assert "over 10 characters" in e.response["Error"]["Message"], e.response
    assert values() == {"title": "HELLO", "note": "ok"}, "nothing written"

    # The trigger down: retriable, nothing written.
    sync.set_cognito_events(IdentityPoolId=POOL, Events={"SyncTrigger": DEV["dead_trigger"]})
    refused(
        lambda: update([replace("note", "x", count["note"])]),
        "LambdaThrottledException",
        429,
    )
    assert values() == {"title": "HELLO", "note": "ok"}, "nothing written"

    # Removed: writes go through as sent.
    sync.set_cognito_events(IdentityPoolId=POOL, Events={})
    assert sync.get_cognito_events(IdentityPoolId=POOL)["Events"] == {}
    update([replace("title", "plain", count["title"])])
    assert values()["title"] == "plain"

    # The developer reaches any identity's data.
    assert values(sync) == {"title": "plain", "note": "ok"}
    other = created[1]
    token = sync.list_records(IdentityPoolId=POOL, IdentityId=other, DatasetName="notes")[
        "SyncSessionToken"
    ]
    sync.update_records(
        IdentityPoolId=POOL,
        IdentityId=other,
        DatasetName="notes",
        SyncSessionToken=token,
        RecordPatches=[replace("k", "v")],
    )
    usage = sync.describe_identity_pool_usage(IdentityPoolId=POOL)["IdentityPoolUsage"]
    assert usage["DataStorage"] > 0 and "LastModifiedDate" in usage, usage

    print(json.dumps({"datasets": [[user_id, "profile"], [other, "notes"]]}))


def phase_bulk_start():
    sync = developer("cognito-sync")
    assert sync.get_bulk_publish_details(IdentityPoolId=POOL)["BulkPublishStatus"] == "NOT_STARTED"
    assert sync.bulk_publish(IdentityPoolId=POOL)["IdentityPoolId"] == POOL
    details = sync.get_bulk_publish_details(IdentityPoolId=POOL)
    assert details["BulkPublishStatus"] == "IN_PROGRESS", details
    assert isinstance(details["BulkPublishStartTime"], datetime.datetime)
    refused(lambda: sync.bulk_publish(IdentityPoolId=POOL), "DuplicateRequestException", 400)
    print(json.dumps({"status": details["BulkPublishStatus"]}))


def phase_bulk_done():
    sync = developer("cognito-sync")
    deadline = time.monotonic() + 60
    while True:
        details = sync.get_bulk_publish_details(IdentityPoolId=POOL)
        if details["BulkPublishStatus"] != "IN_PROGRESS":
            break
        assert time.monotonic() < deadline, details
        time.sleep(0.1)
    assert details["BulkPublishStatus"] == "SUCCEEDED", details
    assert details["BulkPublishCompleteTime"] >= details["BulkPublishStartTime"]
    assert "FailureMessage" not in details
    print(json.dumps({"status": details["BulkPublishStatus"]}))


def phase_no_sinks():
    sync = developer("cognito-sync", endpoint=DEV["endpoint_no_sinks"])
    e = refused(lambda: sync.bulk_publish(IdentityPoolId=POOL), "InvalidConfigurationException", 400)
    assert "--stream-webhook" in e.response["Error"]["Message"], e.response
    config = sync.get_identity_pool_configuration(IdentityPoolId=POOL)
    assert config["CognitoStreams"]["StreamingStatus"] == "DISABLED", config
    print(json.dumps({"status": "refused"}))


PHASES = {
    "main": phase_main,
    "bulk_start": phase_bulk_start,
    "bulk_done": phase_bulk_done,
    "no_sinks": phase_no_sinks,
}

if __name__ == "__main__":
    PHASES[sys.argv[1]]()
