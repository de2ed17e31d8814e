"""Weights from every source a DeiT/timm user has, and fitting them to the model being trained.

One place for reading (``read_state_dict``) and one for loading (``load_weights``); the student's
``model.init_weights`` and the teacher's ``teacher.weights`` both come through here.

Sources (``source`` strings):

    FILE.pth / .pt / .bin / .pth.tar   torch.load with weights_only=True (no pickled code runs);
                                       a bare state_dict, DeiT main.py's {'model', 'model_ema',
                                       'args', ...}, timm train.py's {'state_dict',
                                       'state_dict_ema', 'args', ...} or DeepSpeed's {'module'}
    FILE.safetensors                   safetensors (no pickle at all)
    FOLDER, local-dir:FOLDER           a model folder: fastdeit's export (launch/export.py,
                                       fastdeit/export.py: model.safetensors + config.json) or
                                       timm's local-dir / Hub layout (model.safetensors,
                                       pytorch_model.bin, ...); a fastdeit run dir means its
                                       exported ``model/`` folder
    http(s)://..., file://...          downloaded once into torch.hub's cache, then read as a file
    hf-hub:org/repo[@revision]         timm's Hub reader (model.safetensors, else pytorch_model.bin)
    timm                               timm's default pretrained weights for the model's name

Fine-tuning (``finetune=True``, what ``model.init_weights`` does; docs/DESIGN.md):

* the classifier head(s) (timm's ``pretrained_cfg['classifier']``: ``head`` and ``head_dist`` for
  DeiT, ``fc`` for a ResNet) keep their fresh initialisation when their shape differs from the
  file's (another class count), as the DeiT reference's ``--finetune`` and timm's
  ``load_pretrained`` both do;
* a distilled checkpoint into a plain model drops ``dist_token``, ``head_dist`` and the
  distillation token's slot (index 1) of ``pos_embed``; a plain checkpoint into a distilled model
  starts ``dist_token`` as a copy of ``cls_token``, its ``pos_embed`` slot as a copy of the class
  token's and ``head_dist`` as a copy of ``head`` (when the class count is kept), so both tokens
  start equal and both heads predict what the pretrained head did. Neither the DeiT reference
  (its ``--finetune`` refuses distillation) nor timm maps the tokens: this is our choice, the
  warm start closest to the checkpoint;
* the position embedding is resampled to the model's patch grid by timm's filter for the family
  (bicubic, no antialiasing: the reference's F.interpolate);
* every key that was not loaded is listed in one log line; anything else that does not fit
  (missing or unexpected keys, other shapes) is a CheckpointMismatchError naming the keys.

Without ``finetune`` (teachers, evaluation) the load is strict: a teacher with a fresh head
would only add noise to the student's targets.
"""
from __future__ import annotations

import argparse
import inspect
import os
import pickle
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from fastdeit.errors import CheckpointMismatchError, WeightsError, one_line

# Python objects a training checkpoint may hold besides tensors and plain containers (which
# torch's weights_only loading accepts): DeiT's main.py and timm's train.py both pickle their
# argparse.Namespace of command-line arguments next to the weights. Nothing else is allowed.
SAFE_GLOBALS = (argparse.Namespace,)
# Entries holding the (non-EMA) weights, tried in this order when no key is given: DeiT's
# main.py 'model', timm's train.py 'state_dict', DeepSpeed's model states 'module'.
WEIGHTS_KEYS = ("model", "state_dict", "module")
# A model folder's weights file, in timm's order of preference (timm.models._hub
# load_state_dict_from_path): fastdeit's export writes the first.
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
URL_SCHEMES = ("http://", "https://", "file://")


# --------------------------------------------------------------------------- reading


def _folder_file(path: str) -> str:
    """The weights file inside a model folder, or inside a fastdeit run dir's exported model/."""
    run_dir = os.path.isfile(os.path.join(path, "config.yaml"))
    folder = os.path.join(path, "model") if run_dir else path
    for name in FOLDER_FILES:
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            return file
    if run_dir:                                                 # a run dir without its export
        raise WeightsError(f"{path} is a fastdeit run without an exported model/ folder; write one with "
                           f"python launch/export.py {path}")
    raise WeightsError(f"{path} is a folder without {' or '.join(FOLDER_FILES)}; expected a model folder "
                       "(launch/export.py, timm's local-dir layout), a fastdeit run dir or a weights file")


def _download(url: str) -> str:
    """The local copy of ``url`` in torch.hub's cache (downloaded once, like
    torch.hub.load_state_dict_from_url, which cannot read .safetensors)."""
    parts = urllib.parse.urlparse(url)
    name = os.path.basename(parts.path)
    if not name:
        raise WeightsError(f"{url}: the URL names no file")
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    cached = os.path.join(folder, name)
    if not os.path.isfile(cached):
        # A name like deit_base_patch16_224-b5f2ef4d.pth carries the start of its SHA-256: checked
        # as the DeiT reference's load_state_dict_from_url(check_hash=True) does.
        match = torch.hub.HASH_REGEX.search(name)
        try:
            torch.hub.download_url_to_file(url, cached, hash_prefix=match.group(1) if match else None,
                                           progress=False)
        except Exception as e:      # urllib's HTTPError/URLError, OSError: all say the same here
            raise WeightsError(f"{url}: download failed ({type(e).__name__}: {one_line(e)})") from e
    return cached


