"""unpg.tools.prepare_dali on the MXNet-written fixture: image-only, shuffled, byte-exact shards."""
import hashlib
import json

import numpy as np
import pytest
from unpg.loaders.dali_layout import MANIFEST, read_prepared

from unpg.recordio import MAGIC, IndexedRecordIO, parse_idx, unpack
from unpg.tools import prepare_dali as tool
from unpg.tools.prepare_dali import prepare_dali, shuffle_order


@pytest.fixture(scope="module")
def fixture_manifest(fixtures_dir):
    m = json.loads((fixtures_dir / "ms1m_tiny" / "manifest.json").read_text())
    return {r["idx"]: r for r in m["records"]}


@pytest.fixture(scope="module")
def prepared(fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dali") / "tiny_dali"
    manifest = prepare_dali(fixtures_dir / "ms1m_tiny", out, shards=3, seed=5, progress=False)
    return out, manifest


def read_shards(out, manifest):
    """[(shard, key, header, jpeg)] in file order, read with the native reader."""
    rows = []
    for s, shard in enumerate(manifest["shards"]):
        with IndexedRecordIO(out / shard["idx"], out / shard["rec"], "r") as rec:
            assert len(rec) == shard["count"]
            for key in rec.keys:  # .idx order == file order (offsets increase)
                header, jpeg = unpack(rec.read_idx(key))
                rows.append((s, key, header, jpeg))
    return rows


def test_images_only_labels_and_bytes_preserved(prepared, fixture_manifest):
    out, manifest = prepared
    assert (manifest["num_images"], manifest["num_classes"]) == (96, 12)
    assert [s["count"] for s in manifest["shards"]] == [32, 32, 32]
    rows = read_shards(out, manifest)
    assert sorted(k for _, k, _, _ in rows) == sorted(fixture_manifest)  # no header/identity keys
    for _, key, header, jpeg in rows:
        assert header.flag == 0 and header.label == fixture_manifest[key]["label"]
        assert hashlib.md5(jpeg).hexdigest() == fixture_manifest[key]["jpeg_md5"]


def test_globally_shuffled_and_reproducible(prepared, fixtures_dir, tmp_path):
    out, manifest = prepared
    keys = [k for _, k, _, _ in read_shards(out, manifest)]
    # the written order is the documented shuffle of the rec order (image keys are 1..96)
    assert keys == (shuffle_order(96, 5) + 1).tolist()
    labels = np.array([(k - 1) // 8 for k in keys])
    for s in range(3):  # every shard mixes most identities, not a sorted block
        assert np.unique(labels[s * 32:(s + 1) * 32]).size >= 9
    again = prepare_dali(fixtures_dir / "ms1m_tiny", tmp_path / "again", shards=3, seed=5,
                         progress=False)
    for a, b in zip(manifest["shards"], again["shards"]):
        assert (out / a["rec"]).read_bytes() == (tmp_path / "again" / b["rec"]).read_bytes()
    other = prepare_dali(fixtures_dir / "ms1m_tiny", tmp_path / "other", shards=1, seed=6,
                         progress=False)
    assert [k for _, k, _, _ in read_shards(tmp_path / "other", other)] != keys


def test_global_dali_index_points_at_every_record(prepared):
    out, manifest = prepared
    blob = b"".join((out / s["rec"]).read_bytes() for s in manifest["shards"])
    keys, offsets = parse_idx((out / manifest["dali_index"]).read_bytes())
    assert keys.tolist() == [k for _, k, _, _ in read_shards(out, manifest)]
    assert np.all(np.diff(offsets) > 0) and offsets[0] == 0
    words = np.frombuffer(blob, "<u4")
    assert np.all(words[offsets // 4] == MAGIC)  # a record starts at every global offset


def test_dali_reader_reads_it_in_order(prepared):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    out, manifest = prepared
    info = read_prepared(out)

    @dali.pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        jpegs, labels = fn.readers.mxnet(path=info["rec_paths"], index_path=[info["index_path"]],
                                         random_shuffle=False, name="r")
        return jpegs, labels

    p = pipe()
    p.build()
    got_jpegs, got_labels = [], []
    for _ in range(96 // 8):
        j, lab = p.run()
        got_jpegs += [np.array(j[i]).tobytes() for i in range(8)]
        got_labels += [float(np.array(lab[i])[0]) for i in range(8)]
    rows = read_shards(out, manifest)
    assert got_labels == [h.label for _, _, h, _ in rows]
    assert got_jpegs == [jpeg for _, _, _, jpeg in rows]


def test_rerun_with_fewer_shards_and_atomic_manifest(fixtures_dir, tmp_path):
    out = tmp_path / "d"
    prepare_dali(fixtures_dir / "ms1m_tiny", out, shards=4, progress=False)
    m = prepare_dali(fixtures_dir / "ms1m_tiny", out, shards=2, progress=False)
    assert sorted(p.name for p in out.glob("part-*")) == sorted(
        n for s in m["shards"] for n in (s["rec"], s["idx"]))
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / MANIFEST).read_text()) == m
    with pytest.raises(ValueError, match="--shards 200 exceeds"):
        prepare_dali(fixtures_dir / "ms1m_tiny", out, shards=200, progress=False)
    with pytest.raises(ValueError, match="is the source folder"):
        prepare_dali(fixtures_dir / "ms1m_tiny", fixtures_dir / "ms1m_tiny", progress=False)


def test_cli(fixtures_dir, tmp_path, capsys):
    m = tool.main(["--rec", str(fixtures_dir / "ms1m_tiny"), "--out", str(tmp_path / "c"),
                   "--shards", "2", "--seed", "1", "--workers", "1"])
    assert m["num_images"] == 96 and len(m["shards"]) == 2
    assert "data.dali_dir=" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
