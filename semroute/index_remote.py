"""Index versions in object storage: ``s3://BUCKET/PREFIX`` laid out like a local index root.

::

    PREFIX/versions/<version>/<file>...   every file of a version directory, manifest.json last
    PREFIX/current                        the serving version's name (a few bytes)

``publish`` uploads a built version directory, then replaces ``current`` with one PUT (S3
replaces an object atomically: a reader sees the old name or the new one, never a mix), so a
version is visible only once all its files are there. ``pull`` mirrors the version ``current``
names into a local index root: it downloads into a temporary directory, checks every file
against the manifest's SHA-256 checksums (the same check ``ExemplarIndex.load`` makes), renames
the directory into ``versions/`` and switches ``ROOT/current`` atomically (``switch_current``),
so a router serving that root (and watching ``current``) moves to it as it does for a local
build. The encoder fingerprint is checked when the router loads the index, as for a local one.

boto3 is imported only here and only when called (extra ``s3``); the endpoint and credentials
come from boto3's usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so an
S3-compatible server works as well as AWS.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semroute.errors import ConfigError, CorruptIndex, IndexNotFound
from semroute.index import read_manifest, switch_current

SCHEME = "s3://"
MANIFEST = "manifest.json"
CURRENT = "current"
VERSIONS = "versions"


@dataclass(frozen=True)
class RemoteRoot:
    bucket: str
    prefix: str  # no leading or trailing slash; may be ""

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")


def is_remote(location: str | os.PathLike[str]) -> bool:
    return str(location).startswith(SCHEME)


def parse_url(url: str) -> RemoteRoot:
    """``s3://bucket/some/prefix`` -> RemoteRoot; ConfigError for anything else."""
    if not url.startswith(SCHEME) or not url[len(SCHEME):].split("/", 1)[0]:
        raise ConfigError(f"{url!r}: expected s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    return RemoteRoot(bucket, prefix.strip("/"))


def _client() -> Any:
    try:
        import boto3
    except ModuleNotFoundError as exc:
        raise ConfigError("s3:// index URLs need boto3: pip install 'semroute[s3]'") from exc
    return boto3.client("s3")


def _errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def publish(version_dir: Path, url: str, *, client: Any = None) -> str:
    """Upload ``version_dir`` under ``url``'s ``versions/`` and make it current; returns the
    version name. The manifest goes last and ``current`` after it."""
    root, s3 = parse_url(url), client or _client()
    version = read_manifest(version_dir).version
    files = sorted(p for p in version_dir.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == MANIFEST)  # manifest last (stable sort keeps the rest)
    try:
        for path in files:
            key = root.key(VERSIONS, version, path.relative_to(version_dir).as_posix())
            s3.upload_file(str(path), root.bucket, key)
        s3.put_object(Bucket=root.bucket, Key=root.key(CURRENT), Body=version.encode())
    except _errors() as exc:
        raise ConfigError(f"{root}: cannot publish index {version}: {exc}") from exc
    return version


def current_version(url: str, *, client: Any = None) -> str:
    """The version name ``url``'s ``current`` object holds (IndexNotFound if there is none)."""
    root, s3 = parse_url(url), client or _client()
    try:
        body = s3.get_object(Bucket=root.bucket, Key=root.key(CURRENT))["Body"].read()
    except _errors() as exc:
        raise IndexNotFound(
            f"{root}/{CURRENT}: cannot read it ({exc}); publish an index with "
            f"`semroute index build --exemplars CSV --out {root}`"
        ) from exc
    version = str(body.decode()).strip()
    if not version or "/" in version or version.startswith("."):
        raise CorruptIndex(f"{root}/{CURRENT}: {version!r} is not a version name")
    return version


def pull(url: str, local_root: Path, *, client: Any = None) -> Path:
    """Mirror the current version of ``url`` into ``local_root`` (see the module docstring);
    returns its version directory. Does nothing but switch ``current`` when that version is
    already there. CorruptIndex if a file does not match the manifest (nothing is switched)."""
    root, s3 = parse_url(url), client or _client()
    version = current_version(url, client=s3)
    final = local_root / VERSIONS / version
    if not final.is_dir():
        (local_root / VERSIONS).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=local_root / VERSIONS))
        try:
            _download(s3, root, version, tmp)
            verify(tmp)
            tmp.chmod(0o755)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    switch_current(local_root, final)
    return final


def _download(s3: Any, root: RemoteRoot, version: str, into: Path) -> None:
    prefix = root.key(VERSIONS, version) + "/"
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=root.bucket, Prefix=prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        if not keys:
            raise IndexNotFound(f"{root}/{VERSIONS}/{version}: no files (current names a "
                                "version that was never uploaded)")
        for key in keys:
            target = into / key[len(prefix):]
            if into.resolve() not in target.resolve().parents:
                raise CorruptIndex(f"{root}: object key {key!r} escapes the version directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(root.bucket, key, str(target))
    except _errors() as exc:
        raise ConfigError(f"{root}: cannot download index {version}: {exc}") from exc


def verify(version_dir: Path) -> None:
    """Every file the manifest lists is there with its SHA-256; CorruptIndex naming the first
    that is not."""
    manifest = read_manifest(version_dir)
    for name, expected in manifest.checksums.items():
        path = version_dir / name
        if not path.is_file():
            raise CorruptIndex(f"{path}: missing from the downloaded index {manifest.version}")
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise CorruptIndex(f"{path}: checksum mismatch in the downloaded index "
                               f"{manifest.version} (changed or truncated in the bucket)")


def default_cache(url: str) -> Path:
    """Where ``serve router --index s3://...`` keeps its local root unless told:
    ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/semroute/index/BUCKET/PREFIX``."""
    root = parse_url(url)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "semroute" / "index" / root.bucket / root.prefix


def local_index(location: str, cache: Path | None = None) -> Path:
    """A local index path for ``location``: itself when local; for an ``s3://`` URL, the local
    root it was pulled into (``cache``, or ``default_cache``). The router then serves and
    watches that root; ``semroute index pull URL --to ROOT --watch S`` beside it moves it on."""
    if not is_remote(location):
        return Path(location)
    into = cache or default_cache(location)
    pull(location, into)
    return into