def _read_file(path: str, source: str) -> Any:
    """A weights file: safetensors, else torch.load with weights_only and SAFE_GLOBALS only."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {source} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{source}: not a readable safetensors file ({one_line(e)})") from e
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:   # not a zip checkpoint: nothing more to say than the error
            unsafe = []
        if unsafe:
            allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
            raise WeightsError(
                f"{source}: refusing to unpickle {', '.join(unsafe)} (only tensors, plain containers "
                f"and {allowed} are loaded, as arbitrary objects can run code); save its state_dict "
                "alone with torch.save(model.state_dict(), path)") from e
        raise WeightsError(f"{source}: not a readable PyTorch weights file ({one_line(e)})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:   # torn zip, truncated file
        raise WeightsError(f"{source}: cannot read weights ({type(e).__name__}: {one_line(e)})") from e


def _read_hub(source: str, model_name: Optional[str]) -> Dict[str, torch.Tensor]:
    """``hf-hub:org/repo`` through timm's Hub reader; ``timm``: timm's pretrained weights for
    ``model_name``, loaded by timm itself (its source choice: Hub, URL or custom loader)."""
    import timm

    try:
        if source.startswith("hf-hub:"):
            from timm.models import load_state_dict_from_hf

            return load_state_dict_from_hf(source[len("hf-hub:"):])
        if not model_name:
            raise WeightsError("weights 'timm' need a model name (timm's pretrained weights for it)")
        return timm.create_model(model_name, pretrained=True).state_dict()
    except WeightsError:
        raise
    except Exception as e:   # no network, no such repo, no pretrained tag: one line naming it
        what = source if source != "timm" else f"timm's pretrained weights for {model_name}"
        raise WeightsError(f"{what}: cannot load ({type(e).__name__}: {one_line(e)})") from e


def _select_state_dict(obj: Any, source: str, key: Optional[str]) -> Dict[str, torch.Tensor]:
    """The state_dict inside a loaded file: under ``key`` if given, else the first of
    WEIGHTS_KEYS present, else the file itself; a 'module.' prefix (DDP) is dropped."""
    entries = sorted(k for k, v in obj.items() if isinstance(v, Mapping)) if isinstance(obj, Mapping) else []
    if key is not None:
        if key not in entries:
            held = f"entries {entries}" if entries else "a bare state_dict (leave weights_key unset)"
            raise WeightsError(f"{source}: no state_dict under weights_key {key!r}; the file holds {held}")
        obj = obj[key]
    else:
        found = next((k for k in WEIGHTS_KEYS if k in entries), None)
        if found is not None:
            obj = obj[found]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = f" (its entries: {entries}; choose one with weights_key)" if entries else ""
        raise WeightsError(f"{source}: does not hold a state_dict of tensors{hint}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_state_dict(source: str, key: Optional[str] = None, model_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The state_dict ``source`` names (see the module docstring); ``key`` picks an entry of a
    training checkpoint (e.g. 'model_ema', 'state_dict_ema'). Every error is a WeightsError
    naming ``source``."""
    if source == "timm" or source.startswith("hf-hub:"):
        if key is not None:
            raise WeightsError(f"weights_key={key!r} picks an entry of a checkpoint file or URL; "
                               f"{source!r} are timm's pretrained weights")
        return _select_state_dict(_read_hub(source, model_name), source, None)
    path = source[len("local-dir:"):] if source.startswith("local-dir:") else source
    if source.startswith(URL_SCHEMES):
        path = _download(source)
    elif os.path.isdir(path):
        path = _folder_file(path)
    elif source.startswith("local-dir:"):
        raise WeightsError(f"{source}: {path} is not a folder")
    return _select_state_dict(_read_file(path, source), source, key)


# --------------------------------------------------------------------------- fitting


@dataclass
class LoadReport:
    """What a load did, for the one log line of a fine-tuning start."""

    source: str
    loaded: int = 0
    reinitialised: List[str] = field(default_factory=list)    # model keys left at their init
    dropped: List[str] = field(default_factory=list)          # file keys with no place in the model
    derived: List[str] = field(default_factory=list)          # model keys made from other file keys
    resampled: Optional[str] = None                           # "pos_embed (1, 18, C) -> (1, 38, C)"

    def line(self, what: str) -> str:
        parts = [f"{what}: {self.loaded} tensors loaded from {self.source}"]
        if self.resampled:
            parts.append(f"resampled {self.resampled}")
        if self.derived:
            parts.append("initialised from the file's: " + ", ".join(self.derived))
        parts.append("not loaded (fresh init): " + (", ".join(self.reinitialised) or "none"))
        if self.dropped:
            parts.append("dropped from the file: " + ", ".join(self.dropped))
        return "; ".join(parts)


