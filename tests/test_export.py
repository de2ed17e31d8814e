"""The model folder a run ends with (fastdeit/export.py): timm loads it with `local-dir:` and
gets the run's own logits; timm's data config read back from it reproduces the run's eval
preprocessing; launch/export.py writes the same; teacher.weights and model.init_weights take it.

One in-process run on one CPU rank (a tiny distilled DeiT, hard distillation from the shared
resnet10t teacher, EMA on), shared by the tests; it also logs to W&B (offline) and MLflow (a
file store), whose records are checked against log.jsonl (fastdeit/trackers.py). A stop signal
lands in the middle of its final export (SLURM's USR2@300 near a job's limit): the finished run
must neither die of it nor stop, and every file the tests read must be complete.
"""
import json
import os
import signal

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from fastdeit import distributed
from fastdeit import trainer as trainer_module
from fastdeit.build import build_trainer
from fastdeit.config import load_config
from fastdeit.data.loading.folder import scan_image_folder
from fastdeit.errors import WeightsError
from fastdeit.models import ModelConfig, TeacherConfig, build_student, build_teacher, eval_heads
from fastdeit.preemption import SignalWatch
from tests.launching import ROOT, TINY, records

KWARGS = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def trained(dataset, teacher, tmp_path_factory):
    """(run dir, the trainer after fit) of one epoch in this process."""
    run = tmp_path_factory.mktemp("export-run")
    mlruns = tmp_path_factory.mktemp("mlruns")
    cfg = load_config(None, [*TINY, f"data.root={dataset}", f"trainer.run_dir={run}", "trainer.epochs=1",
                             "model.name=deit_tiny_distilled_patch16_224", "distill.type=hard",
                             "teacher.name=resnet10t", f"teacher.weights={teacher}", "ema.decay=0.9",
                             "model.compile=false", "teacher.compile=false",
                             "logging.wandb.enabled=true", "logging.wandb.project=ship-test",
                             "logging.mlflow.enabled=true", f"logging.mlflow.uri=file://{mlruns}",
                             "logging.mlflow.project=ship-test", "logging.mlflow.tags=[tiny, test]"])
    # MLflow 3 keeps its file store behind this switch (it prefers a database); offline either way.
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT", "MLFLOW_ALLOW_FILE_STORE")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true")
    real_export = trainer_module.export_checkpoint

    def export_under_a_stop_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR2)
        return real_export(*args, **kwargs)

    env = distributed.init()
    trainer_module.export_checkpoint = export_under_a_stop_signal
    try:
        trainer = build_trainer(cfg, env)
        with SignalWatch(cfg.trainer.stop_signals) as watch:      # as launch/train.py holds it
            trainer.fit(watch)
        assert watch.received == "SIGUSR2"
        yield run, trainer
    finally:
        trainer_module.export_checkpoint = real_export
        distributed.teardown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def wandb_records(folder):
    """The records an offline W&B run wrote (what `wandb sync` uploads), by type: its .wandb file
    is a LevelDB-style log (a 7-byte ':W&B' header, 32 KiB blocks of [crc32, length, type]
    chunks) of wandb_internal_pb2.Record messages; read here without wandb's own code so the
    check does not share a reader with the code under test."""
    import struct
    from collections import defaultdict

    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:                                    # the block's zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):                               # full, first
            pending = chunk
        else:                                            # middle, last
            pending += chunk
        if kind in (1, 4):
            chunks.append(pending)
    out = defaultdict(list)
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        out[record.WhichOneof("record_type")].append(record)
    return out


def wandb_history(records):
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records["history"]]


def loaded(folder, dtype=torch.bfloat16):
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval().to(dtype)


def test_timm_loads_the_folder_and_gives_the_runs_logits(trained):
    run, trainer = trained
    last = records(run, "epoch")[-1]
    summary = json.loads((run / "summary.json").read_text())
    for tag, module, prefix in (("model", trainer.engine.module, "val/"),
                                ("model_ema", trainer.ema.module(), "val/ema_")):
        folder = run / tag
        assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md"}
        assert summary[("export_ema" if tag == "model_ema" else "export") + "_folder"] == str(folder)
        model = loaded(folder)
        correct = total = 0
        for images, labels in trainer.val_loader:
            ours = eval_heads(module, images.to(torch.bfloat16))["avg"]
            with torch.no_grad():
                theirs = model(images.to(torch.bfloat16))
            # bf16 masters of the run = bf16(fp32 masters in the folder): the same numbers
            assert torch.equal(ours, theirs), (tag, (ours.float() - theirs.float()).abs().max())
            correct += int((theirs.argmax(1) == labels).sum())
            total += labels.numel()
        assert total == 40 and 100.0 * correct / total == last[prefix + "avg_top1"]
        # The .pth stays for older tooling, the same fp32 weights
        pth = torch.load(run / f"{tag}.pth", weights_only=True)
        st = load_file(folder / "model.safetensors")
        assert pth.keys() == st.keys() and all(torch.equal(pth[k], st[k]) for k in st)


