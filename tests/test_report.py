"""python -m fastdeit.report RUN_DIR: curves from a log.jsonl into RUN_DIR/report.png."""
import json

import pytest

from fastdeit import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(run_dir, distilled=True, evals=True):
    rows = []
    for step in range(10, 101, 10):
        row = {"kind": "step", "step": step, "time": 1.0 * step, "loss": 3.0 - step / 50, "lr": 1e-3 * step / 100,
               "img_per_sec": 1000.0 + step, "mfu": 0.4, "data_wait": 0.02}
        if distilled:
            row.update(loss_cls=row["loss"] * 0.9, loss_dist=row["loss"] * 1.1)
        rows.append(row)
    for epoch, step in enumerate((50, 100)):
        row = {"kind": "epoch", "step": step, "time": 0.0, "epoch": epoch, "train/loss": 2.0 - epoch}
        if evals:
            heads = ("cls", "dist", "avg") if distilled else ("cls",)
            row.update({f"val/{h}_top1": 40.0 + 10 * epoch + i for i, h in enumerate(heads)})
        rows.append(row)
    text = "\n".join(json.dumps(r) for r in rows) + "\n" + '{"kind": "step", "st'   # killed mid-write
    (run_dir / "log.jsonl").write_text(text)


@pytest.mark.parametrize("distilled,evals", [(True, True), (False, False)])
def test_report_png(tmp_path, distilled, evals):
    write_log(tmp_path, distilled, evals)
    out = report.main([str(tmp_path)])
    assert out == tmp_path / "report.png"
    assert out.read_bytes().startswith(PNG_MAGIC)
    records = report.read_log(tmp_path / "log.jsonl")
    assert len(records["step"]) == 10 and len(records["epoch"]) == 2     # partial last line skipped


def test_report_needs_a_log(tmp_path):
    with pytest.raises(SystemExit, match="log.jsonl does not exist"):
        report.main([str(tmp_path)])
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no step or epoch records"):
        report.main([str(tmp_path)])


def test_rerun_steps_count_once(tmp_path):
    """After a resume re-runs steps 3-4 (e.g. past a divergence), their later records win."""
    import json

    from fastdeit.report import read_log

    rows = [{"kind": "step", "step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    rows += [{"kind": "step", "step": s, "loss": 0.5} for s in (3, 4)]
    rows += [{"kind": "epoch", "step": 4, "epoch": 0, "train/loss": 0.7}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    log = read_log(tmp_path / "log.jsonl")
    assert [(r["step"], r["loss"]) for r in log["step"]] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5)]
    assert len(log["epoch"]) == 1
