"""The exemplar columns beside exemplars.jsonl (labels, weights, row offsets as .npy files):
written by every build, loaded without parsing JSON, checked like every other file, with texts
read from the JSON lines only when asked. Versions written before them still load.

A deterministic hash encoder, no model.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from semroute.errors import CorruptIndex
from semroute.exemplars import load_route_table, read_exemplars
from semroute.index import (
    ExemplarIndex,
    ExemplarTexts,
    build_index,
    read_manifest,
    write_prebuilt_version,
)
from semroute.manifest import EncoderRecord, FaissRecord
from tests.conftest import HashEncoder, write

CSV = (
    "text,label,weight\nreverse a list in python,code,1\nfix this python bug,code,2.5\n"
    'hello friend,chat,1\n"a ""quoted"", comma, text ünïcode ✓",chat,0.5\n'
    "tell me a joke,fun,1\n"
)
COLUMN_FILES = ("labels.npy", "weights.npy", "offsets.npy")


def build(tmp_path: Path, enc: HashEncoder, body: str = CSV) -> Path:
    f = write(tmp_path / "ex.csv", body)
    return build_index([f], tmp_path / "idx", enc, progress=False, tune=False)


def jsonl_rows(version: Path) -> list[dict[str, object]]:
    with (version / "exemplars.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def rechecksum(version: Path) -> None:
    """Make the manifest's checksums match the (tampered) files again."""
    manifest = json.loads((version / "manifest.json").read_text())
    for name in manifest["checksums"]:
        manifest["checksums"][name] = hashlib.sha256((version / name).read_bytes()).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))


def to_old_format(version: Path) -> None:
    """The version as a semroute before the columns wrote it: no columns, no .npy files."""
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["columns"]
    for name in COLUMN_FILES:
        del manifest["checksums"][name]
        (version / name).unlink()
    (version / "manifest.json").write_text(json.dumps(manifest))


