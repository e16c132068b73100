"""A real S3-compatible server on localhost for tests of object storage (moto in server mode).

The server runs in a thread for the whole session and speaks S3 over HTTP, so the code under test goes through
pyarrow's own S3 client exactly as it would against AWS: nothing is monkeypatched but the environment, which is
where :mod:`mkt_torchrec.storage` takes every setting from. A test module uses the fixtures with::

    pytest_plugins = ["tests.s3"]
"""

from __future__ import annotations

import uuid

import pytest

REGION = "us-east-1"
# Every variable storage.ENVIRONMENT["s3"] names, so a developer's own AWS settings never reach the tests.
_AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
                  "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL (``http://127.0.0.1:PORT``) of a moto S3 server running for the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def use_endpoint(monkeypatch, endpoint: str, tmp_path) -> None:
    """Point the standard AWS variables at ``endpoint`` with dummy credentials, and hide ``~/.aws``."""
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, tmp_path) -> str:
    """``s3://NAME``: a new, empty bucket of the session's server, with the environment pointing at it."""
    import boto3

    use_endpoint(monkeypatch, s3_server, tmp_path)
    name = f"mkt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name=REGION, aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    return f"s3://{name}"
