import hashlib
import json

import pytest
import torch

from continual_kd.errors import CkdError
from continual_kd.snapshots import (
    list_snapshots,
    prune_snapshots,
    resolve_snapshot,
    verify_snapshot,
    write_snapshot,
)


def _states(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "teacher:mf128": {"user_emb": torch.randn(5, 4, generator=g), "item_emb": torch.randn(7, 4, generator=g)},
        "student": {"user_emb": torch.randn(5, 2, generator=g), "step": torch.tensor(seed)},
    }


def _write_blocks(runs, blocks):
    for b in blocks:
        write_snapshot(runs, b, _states(b), {"metrics": {"ndcg@20": 0.1 * b}, "job": "stream.yaml"})


def _assert_states_equal(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys()
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (name, key)


def _flip_byte(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_and_manifest(tmp_path):
    runs = tmp_path / "runs"
    states = _states(3)
    snap = write_snapshot(runs, 3, states, {"metrics": {"ndcg@20": 0.25}, "job": "stream.yaml"})
    assert snap.path == runs / "block-0003" and snap.block == 3
    assert sorted(p.name for p in snap.path.iterdir()) == ["manifest.json", "student.pt", "teacher--mf128.pt"]

    manifest = json.loads((snap.path / "manifest.json").read_text())
    assert manifest["block"] == 3 and manifest["format_version"] == 1
    assert manifest["metrics"] == {"ndcg@20": 0.25} and manifest["job"] == "stream.yaml"
    assert manifest["models"] == {"teacher:mf128": "teacher--mf128.pt", "student": "student.pt"}
    for filename, entry in manifest["files"].items():
        data = (snap.path / filename).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert isinstance(manifest["created_at"], str) and manifest["created_at"].endswith("+00:00")

    resolved, warnings = resolve_snapshot(runs, "latest")
    assert warnings == [] and resolved.block == 3 and resolved.manifest == manifest
    _assert_states_equal(resolved.load_states(), states)
    assert list_snapshots(runs) == [3]


def test_slices_are_saved_without_their_base_storage(tmp_path):
    big = torch.arange(1_000_000, dtype=torch.float32)
    snap = write_snapshot(tmp_path, 0, {"m": {"w": big[:10]}}, {})
    assert snap.manifest["files"]["m.pt"]["bytes"] < 10_000
    assert torch.equal(snap.load_states()["m"]["w"], big[:10])


def test_rewrite_of_same_block_replaces_it(tmp_path):
    write_snapshot(tmp_path, 1, _states(1), {"attempt": 1})
    write_snapshot(tmp_path, 1, _states(9), {"attempt": 2})
    snap, _ = resolve_snapshot(tmp_path, 1)
    assert snap.manifest["attempt"] == 2
    _assert_states_equal(snap.load_states(), _states(9))
    assert [p.name for p in tmp_path.iterdir()] == ["block-0001"]


def test_flipped_byte_is_detected_and_latest_falls_back(tmp_path):
    _write_blocks(tmp_path, [2, 3, 4])
    damaged = tmp_path / "block-0004" / "teacher--mf128.pt"
    _flip_byte(damaged)

    with pytest.raises(CkdError, match=r"block-0004/teacher--mf128\.pt is damaged \(checksum mismatch\)"):
        verify_snapshot(tmp_path / "block-0004")
    verify_snapshot(tmp_path / "block-0003")

    snap, warnings = resolve_snapshot(tmp_path)
    assert snap.block == 3
    assert warnings == ["block-0004 is damaged (teacher--mf128.pt checksum mismatch); using block-0003"]
    _assert_states_equal(snap.load_states(), _states(3))

    with pytest.raises(CkdError, match=r"teacher--mf128\.pt is damaged"):
        resolve_snapshot(tmp_path, 4)
    assert resolve_snapshot(tmp_path, "3")[0].block == 3


def test_missing_and_truncated_files_and_bad_manifest(tmp_path):
    _write_blocks(tmp_path, [0, 1, 2])
    (tmp_path / "block-0002" / "student.pt").unlink()
    with pytest.raises(CkdError, match=r"block-0002/student\.pt is damaged \(missing\)"):
        verify_snapshot(tmp_path / "block-0002")
    student = tmp_path / "block-0001" / "student.pt"
    student.write_bytes(student.read_bytes()[:-1])
    with pytest.raises(CkdError, match=r"block-0001/student\.pt is damaged \(size"):
        verify_snapshot(tmp_path / "block-0001")

    manifest = tmp_path / "block-0000" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"ndcg@20": 0.0', '"ndcg@20": NaN'))
    with pytest.raises(CkdError, match=r"block-0000/manifest\.json is damaged \(does not parse"):
        verify_snapshot(tmp_path / "block-0000")
    manifest.write_text(text[:-20])
    with pytest.raises(CkdError, match=r"manifest\.json is damaged"):
        verify_snapshot(tmp_path / "block-0000")

    with pytest.raises(CkdError, match=r"Every snapshot .* is damaged"):
        resolve_snapshot(tmp_path)


def test_a_snapshot_folder_that_lost_its_manifest_is_named_not_skipped_silently(tmp_path):
    _write_blocks(tmp_path, [2, 3, 4])
    (tmp_path / "block-0004" / "manifest.json").unlink()  # its model files stay
    snap, warnings = resolve_snapshot(tmp_path)
    assert snap.block == 3 and warnings == ["block-0004 is damaged (manifest.json missing); using block-0003"]
    with pytest.raises(CkdError, match=r"block-0004/manifest\.json is damaged \(missing\)"):
        resolve_snapshot(tmp_path, 4)
    (tmp_path / "block-0002" / "manifest.json").unlink()  # an older one, under the newest intact snapshot: not named
    snap, warnings = resolve_snapshot(tmp_path, "latest")
    assert snap.block == 3 and not any("block-0002" in w for w in warnings)
    # a damaged newest snapshot above a lost manifest: both are named on the way down
    _write_blocks(tmp_path, [5])
    _flip_byte(tmp_path / "block-0005" / "student.pt")
    snap, warnings = resolve_snapshot(tmp_path)
    assert snap.block == 3 and warnings == ["block-0005 is damaged (student.pt checksum mismatch); using block-0003",
                                            "block-0004 is damaged (manifest.json missing); using block-0003"]


def test_unknown_or_no_snapshot(tmp_path):
    with pytest.raises(CkdError, match=r"No snapshots in .*ckd submit"):
        resolve_snapshot(tmp_path / "nothing-here")
    _write_blocks(tmp_path, [0, 2])
    with pytest.raises(CkdError, match=r"No snapshot for block 5 .*available blocks: 0, 2 .*ckd submit"):
        resolve_snapshot(tmp_path, 5)
    with pytest.raises(CkdError, match=r"'latest' or a block number"):
        resolve_snapshot(tmp_path, "newest")


def test_leftovers_of_a_crash_are_ignored_and_pruned(tmp_path):
    _write_blocks(tmp_path, [0, 1])
    crash = tmp_path / ".tmp-block-0002-0123abcd"
    crash.mkdir()
    (crash / "student.pt").write_bytes(b"half written")
    old = tmp_path / ".old-block-0001-deadbeef"
    old.mkdir()
    (old / "manifest.json").write_text("{}")

    assert list_snapshots(tmp_path) == [0, 1]
    snap, warnings = resolve_snapshot(tmp_path)
    assert (snap.block, warnings) == (1, [])

    assert prune_snapshots(tmp_path, keep_last=5) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-0000", "block-0001"]


def test_prune_keeps_last_n_and_named(tmp_path):
    _write_blocks(tmp_path, range(6))
    assert prune_snapshots(tmp_path, keep_last=2, keep={1}) == [0, 2, 3]
    assert list_snapshots(tmp_path) == [1, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-0001", "block-0004", "block-0005"]
    with pytest.raises(CkdError, match="keep_last"):
        prune_snapshots(tmp_path, keep_last=0)


def test_prune_never_deletes_the_newest_intact_snapshot(tmp_path):
    _write_blocks(tmp_path, range(4))
    _flip_byte(tmp_path / "block-0003" / "student.pt")
    assert prune_snapshots(tmp_path, keep_last=1) == [0, 1]
    assert list_snapshots(tmp_path) == [2, 3]
    assert resolve_snapshot(tmp_path)[0].block == 2


def test_model_names_are_made_filesystem_safe(tmp_path):
    states = {"teacher:lightgcn/64": {"w": torch.ones(2)}, "teacher--lightgcn_64": {"w": torch.zeros(2)},
              "..": {"w": torch.full((2,), 3.0)}}
    snap = write_snapshot(tmp_path, 0, states, {})
    filenames = list(snap.manifest["models"].values())
    assert filenames[0] == "teacher--lightgcn_64.pt"
    assert len(set(filenames)) == 3
    assert all("/" not in f and ":" not in f and not f.startswith(".") for f in filenames)
    resolved, _ = resolve_snapshot(tmp_path, 0)
    _assert_states_equal(resolved.load_states(), states)