def test_config_json_is_timms_with_the_runs_eval_transform_and_labels(trained, dataset):
    run, _ = trained
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_distilled_patch16_224"
    assert config["num_classes"] == 4
    assert config["label_names"] == sorted(os.listdir(dataset / "train"))
    assert {k: config["model_args"][k] for k in KWARGS} == KWARGS and config["model_args"]["img_size"] == [32, 32]
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["crop_pct"] == 0.875 and pcfg["crop_mode"] == "center"
    assert pcfg["interpolation"] == "bicubic" and pcfg["mean"] == [0.485, 0.456, 0.406]
    assert pcfg["std"] == [0.229, 0.224, 0.225] and pcfg["num_classes"] == 4


def test_timms_transform_from_the_folder_reproduces_the_eval_preprocessing(trained, dataset):
    """timm.data.resolve_data_config + create_transform on PIL images against the run's DALI
    val batches: the tolerance of tests/test_data_loader.py's eval-transform check (DALI's cubic
    kernel vs PIL's, uint8 rounding: ~0.003 mean |diff| after normalising)."""
    run, trainer = trained
    model = loaded(run / "model", torch.float32)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    files, _, _ = scan_image_folder(str(dataset / "val"))
    ours = torch.cat([x.float() for x, _ in trainer.val_loader])
    assert len(files) == len(ours) == 40
    diffs = [(transform(Image.open(f).convert("RGB")) - got).abs().mean().item() for f, got in zip(files, ours)]
    assert max(diffs) < 0.01, diffs


