"""boto3's cognito-identity client against a running tandem (docs/COGNITO.md, "Cognito
Identity endpoint"): GetId -> GetCredentialsForIdentity -> GetOpenIdToken for a guest, a
login linked at GetId, the login-takeover rule, a guest merged at login, and errors as
botocore parses them. Run by tests/tests/cognito_identity.rs with the venv's python.

Usage: cognito_identity.py ENDPOINT POOL PROVIDER LOGIN_TOKEN
Prints one JSON line: {"guest": id, "token": the guest's open id token}.
"""

import datetime
import json
import sys

import boto3

endpoint, pool, provider, login_token = sys.argv[1:5]
# No credentials: the three operations are unsigned (authtype none in the model).
client = boto3.client("cognito-identity", region_name="us-east-1", endpoint_url=endpoint)


def refused(error, call, **kwargs):
    try:
        call(**kwargs)
    except client.exceptions.ClientError as e:
        code = e.response["Error"]["Code"]
        assert code == error, (code, e.response)
        return e.response["Error"]["Message"]
    raise AssertionError(f"{call.__name__} was not refused with {error}")


guest = client.get_id(IdentityPoolId=pool)["IdentityId"]
assert guest.startswith("us-east-1:"), guest
answer = client.get_credentials_for_identity(IdentityId=guest)
assert answer["IdentityId"] == guest, answer
creds = answer["Credentials"]
assert creds["AccessKeyId"].startswith("ASIA"), creds
assert creds["SecretKey"] and creds["SessionToken"], creds
assert isinstance(creds["Expiration"], datetime.datetime), creds
token = client.get_open_id_token(IdentityId=guest)["Token"]

logins = {provider: login_token}
authed = client.get_id(IdentityPoolId=pool, Logins=logins)["IdentityId"]
assert client.get_id(IdentityPoolId=pool, Logins=logins)["IdentityId"] == authed
message = refused("NotAuthorizedException", client.get_credentials_for_identity, IdentityId=authed)
assert message.startswith("Logins don't match."), message

other_guest = client.get_id(IdentityPoolId=pool)["IdentityId"]
merged = client.get_credentials_for_identity(IdentityId=other_guest, Logins=logins)
assert merged["IdentityId"] == authed, merged
message = refused("NotAuthorizedException", client.get_credentials_for_identity, IdentityId=other_guest)
assert message == f"Access to Identity '{other_guest}' is forbidden.", message

refused(
    "ResourceNotFoundException",
    client.get_id,
    IdentityPoolId="us-east-1:00000000-0000-4000-8000-000000000000",
)
refused("NotAuthorizedException", client.get_id, IdentityPoolId=pool, Logins={provider: "not.a.token"})

print(json.dumps({"guest": guest, "token": token}))