def _classifier_keys(model: nn.Module) -> List[str]:
    """The state_dict keys of the model's classifier head(s), as timm names them."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    own = model.state_dict()
    return [k for n in names for k in (f"{n}.weight", f"{n}.bias") if k in own]


def _map_distillation(model: nn.Module, state: Dict[str, torch.Tensor], report: LoadReport) -> Dict[str, torch.Tensor]:
    """Distilled <-> plain DeiT checkpoints (see the module docstring). Runs before timm's
    filter, which assumes the model's own number of prefix tokens in ``pos_embed``."""
    own = model.state_dict()
    state = dict(state)
    file_distilled, model_distilled = "dist_token" in state, "dist_token" in own
    if file_distilled == model_distilled or "pos_embed" not in state or "cls_token" not in state:
        return state
    pos = state["pos_embed"]
    if file_distilled:                       # distilled -> plain: the second token goes
        for k in ("dist_token", "head_dist.weight", "head_dist.bias"):
            if state.pop(k, None) is not None:
                report.dropped.append(k)
        state["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        report.dropped.append("pos_embed[:, 1] (the distillation token's slot)")
    else:                                    # plain -> distilled: the second token starts as the first
        state["dist_token"] = state["cls_token"].clone()
        state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        report.derived += ["dist_token <- cls_token", "pos_embed[:, 1] <- pos_embed[:, 0]"]
        for suffix in ("weight", "bias"):
            if f"head.{suffix}" in state and f"head_dist.{suffix}" in own:
                state[f"head_dist.{suffix}"] = state[f"head.{suffix}"].clone()
                report.derived.append(f"head_dist.{suffix} <- head.{suffix}")
    return state


def adapt_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Fit weights trained at another resolution: timm's per-architecture filter resamples a
    ViT's position embedding to the model's patch grid (prefix tokens kept as they are) and
    converts older key layouts (DeiT III's gamma_1 -> ls1.gamma, ...).

    Bicubic without antialiasing, as the DeiT reference's F.interpolate does for its 224->384
    fine-tuning. Architectures without a filter (convnets) need no adaptation.
    """
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    params = inspect.signature(filter_fn).parameters
    # The ViT filter renames the DeiT III reference's gamma_1/gamma_2 (models_v2.py) only when
    # asked, as timm's deit.py asks for every DeiT; timm-format keys have no 'gamma_'.
    extra = {"adapt_layer_scale": True} if "adapt_layer_scale" in params else {}
    if "interpolation" in params and "antialias" in params:
        extra.update(interpolation="bicubic", antialias=False)
    return filter_fn(state, model, **extra)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str,
                     allowed_missing: Tuple[str, ...] = ()) -> None:
    """Raise a CheckpointMismatchError listing missing, unexpected and wrongly shaped keys
    (``allowed_missing``: model keys the caller leaves at their initialisation on purpose)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(allowed_missing))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointMismatchError(f"{source} does not match {what}: " + "; ".join(parts))


def fit_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], source: str, what: str,
                   finetune: bool = False) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """``state`` made to fit ``model`` (see the module docstring), checked; and what was done."""
    report = LoadReport(source)
    if finetune:
        state = _map_distillation(model, state, report)
    before = state.get("pos_embed")
    state = adapt_state_dict(model, state)
    after = state.get("pos_embed")
    if before is not None and after is not None and before.shape != after.shape:
        report.resampled = f"pos_embed {tuple(before.shape)} -> {tuple(after.shape)}"
    allowed: Tuple[str, ...] = ()
    if finetune:
        own = model.state_dict()
        heads = _classifier_keys(model)
        # A head whose weight does not fit (another class count) or is absent is re-initialised
        # whole: its weight and bias together.
        stale = {k.rsplit(".", 1)[0] for k in heads if k not in state or state[k].shape != own[k].shape}
        fresh = sorted(k for k in heads if k.rsplit(".", 1)[0] in stale)
        for k in fresh:
            if k in state:
                file_shape = tuple(state.pop(k).shape)
                report.dropped.append(f"{k} {file_shape} (model {tuple(own[k].shape)})")
        report.derived = [d for d in report.derived if d.split(" <- ")[0] not in fresh]
        report.reinitialised = fresh
        allowed = tuple(fresh)
    check_state_dict(model, state, source, what, allowed_missing=allowed)
    report.loaded = len(state)
    return state, report


def load_weights(model: nn.Module, source: str, what: str, finetune: bool = False, key: Optional[str] = None,
                 model_name: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> LoadReport:
    """Load ``source`` (its entry ``key``) into ``model``: strictly, or with the fine-tuning
    rules when ``finetune``; ``log`` gets the one line of what was (not) loaded."""
    state = read_state_dict(source, key, model_name=model_name)
    state, report = fit_state_dict(model, state, source, what, finetune=finetune)
    model.load_state_dict(state, strict=not report.reinitialised)
    if log is not None:
        log(report.line(what))
    return report