def test_model_card_names_recipe_data_results_throughput(trained, dataset):
    run, _ = trained
    card = (run / "model" / "README.md").read_text()
    last = records(run, "epoch")[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: timm")
    assert "deit_tiny_distilled_patch16_224" in card and "hard, teacher resnet10t" in card
    for head in ("cls", "dist", "avg"):
        assert f"{last[f'val/{head}_top1']:.2f} | {last[f'val/ema_{head}_top1']:.2f} |" in card
    assert f"{summary['img_per_sec']:.1f} images/sec" in card and "epochs: 1" in card
    assert f"`{dataset}`" in card                                  # the data it trained on


def test_export_cli_and_weights_from_a_folder(trained, tmp_path):
    """launch/export.py writes the same folder; teacher.weights and model.init_weights accept it
    (also as local-dir:FOLDER and as the .safetensors file itself)."""
    import importlib.util

    run, _ = trained
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "launch" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    folder = cli.main([str(run), "--folder", str(tmp_path / "again"), "--out", str(tmp_path / "again.pth")])
    again, first = load_file(folder / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert json.loads((folder / "config.json").read_text()) == json.loads((run / "model" / "config.json").read_text())

    for source in (str(folder), f"local-dir:{folder}", str(folder / "model.safetensors")):
        student = build_student(ModelConfig(name="deit_tiny_distilled_patch16_224", kwargs=KWARGS,
                                            init_weights=source), 32, 4)
        assert all(torch.equal(student.state_dict()[k], first[k]) for k in first)
        teacher = build_teacher(TeacherConfig(name="deit_tiny_distilled_patch16_224", kwargs=dict(KWARGS, img_size=32),
                                              weights=source, dtype="fp32", compile=False), 4, torch.device("cpu"))
        assert all(torch.equal(teacher.module.state_dict()[k], first[k]) for k in first)
    with pytest.raises(WeightsError, match=str(tmp_path)):
        build_student(ModelConfig(name="deit_tiny_distilled_patch16_224", kwargs=KWARGS,
                                  init_weights=str(tmp_path)), 32, 4)


def test_trackers_get_the_log_records_config_and_model_folder(trained):
    from mlflow.tracking import MlflowClient

    run, trainer = trained
    ids = json.loads((run / "trackers.json").read_text())
    cfg = trainer.logger.cfg
    client = MlflowClient(tracking_uri=cfg.mlflow.uri)
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == run.name
    assert {"tiny", "test"} <= set(mlrun.data.tags)
    assert mlrun.data.params["model.name"] == "deit_tiny_distilled_patch16_224"
    steps = records(run, "step")
    history = sorted(client.get_metric_history(ids["mlflow"], "step/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    last = records(run, "epoch")[-1]
    top1 = client.get_metric_history(ids["mlflow"], "epoch/val/ema_avg_top1")
    assert [m.value for m in top1] == [last["val/ema_avg_top1"]]
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert {"config.yaml", "model", "model_ema"} <= artifacts
    assert {a.path for a in client.list_artifacts(ids["mlflow"], "model")} >= {
        "model/model.safetensors", "model/config.json", "model/README.md"}
    # W&B, offline: the run folder under the run dir carries the id kept for resuming, and its
    # log holds the same records, the resolved config, both model folders and a clean exit.
    (folder,) = (run / "wandb").glob(f"offline-run-*-{ids['wandb']}")
    wb = wandb_records(folder)
    history = wandb_history(wb)
    logged = [(h["trainer/step"], h["step/loss"]) for h in history if "step/loss" in h]
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    assert [h["epoch/val/ema_avg_top1"] for h in history if "epoch/val/ema_avg_top1" in h] == [
        pytest.approx(last["val/ema_avg_top1"])]
    (wbrun,) = wb["run"]
    config = {i.key: json.loads(i.value_json) for i in wbrun.run.config.update}
    assert config["model"]["name"] == "deit_tiny_distilled_patch16_224"
    assert wbrun.run.project == "ship-test" and wbrun.run.display_name == run.name
    artifacts = {a.artifact.name: a.artifact for a in wb["artifact"]}
    assert set(artifacts) == {f"model-{ids['wandb']}", f"model_ema-{ids['wandb']}"}
    for artifact in artifacts.values():
        assert artifact.type == "model"
        assert {e.path for e in artifact.manifest.contents} >= {"model.safetensors", "config.json", "README.md"}
    assert [r.exit.exit_code for r in wb["exit"]] == [0]


def test_a_resumed_run_continues_the_tracker_run_and_a_failing_tracker_only_warns(trained, monkeypatch):
    """What a resumed launch's logger does (fastdeit.metrics.RunLogger over the same run dir):
    both trackers continue the run whose id the run dir kept; when a tracker's service then
    fails, it warns once and stops, and log.jsonl and the other tracker go on."""
    from mlflow.tracking import MlflowClient

    from fastdeit.metrics import LoggingConfig, RunLogger
    from fastdeit.trackers import TrackerConfig

    run, trainer = trained
    uri = trainer.logger.cfg.mlflow.uri
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    before = json.loads((run / "trackers.json").read_text())
    cfg = LoggingConfig(wandb=TrackerConfig(enabled=True, project="ship-test"),
                        mlflow=TrackerConfig(enabled=True, uri=uri, project="ship-test"))
    warnings = []
    logger = RunLogger(cfg, str(run), True)
    logger.info = warnings.append
    wandb_tracker, mlflow_tracker = logger.trackers
    assert (wandb_tracker.name, mlflow_tracker.name) == ("wandb", "mlflow")
    for tracker in logger.trackers:
        tracker.warn = warnings.append
    assert json.loads((run / "trackers.json").read_text()) == before                       # the same runs
    assert wandb_tracker.run.id == before["wandb"]
    assert MlflowClient(tracking_uri=uri).get_run(before["mlflow"]).info.status == "RUNNING"
    logger.record("step", 99, {"loss": 2.0})                     # both trackers up

    def down(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    mlflow_tracker.client.log_batch = down
    lines = len((run / "log.jsonl").read_text().splitlines())
    for step in (100, 101):
        logger.record("step", step, {"loss": 1.0})
    assert len((run / "log.jsonl").read_text().splitlines()) == lines + 2      # log.jsonl goes on
    assert len(warnings) == 1 and "mlflow failed in log" in warnings[0] and "training goes on" in warnings[0]
    wandb_tracker.run.log = down
    logger.record("step", 102, {"loss": 0.5})
    assert len(warnings) == 2 and "wandb failed in log" in warnings[1]
    logger.close()          # both trackers are off: no further calls, no error
    history = [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(before["mlflow"], "step/loss")]
    assert (99, 2.0) in history and (100, 1.0) not in history
    # W&B: the resumed launch wrote a second offline folder of the same run, holding what it
    # logged before its service failed (`wandb sync` appends it to the first).
    folders = sorted((run / "wandb").glob(f"offline-run-*-{before['wandb']}"))
    assert len(folders) == 2
    logged = [(h["trainer/step"], h["step/loss"]) for h in wandb_history(wandb_records(folders[-1])) if "step/loss" in h]
    assert logged == [(99, 2.0), (100, 1.0), (101, 1.0)]