def test_columns_round_trip(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """A build writes the three columns, lists them in the manifest and its checksums, and a
    load gives back each row's label and weight as exemplars.jsonl has them."""
    version = build(tmp_path, hash_encoder)
    manifest = read_manifest(version)
    assert manifest.columns is not None
    assert manifest.columns.label_names == ("chat", "code", "fun")
    assert set(COLUMN_FILES) <= set(manifest.checksums)
    index = ExemplarIndex.load(version, expect_fingerprint=hash_encoder.fingerprint)
    rows = jsonl_rows(version)
    assert index.labels.tolist() == [r["label"] for r in rows]
    assert index.labels.dtype.kind == "U"
    assert index.weights.dtype == np.float32
    assert index.weights.tolist() == pytest.approx([r["weight"] for r in rows])
    assert isinstance(index.texts, ExemplarTexts) and index.size == len(rows) == 5
    sims, ids = index.search(hash_encoder.encode(["hello friend"]), 1)
    assert index.texts[int(ids[0, 0])] == "hello friend"
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_lazy_texts_are_the_jsonl_texts(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """The texts read by offset (by position, negative position, numpy id, slice, and by
    iterating) are exactly those of exemplars.jsonl, non-ASCII and quotes included."""
    version = build(tmp_path, hash_encoder)
    texts = ExemplarIndex.load(version).texts
    expected = [str(r["text"]) for r in jsonl_rows(version)]
    assert [texts[i] for i in range(len(texts))] == expected
    assert list(texts) == expected
    ids = np.array([3], dtype=np.int64)  # as FAISS returns them
    assert texts[-1] == expected[-1] and texts[ids[0]] == expected[3]
    assert texts[1:4] == expected[1:4] and texts[::-2] == expected[::-2]
    assert 'a "quoted", comma, text ünïcode ✓' in texts
    with pytest.raises(IndexError):
        texts[len(expected)]


def test_version_without_columns_still_loads(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """A version written before the columns (no ``columns`` in the manifest, no .npy files)
    loads from exemplars.jsonl and gives the same texts, labels and weights."""
    version = build(tmp_path, hash_encoder)
    new = ExemplarIndex.load(version)
    to_old_format(version)
    assert read_manifest(version).columns is None
    old = ExemplarIndex.load(version)
    assert isinstance(old.texts, list)
    assert list(old.texts) == list(new.texts)
    assert old.labels.tolist() == new.labels.tolist()
    assert old.weights.tolist() == new.weights.tolist()


@pytest.mark.parametrize("name", COLUMN_FILES)
def test_tampered_column_is_refused_by_checksum(
    tmp_path: Path, hash_encoder: HashEncoder, name: str
) -> None:
    """A changed column file fails its checksum: CorruptIndex names the file."""
    version = build(tmp_path, hash_encoder)
    column = np.load(version / name)
    np.save(version / name, column[::-1].copy())
    with pytest.raises(CorruptIndex, match=re.escape(f"{name}: checksum mismatch")):
        ExemplarIndex.load(version)


def test_columns_that_do_not_fit_are_refused(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """Even with matching checksums, columns that do not fit the manifest or exemplars.jsonl
    are refused, naming the file: a line appended to the table, a label code with no name,
    a column of the wrong length."""
    version = build(tmp_path, hash_encoder)
    with (version / "exemplars.jsonl").open("a") as fh:
        fh.write('{"text": "extra", "label": "chat"}\n')
    rechecksum(version)
    with pytest.raises(CorruptIndex, match=r"offsets\.npy: row offsets do not fit"):
        ExemplarIndex.load(version)

    version = build(tmp_path / "b", hash_encoder)
    np.save(version / "labels.npy", np.array([0, 1, 7, 0, 2], dtype=np.int32))
    rechecksum(version)
    with pytest.raises(CorruptIndex, match=r"labels\.npy: label codes 0\.\.7 outside"):
        ExemplarIndex.load(version)

    version = build(tmp_path / "c", hash_encoder)
    np.save(version / "weights.npy", np.ones(4, dtype=np.float32))
    rechecksum(version)
    with pytest.raises(CorruptIndex, match=r"weights\.npy: float32 \(4,\), expected float32"):
        ExemplarIndex.load(version)


def test_prebuilt_writer_round_trips(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """write_prebuilt_version writes a loadable version around a FAISS file built elsewhere
    (hard-linked, checksummed, with columns), and refuses a file with the wrong row count."""
    import faiss

    exemplar_set = read_exemplars([write(tmp_path / "ex.csv", CSV)])
    texts = [e.text for e in exemplar_set.exemplars]
    flat = faiss.IndexFlatIP(hash_encoder.dimension)
    flat.add(hash_encoder.encode(texts))
    faiss_file = tmp_path / "prebuilt.faiss"
    faiss.write_index(flat, str(faiss_file))
    table = load_route_table(None, exemplar_set.labels, default_route="default")
    encoder_record = EncoderRecord(hash_encoder.fingerprint, hash_encoder.dimension)
    faiss_record = FaissRecord("Flat", True, 64, kind="flat")
    version = write_prebuilt_version(tmp_path / "idx", faiss_file, exemplar_set, table,
                                     encoder_record=encoder_record, faiss_record=faiss_record)
    assert (tmp_path / "idx" / "current").resolve() == version
    index = ExemplarIndex.load(tmp_path / "idx", expect_fingerprint=hash_encoder.fingerprint)
    assert list(index.texts) == texts
    assert index.labels.tolist() == [e.label for e in exemplar_set.exemplars]
    assert index.manifest.counts.per_label == {"code": 2, "chat": 2, "fun": 1}
    _, ids = index.search(hash_encoder.encode(["tell me a joke"]), 1)
    assert index.texts[int(ids[0, 0])] == "tell me a joke"

    flat.add(hash_encoder.encode(["one row too many"]))
    faiss.write_index(flat, str(faiss_file))
    with pytest.raises(CorruptIndex, match=r"prebuilt\.faiss: 6 vectors .* but 5 exemplars"):
        write_prebuilt_version(tmp_path / "idx", faiss_file, exemplar_set, table,
                               encoder_record=encoder_record, faiss_record=faiss_record)
    assert (tmp_path / "idx" / "current").resolve() == version
