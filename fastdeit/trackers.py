"""Experiment trackers: Weights & Biases and MLflow, fed the records ``log.jsonl`` gets.

``logging.wandb`` and ``logging.mlflow`` (each: enabled, project, name, tags; MLflow's uri) make
rank 0's RunLogger hand every step/epoch record, exactly as written to log.jsonl, to the
tracker, with the resolved config at start and the exported model folder as an artifact at the
end. Nothing here reads a device value: records arrive on logging steps with host numbers only.

Resume: each tracker's run id is kept in ``RUN_DIR/trackers.json``; a run resumed after
preemption continues the same W&B / MLflow run. Offline: ``WANDB_MODE=offline`` and a
``file:`` MLflow URI need no network (the tests run so). A tracker that fails (network down,
server gone) warns once and is switched off: training never stops for it.

Both packages are optional (``pip install -e .[trackers]``); enabling one that is missing is a
ConfigError at start.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastdeit.errors import ConfigError

IDS_FILE = "trackers.json"


@dataclass
class TrackerConfig:
    enabled: bool = False
    project: Optional[str] = None      # W&B project / MLflow experiment; None: "fastdeit"
    name: Optional[str] = None         # run name; None: the run dir's name
    tags: List[str] = field(default_factory=list)
    uri: Optional[str] = None          # MLflow tracking URI (None: MLFLOW_TRACKING_URI, else ./mlruns); W&B: unused


def _ids(run_dir: Path) -> Dict[str, str]:
    path = run_dir / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_id(run_dir: Path, tracker: str, run_id: str) -> None:
    ids = {**_ids(run_dir), tracker: run_id}
    tmp = run_dir / (IDS_FILE + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2))
    tmp.replace(run_dir / IDS_FILE)


class _Tracker:
    name = ""

    def __init__(self, cfg: TrackerConfig, run_dir: Path, config: Dict[str, Any], warn):
        self.cfg, self.run_dir, self.warn = cfg, run_dir, warn
        self.alive = True
        self._guard("start", self.start, config)
        self.started = self.alive

    def _guard(self, what: str, fn, *args) -> None:
        if not self.alive:
            return
        try:
            fn(*args)
        except Exception as e:            # never stop training for a tracker
            self.alive = False
            self.warn(f"warning: {self.name} failed in {what} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                      f"{self.name} logging is off for the rest of this run, training goes on")

    def record(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        numbers = {f"{kind}/{k}": float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._guard("log", self.log, step, numbers)

    def artifact(self, folder: Path) -> None:
        self._guard("artifact upload", self.log_folder, folder)

    def close(self, failed: bool) -> None:
        if self.alive:
            self._guard("finish", self.finish, failed)
        elif self.started:
            # Off since a failure (already warned): still close its run, so that what it logged
            # before is flushed (W&B writes through a service process) and the run is not left
            # running; the service may well fail again, which changes nothing now.
            try:
                self.finish(failed)
            except Exception:  # noqa: BLE001
                pass


class WandbTracker(_Tracker):
    name = "wandb"

    def start(self, config: Dict[str, Any]) -> None:
        import wandb

        run_id = _ids(self.run_dir).get("wandb")
        self.run = wandb.init(project=self.cfg.project or "fastdeit", name=self.cfg.name or self.run_dir.name,
                              tags=list(self.cfg.tags) or None, config=config, dir=str(self.run_dir),
                              id=run_id, resume="allow" if run_id else None, reinit="finish_previous")
        _save_id(self.run_dir, "wandb", self.run.id)
        # Our optimizer step is the x axis: a resumed run re-logs from its checkpoint's step,
        # which W&B's own monotonic step would drop.
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")

    def log(self, step: int, numbers: Dict[str, float]) -> None:
        self.run.log({"trainer/step": step, **numbers})

    def log_folder(self, folder: Path) -> None:
        import wandb

        art = wandb.Artifact(f"{folder.name}-{self.run.id}", type="model")
        art.add_dir(str(folder))
        self.run.log_artifact(art)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker(_Tracker):
    name = "mlflow"

    def start(self, config: Dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        # The client, not mlflow's fluent API: no process-global active run to leak into
        # other code (or into the next run of a test session).
        self.client = MlflowClient(tracking_uri=self.cfg.uri)
        run_id = _ids(self.run_dir).get("mlflow")
        if run_id is None:
            project = self.cfg.project or "fastdeit"
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
            tags = {t: "true" for t in self.cfg.tags}
            run = self.client.create_run(exp_id, run_name=self.cfg.name or self.run_dir.name, tags=tags)
            run_id = run.info.run_id
            _save_id(self.run_dir, "mlflow", run_id)
            # Parameters are immutable in MLflow: logged once, at the fresh start.
            flat = _flatten(config)
            from mlflow.entities import Param

            items = [Param(k, str(v)[:500]) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.client.log_dict(run_id, config, "config.yaml")     # the resolved config of this launch

    def log(self, step: int, numbers: Dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in numbers.items()])

    def log_folder(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=folder.name)

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_available(wandb_cfg: TrackerConfig, mlflow_cfg: TrackerConfig) -> None:
    import importlib.util

    for key, cfg, module, pkg in (("logging.wandb", wandb_cfg, "wandb", "wandb"),
                                  ("logging.mlflow", mlflow_cfg, "mlflow", "mlflow-skinny")):
        if cfg.enabled and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}.enabled=true but {module} is not installed: pip install {pkg} "
                              "(or the fastdeit[trackers] extra)")


def start_trackers(wandb_cfg: TrackerConfig, mlflow_cfg: TrackerConfig, run_dir: Path,
                   config: Dict[str, Any], warn) -> List[_Tracker]:
    """Rank 0 only. The enabled trackers, started (or resumed) with the resolved config."""
    check_available(wandb_cfg, mlflow_cfg)
    out: List[_Tracker] = []
    if wandb_cfg.enabled:
        out.append(WandbTracker(wandb_cfg, run_dir, config, warn))
    if mlflow_cfg.enabled:
        out.append(MlflowTracker(mlflow_cfg, run_dir, config, warn))
    return out
