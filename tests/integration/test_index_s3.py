"""s3:// index URLs against a real S3-compatible server (moto's ``moto_server`` on loopback):
``index build --out s3://...`` publishes, ``index pull`` mirrors into a local root with the
checksum check and the atomic ``current`` switch, and a router serving that root follows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from semroute.errors import CorruptIndex
from semroute.grpc.router_client import SyncRouterClient
from semroute.index import ExemplarIndex, read_manifest, resolve_version_dir
from semroute.index_remote import current_version, publish, pull
from semroute.testing.devstack import child_env, die_with_parent, start_router
from semroute.testing.s3 import S3Server, start_s3

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from semroute.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = start_s3()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        boto3.client("s3").create_bucket(Bucket="semroute")
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def test_publish_then_pull_gives_the_same_verified_version(
    s3: S3Server, default_index: Path, tmp_path: Path
) -> None:
    """A published version pulled into an empty root: same version, byte-identical files, and
    it loads (checksums and encoder fingerprint checked by ExemplarIndex.load)."""
    source = resolve_version_dir(default_index)
    version = publish(source, "s3://semroute/roundtrip")
    assert current_version("s3://semroute/roundtrip") == version
    pulled = pull("s3://semroute/roundtrip", tmp_path / "root")
    assert resolve_version_dir(tmp_path / "root") == pulled.resolve()
    assert read_manifest(pulled).version == version
    for path in source.rglob("*"):
        if path.is_file():
            assert (pulled / path.relative_to(source)).read_bytes() == path.read_bytes()
    assert ExemplarIndex.load(pulled).version == version


def test_a_corrupted_object_is_refused_and_current_stays(
    s3: S3Server, default_index: Path, tmp_path: Path
) -> None:
    """A version whose data file was changed in the bucket fails the checksum check: pull
    raises CorruptIndex naming the file, leaves no partial version, and the local root still
    serves the version it had."""
    url = "s3://semroute/corrupt"
    good = pull_after_publish(default_index, url, tmp_path / "root")
    client = boto3.client("s3")
    bad = "20990101T000000000000Z-deadbeef"
    for obj in client.list_objects_v2(Bucket="semroute", Prefix=f"corrupt/versions/{good}/")[
            "Contents"]:
        body = client.get_object(Bucket="semroute", Key=obj["Key"])["Body"].read()
        if not obj["Key"].endswith("manifest.json"):
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        client.put_object(Bucket="semroute", Key=obj["Key"].replace(good, bad), Body=body)
    client.put_object(Bucket="semroute", Key="corrupt/current", Body=bad.encode())
    with pytest.raises(CorruptIndex, match="checksum mismatch"):
        pull(url, tmp_path / "root")
    assert resolve_version_dir(tmp_path / "root").name == good
    assert sorted(p.name for p in (tmp_path / "root" / "versions").iterdir()) == [good]


def pull_after_publish(index_root: Path, url: str, local: Path) -> str:
    publish(resolve_version_dir(index_root), url)
    return pull(url, local).name


def test_router_serves_an_s3_index_and_follows_new_versions_pulled_beside_it(
    s3: S3Server, default_index: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    """`serve router --index s3://...` pulls the current version into --index-cache and serves
    it; `index build --out s3://` publishes a new version, the `index pull --watch` sidecar
    switches the cache to it, and the router's watch of DIR/current loads it (GetIndexInfo)."""
    url, root = "s3://semroute/served", tmp_path / "root"
    first = publish(resolve_version_dir(default_index), url)
    env = child_env(extra=s3.env)
    # start_router puts its own --index first; argparse keeps the last one given.
    router = start_router(root, tmp_path / "logs", encoder=encoder_dir, env=env,
                          extra_args=["--index", url, "--index-cache", str(root)])
    sidecar = subprocess.Popen([*CLI, "index", "pull", url, "--to", str(root), "--watch", "0.5"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=die_with_parent())
    try:
        with SyncRouterClient(router.address) as client:
            assert client.index_info().version == first
            subprocess.run(
                [*CLI, "index", "build", "--exemplars", str(REPO / "index_data/exemplars.csv"),
                 "--routes", str(REPO / "index_data/routes.yaml"), "--encoder",
                 str(encoder_dir), "--out", url, "--no-tune", "--quiet"],
                check=True, env=env, capture_output=True, timeout=300,
            )
            second = current_version(url)
            assert second != first
            deadline = time.monotonic() + 60
            while client.index_info().version != second:
                assert sidecar.poll() is None, "the pull sidecar exited"
                assert time.monotonic() < deadline, "the router did not load the pulled version"
                time.sleep(0.2)
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        router.stop()
