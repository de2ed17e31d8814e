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
    # W&B offline: the run folder under the run dir carries the id kept for resuming
    assert list((run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))


def test_a_resumed_run_continues_the_tracker_run_and_a_failing_tracker_only_warns(trained, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fastdeit.metrics import LoggingConfig, RunLogger
    from fastdeit.trackers import TrackerConfig

    run, trainer = trained
    uri = trainer.logger.cfg.mlflow.uri
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    before = json.loads((run / "trackers.json").read_text())
    cfg = LoggingConfig(mlflow=TrackerConfig(enabled=True, uri=uri, project="ship-test"))
    warnings = []
    logger = RunLogger(cfg, str(run), True)
    logger.info = warnings.append
    logger.trackers[0].warn = warnings.append
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == before["mlflow"]   # the same run
    assert MlflowClient(tracking_uri=uri).get_run(before["mlflow"]).info.status == "RUNNING"

    def down(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    logger.trackers[0].client.log_batch = down
    lines = len((run / "log.jsonl").read_text().splitlines())
    for step in (100, 101):
        logger.record("step", step, {"loss": 1.0})
    assert len((run / "log.jsonl").read_text().splitlines()) == lines + 2      # log.jsonl goes on
    assert len(warnings) == 1 and "mlflow failed in log" in warnings[0] and "training goes on" in warnings[0]
    logger.close()          # the tracker is off: no further calls, no error
