"""data.stage_to (fastdeit/data/stage.py): the copy against the source bytes and the manifest's
sha256 (hashlib on the source files, independently), reuse, a torn copy resumed, a damaged
source named in one line, a damaged local copy copied again, old manifests. Two "nodes" of the
real SLURM fixture staging to their own folders behind one barrier: tests/test_slurm.py (one
cluster per session)."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from fastdeit.data import DataConfig
from fastdeit.data import pack as packmod
from fastdeit.data import stage as stage_lib
from fastdeit.data.loading.shards import PackedSplit
from fastdeit.distributed import DistEnv
from fastdeit.errors import ConfigError, DataError

SPLITS = ("train", "val")


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_of(root):
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and stage_lib.STATE not in p.parts)


def assert_same_tree(src, dest):
    assert files_of(src) == files_of(dest)
    for rel in files_of(src):
        assert (Path(src) / rel).read_bytes() == (Path(dest) / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def packed(flat_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "inet"
    assert packmod.main([flat_tree[0], str(out), "--shard-size", "12KB", "--quiet", "--workers", "1"]) == 0
    return out


@pytest.fixture
def source(packed, tmp_path):
    """A private copy of the packed root, free to damage."""
    dest = tmp_path / "shared" / "inet"
    shutil.copytree(packed, dest)
    return dest


def test_pack_records_the_sha256_of_every_index_and_shard(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    for split in SPLITS:
        sums = manifest["splits"][split]["sha256"]
        on_disk = sorted(p.name for p in (packed / split).iterdir())
        assert sorted(sums) == on_disk and len(on_disk) > 3        # the index and several shards
        assert all(sums[name] == sha(packed / split / name) for name in on_disk)


def test_copy_checked_then_reused(source, tmp_path):
    dest = stage_lib.destination(str(source), str(tmp_path / "local"))
    assert dest == str(tmp_path / "local" / "inet")
    first = stage_lib.stage(str(source), dest, SPLITS)
    assert_same_tree(source, dest)
    assert first.copied == first.files == len(files_of(source)) and first.kept == 0 and first.checksums
    assert PackedSplit(dest, "train").shard_paths[0].startswith(dest)       # a packed root the loader reads
    mtimes = {rel: os.stat(Path(dest) / rel).st_mtime_ns for rel in files_of(dest)}
    again = stage_lib.stage(str(source), dest, SPLITS)
    assert again.copied == 0 and again.kept == again.files
    assert mtimes == {rel: os.stat(Path(dest) / rel).st_mtime_ns for rel in files_of(dest)}
    assert "reused %d" % again.files in again.describe("node-a") and "sha256 against the manifest" in again.describe("x")


def test_torn_copy_detected_and_resumed(source, tmp_path):
    dest = Path(stage_lib.destination(str(source), str(tmp_path / "local")))
    full = stage_lib.stage(str(source), str(dest), SPLITS)
    shards = sorted((dest / "train").glob("shard-*.tar"))
    # A copy killed mid-file: the first half of one shard under .partial, its final name absent...
    killed = shards[0]
    data = killed.read_bytes()
    killed.unlink()
    Path(f"{killed}.partial").write_bytes(data[: len(data) // 2])
    # ...another shard torn under its final name (half its bytes), the manifest not yet copied,
    # and the journal's last line cut short.
    torn = shards[1]
    torn.write_bytes(torn.read_bytes()[:1000])
    (dest / "manifest.json").unlink()
    journal = dest / stage_lib.STATE / "journal.jsonl"
    journal.write_text(journal.read_text() + '{"rel": "train/shard-0')
    result = stage_lib.stage(str(source), str(dest), SPLITS)
    assert (result.copied, result.resumed, result.kept) == (3, 1, full.files - 3)
    assert not list(dest.rglob("*.partial"))
    assert_same_tree(source, dest)


def test_damaged_source_is_named_in_one_line(source, tmp_path):
    shard = sorted((source / "val").glob("shard-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF                                   # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    dest = Path(stage_lib.destination(str(source), str(tmp_path / "local")))
    with pytest.raises(DataError) as info:
        stage_lib.stage(str(source), str(dest), SPLITS)
    message = str(info.value)
    assert "\n" not in message and str(shard) in message and "does not match" in message
    assert "read twice" in message and "re-pack" in message
    assert not (dest / "val" / shard.name).exists() and not list(dest.rglob("*.partial"))
    assert not (dest / "manifest.json").exists()        # never a packed root with a bad shard


def test_damaged_local_file_is_copied_again(source, tmp_path):
    dest = Path(stage_lib.destination(str(source), str(tmp_path / "local")))
    stage_lib.stage(str(source), str(dest), SPLITS)
    local = sorted((dest / "train").glob("shard-*.tar"))[2]
    data = bytearray(local.read_bytes())
    data[600] ^= 0xFF
    local.write_bytes(bytes(data))                      # same size, new mtime
    result = stage_lib.stage(str(source), str(dest), SPLITS)
    assert result.copied == 1 and result.kept == result.files - 1
    assert_same_tree(source, dest)


def test_manifest_without_checksums_still_stages_and_can_get_them(source, packed, tmp_path):
    manifest_path = source / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["splits"].values():
        del entry["sha256"]                             # as pack.py wrote it before checksums
    manifest_path.write_text(json.dumps(manifest))
    assert len(PackedSplit(str(source), "train").shard_paths) > 1          # the loader still reads it
    dest = stage_lib.destination(str(source), str(tmp_path / "local"))
    result = stage_lib.stage(str(source), dest, SPLITS)
    assert not result.checksums and "--add-checksums" in result.describe("n")
    assert_same_tree(source, dest)
    assert stage_lib.main([str(source), "--add-checksums"]) == 0
    again = json.loads(manifest_path.read_text())
    original = json.loads((packed / "manifest.json").read_text())
    assert all(again["splits"][s]["sha256"] == original["splits"][s]["sha256"] for s in SPLITS)


def test_class_folder_root_staged(flat_tree, tmp_path):
    root = flat_tree[0]
    dest = stage_lib.destination(root, str(tmp_path / "local"))
    result = stage_lib.stage(root, dest, SPLITS)
    assert not result.checksums and result.copied == result.files == len(files_of(root))
    assert_same_tree(root, dest)


def test_destination_names_and_refusals(source, flat_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("NODE_SCRATCH", str(tmp_path / "scratch"))
    assert stage_lib.destination(str(source), "$NODE_SCRATCH/x") == str(tmp_path / "scratch" / "x" / "inet")
    assert stage_lib.destination(str(source), "${NODE_SCRATCH}") == str(tmp_path / "scratch" / "inet")
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    with pytest.raises(ConfigError, match=r"data.stage_to=\$NO_SUCH_VAR/x: .* not set"):
        stage_lib.destination(str(source), "$NO_SUCH_VAR/x")
    with pytest.raises(ConfigError, match="overlap"):
        stage_lib.destination(str(source), str(source))
    # A folder already holding a copy of another root is not overwritten.
    other = tmp_path / "other" / "inet"
    shutil.copytree(flat_tree[0], other)
    stage_lib.stage(str(source), str(tmp_path / "local" / "inet"), SPLITS)
    with pytest.raises(DataError, match=f"holds a copy of {source}, not of data.root={other}"):
        stage_lib.stage(str(other), str(tmp_path / "local" / "inet"), SPLITS)


def test_stage_data_hands_the_loader_the_copy(source, tmp_path):
    """build.py's call on one process: the config comes back with data.root = the checked copy,
    and the loader built from it reads the copy's shards; unset, nothing is copied."""
    from fastdeit.data import build_loader
    import torch

    cfg = DataConfig(root=str(source), img_size=32, num_threads=1, device="cpu", rand_augment=None, repeated_aug=1)
    assert stage_lib.stage_data(cfg, DistEnv()) is cfg
    lines = []
    staged = stage_lib.stage_data(DataConfig(**{**vars(cfg), "stage_to": str(tmp_path / "local")}), DistEnv(),
                                  log=lines.append)
    assert staged.root == str(tmp_path / "local" / "inet") and len(lines) == 1 and "data staged on" in lines[0]
    loader = build_loader(staged, "val", 4, 0, 1, 0, torch.device("cpu"))
    try:
        assert all(p.startswith(staged.root) for p in loader._source.split.shard_paths)
        images, labels = next(iter(loader))
        assert images.shape[0] == 4
    finally:
        loader.close()
