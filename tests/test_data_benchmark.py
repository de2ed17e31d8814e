"""benchmarks/data.py runs end to end on a tiny tree and writes its records."""
import importlib.util
import json
import os

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
