#!/usr/bin/env python3
"""RDS IAM auth token vectors from botocore's own `generate_db_auth_token`.

`gateway/tests/rds_iam.rs` checks that the gateway's token (the `gateway aws rds-token` CLI
and the proxy's code, which are the same function) is byte-identical to botocore's for each
vector. Regenerate (CI does, and fails on a diff):

    pip install botocore==1.35.99
    python3 gateway/tests/vectors/rds_token.py > gateway/tests/vectors/rds_token.json

The signing time is fixed by freezing botocore's clock (`botocore.auth.datetime`), which is
what `--at` does on our side.
"""

import datetime
import json
import sys
from unittest import mock

import botocore
import botocore.session
from botocore.credentials import Credentials

BOTOCORE_VERSION = "1.35.99"

VECTORS = [
    # name, host, port, user, region, access key, secret, session token, time
    ("plain", "mydb.cluster-abc.us-east-1.rds.amazonaws.com", 5432, "app",
     "us-east-1", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     None, "2026-01-02T03:04:05Z"),
    ("session-token", "temporal.cluster-x.ca-central-1.rds.amazonaws.com", 5432,
     "bot-temporal", "ca-central-1", "ASIAQEXAMPLEEXAMPLE1",
     "s3cr3t+/Key=With/Slashes", "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+abc/def==",
     "2026-03-04T05:06:07Z"),
    ("awkward-user", "db.example.internal", 6543, "gavin.frazar@goteleport.com",
     "eu-west-1", "AKIDEXAMPLE", "secret", None, "2026-12-31T23:59:59Z"),
    ("user-needs-encoding", "10.0.3.7", 15432, "a b+c/d=é&x?y~z_-.",
     "ap-southeast-2", "ASIAEXAMPLEKEY2", "k/+=", "tok en+/=", "2026-06-30T12:00:00Z"),
    ("default-port-other-region", "aurora.cluster-ro-abc.eu-central-1.rds.amazonaws.com",
     3306, "teleport-admin", "eu-central-1", "AKIAEXAMPLE3", "abc", None,
     "2027-02-28T00:00:00Z"),
]


def token(host, port, user, region, akid, secret, session_token, at):
    when = datetime.datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ")
    session = botocore.session.get_session()
    session.set_credentials(akid, secret, session_token)
    client = session.create_client("rds", region_name=region)
    with mock.patch("botocore.auth.datetime") as dt:
        dt.datetime.utcnow.return_value = when
        dt.datetime.now.return_value = when.replace(tzinfo=datetime.timezone.utc)
        return client.generate_db_auth_token(
            DBHostname=host, Port=port, DBUsername=user, Region=region)


def main():
    if botocore.__version__ != BOTOCORE_VERSION:
        sys.exit(f"botocore {botocore.__version__} installed; the vectors pin {BOTOCORE_VERSION}")
    out = []
    for name, host, port, user, region, akid, secret, tok, at in VECTORS:
        out.append({
            "name": name, "host": host, "port": port, "user": user, "region": region,
            "access_key_id": akid, "secret_access_key": secret, "session_token": tok,
            "at": at, "token": token(host, port, user, region, akid, secret, tok, at),
        })
    json.dump({"botocore": BOTOCORE_VERSION, "vectors": out}, sys.stdout, indent=2,
              ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
