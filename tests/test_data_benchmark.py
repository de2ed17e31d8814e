"""benchmarks/data.py runs end to end on a tiny tree and writes its records."""
import importlib.util
import json
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_benchmark_smoke(tmp_path, synthetic_tree):
    spec = importlib.util.spec_from_file_location(
        "benchmark_data", os.path.join(ROOT, "benchmarks", "data.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = str(tmp_path / "result")
    bench.main(["--data", synthetic_tree, "--batch", "8", "--workers", "1", "--epochs", "2",
                "--img-size", "32", "--out", out])
    record = json.load(open(out + ".json"))
    assert set(record["images_per_sec_steady"]) == {"ours", "baseline"}
    assert record["ratio_ours_over_baseline"] > 0 and record["commit"]
    assert all(len(run["ours"]) == 2 for run in record["runs"])
    assert "Ratio ours / baseline" in open(out + ".md").read()



def _bench():
    spec = importlib.util.spec_from_file_location(
        "benchmark_data", os.path.join(ROOT, "benchmarks", "data.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture(scope="module")
def packed(tmp_path_factory, synthetic_tree):
    from fastdeit.data import pack

    out = str(tmp_path_factory.mktemp("bench") / "packed")
    assert pack.main([synthetic_tree, out, "--shard-size", "100KB", "--quiet"]) == 0
    return out


def test_data_benchmark_packed(tmp_path, synthetic_tree, packed):
    """--data at a packed folder: ours from the shards too, the others from the source tree."""
    out = str(tmp_path / "result")
    _bench().main(["--data", packed, "--batch", "8", "--workers", "1", "--epochs", "2",
                   "--img-size", "32", "--out", out])
    record = json.load(open(out + ".json"))
    assert set(record["images_per_sec_steady"]) == {"ours", "baseline", "shards"}
    assert record["folder"] == synthetic_tree and record["ratio_shards_over_folder"] > 0
    assert "Shards (" in open(out + ".md").read()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_file_opens_per_epoch(synthetic_tree, packed):
    """strace's count: the folder opens every image file every epoch; the shards are opened
    once (first epoch) and kept open."""
    import argparse

    args = argparse.Namespace(batch=8, img_size=32)
    bench = _bench()
    shards = json.load(open(os.path.join(packed, "manifest.json")))["splits"]["train"]["shards"]
    assert bench.count_opens(args, packed) == [shards, 0]
    assert min(bench.count_opens(args, synthetic_tree)) >= 96


def test_strace_opens_joined_across_interrupted_calls():
    """A call that another thread interrupts comes in two pieces under `strace -f`; it still
    counts once, for the epoch it began in, and failed opens do not count."""
    lines = [
        '10 openat(AT_FDCWD, "/nonexistent/fastdeit-epoch-0", O_RDONLY) = -1 ENOENT (No such file)',
        '11 openat(AT_FDCWD, "/d/a.shard", O_RDONLY <unfinished ...>',
        '12 openat(AT_FDCWD, "/d/b.shard", O_RDONLY) = 7',
        '10 openat(AT_FDCWD, "/nonexistent/fastdeit-epoch-1", O_RDONLY) = -1 ENOENT (No such file)',
        '11 <... openat resumed>)                = 6',           # strace pads short lines' results
        '12 openat(AT_FDCWD, "/d/c.shard", O_RDONLY) = -1 ENOENT (No such file)',
        '12 openat(AT_FDCWD, "/elsewhere/x", O_RDONLY) = 8',
    ]
    assert _bench().count_successful_opens(lines, "/d", 2) == [2, 0]
