"""An opt-in quantised index served by the router (issue 16): a few thousand Banking77
exemplars built with `semroute index build --faiss ivfpq`, routed through a real router server,
then reloaded to a second version of another kind (hnsw-sq)."""

from __future__ import annotations

import csv
from pathlib import Path

from semroute.config import IndexSettings
from semroute.grpc.router_client import RouterClient
from semroute.index import build_index, read_manifest
from tests.conftest import run_cli
from tests.integration.router_grpc_support import running_router, shared_encoder


def banking_rows(shared_data: Path, split: str) -> list[tuple[str, str]]:
    with (shared_data / "banking77" / f"{split}.csv").open(newline="", encoding="utf-8") as fh:
        return [(row["text"], row["label"]) for row in csv.DictReader(fh)]


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


async def test_ivfpq_build_serves_and_reloads_to_hnsw_sq(
    tmp_path: Path, shared_data: Path, encoder_dir: Path
) -> None:
    """The CLI's --faiss ivfpq is recorded in the manifest (kind, factory, nprobe); a router
    serving it routes held-out Banking77 queries about as well as a flat index would (>= 0.8 of
    100); a reload to an hnsw-sq version serves that version's factory."""
    train = banking_rows(shared_data, "train")
    first = write_rows(tmp_path / "first.csv", train[::3])  # every label, ~3,300 rows
    root = tmp_path / "idx"
    run_cli("index", "build", "--exemplars", str(first), "--out", str(root),
            "--encoder", str(encoder_dir), "--faiss", "ivfpq", "--no-tune", "--quiet")
    record = read_manifest(root / "current").faiss
    assert record.kind == "ivfpq" and record.nprobe == 8
    assert record.factory.startswith("IVF") and "PQ" in record.factory

    test = banking_rows(shared_data, "test")[::30][:100]
    async with running_router(root) as router, RouterClient(router.addr) as client:
        info = await client.index_info()
        assert info.faiss_factory == record.factory and info.exemplars == len(train[::3])
        right = sum([(await client.route(text)).route == label for text, label in test])
        assert right >= 80

        second = write_rows(tmp_path / "second.csv", train[1::6])
        build_index([second], root, shared_encoder(), progress=False, tune=False,
                    settings=IndexSettings(faiss="hnsw-sq"), encoder_path=encoder_dir)
        reloaded = await client.reload()
        assert reloaded.faiss_factory == "HNSW32,SQ8"
        assert reloaded.exemplars == len(train[1::6])
        right = sum([(await client.route(text)).route == label for text, label in test])
        assert right >= 75
