"""Student and teacher construction through timm's registry, and strict weight loading.

The student is a plain timm ``nn.Module``; wrapping (DeepSpeed, compile) happens in
``fastdeit.engine``. The teacher is never an ``nn.Module`` attribute of anything we hand to
DeepSpeed: ``FrozenTeacher`` holds it, so its weights can't be partitioned, saved or stepped.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Mapping, Optional, Union

import timm
import torch
from torch import nn

from fastdeit import precision
from fastdeit.errors import CheckpointMismatchError, ConfigError, WeightsError, one_line


# torch.compile modes. "reduce-overhead" and "max-autotune" add CUDA graphs (static input
# buffers); "max-autotune-no-cudagraphs" autotunes the kernels without them.
CompileMode = Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"]


@dataclass
class ModelConfig:
    name: str = "deit_base_distilled_patch16_224"   # any timm registry name
    num_classes: Optional[int] = None                # None: the training folder's class count
    drop_path: float = 0.1                           # stochastic depth rate
    # linear: 0 at the first block rising to drop_path at the last (timm, DeiT); uniform: every
    # block at drop_path (the DeiT III reference's vit_models, dpr = [drop_path] * depth)
    drop_path_mode: Literal["linear", "uniform"] = "linear"
    drop: float = 0.0                                # DeiT uses no dropout
    init_weights: Optional[str] = None               # start from these weights (file, URL, hf-hub:..., model folder)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra create_model args (tiny debug models)
    # torch.compile the student (once, in fastdeit.engine). auto: on CUDA (default to be
    # confirmed by the H200 record), off on CPU, where benchmarks/results measured no gain.
    compile: Union[bool, Literal["auto"]] = "auto"
    compile_mode: CompileMode = "default"
    # Activation checkpointing: keep only each block's input and recompute the block in the
    # backward (timm's set_grad_checkpointing, applied in fastdeit.engine.initialize). About a
    # third more compute for several times less activation memory (benchmarks/memplan.py).
    grad_checkpointing: bool = False


@dataclass
class TeacherConfig:
    name: str = "regnety_160"                        # any timm registry name
    # Where the weights come from: a local file (.pth, or .safetensors), a model folder as
    # launch/export.py writes it (timm's local-dir layout; 'local-dir:FOLDER' too), an http(s)
    # URL, 'hf-hub:org/repo', or 'timm' (timm's default pretrained tag for `name`). Required
    # whenever distillation is on.
    weights: Optional[str] = None
    # Which entry of a training checkpoint holds the weights: null takes the non-EMA ones
    # ('model' of DeiT's main.py, 'state_dict' of timm's train.py, 'module' of DeepSpeed, or a
    # bare state_dict); 'model_ema' (DeiT) or 'state_dict_ema' (timm) take the EMA weights.
    weights_key: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True                       # convnets run faster in NHWC on tensor cores
    # auto: bf16 where the device computes it natively, else fp32 (fastdeit.precision)
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    compile: Union[bool, Literal["auto"]] = "auto"   # torch.compile the teacher; auto as model.compile
    compile_mode: CompileMode = "default"


def compile_mode_for(flag: Union[bool, str], mode: str, device: torch.device) -> Optional[str]:
    """The torch.compile mode to use, or None for eager: ``auto`` compiles on CUDA only."""
    on = device.type == "cuda" if flag == "auto" else bool(flag)
    return mode if on else None


def compile_kwargs(mode: str) -> Dict[str, Any]:
    """torch.compile arguments for ``mode``. dynamic=False: one static graph per input shape.
    With dynamo's default (dynamic=None) the second shape is recompiled with dynamic sizes,
    but timm's PatchEmbed checks H and W against its grid, which pins them in the guards:
    a wasted compile at the second size of a schedule, then one static graph per size anyway."""
    return {"dynamic": False, **({} if mode == "default" else {"mode": mode})}


def limit_recompiles(shapes: int) -> None:
    """Dynamo's recompile limit set to the number of training input shapes (one graph per
    data.size_schedule size per compiled module; evaluation runs eager), and hitting it made
    an error instead of a silent fall-back to eager for the rest of the run. Set explicitly:
    dynamo's default is 8, and importing timm.optim (its Kron optimizer module) raises the
    limit to 10^6 as a side effect, which is what let more than 8 sizes compile before."""
    torch._dynamo.config.recompile_limit = max(1, int(shapes))
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def _create(name: str, **kwargs: Any) -> nn.Module:
    if name not in timm.list_models() and not timm.is_model(name):
        raise ConfigError(f"model '{name}' is not in timm's registry")
    return timm.create_model(name, **kwargs)


def is_distilled(model: nn.Module) -> bool:
    """DeiT's distilled variant: an extra distillation token read out by ``head_dist``."""
    return hasattr(model, "head_dist") and hasattr(model, "set_distilled_training")


def _check_kwargs(kwargs: Dict[str, Any], section: str) -> None:
    # timm drops None-valued kwargs silently; in YAML '{depth:2}' (no space) is the key
    # 'depth:2' with no value, which would then build the default-sized model unnoticed.
    empty = [k for k, v in kwargs.items() if v is None]
    if empty:
        raise ConfigError(f"{section}.kwargs: {empty} have no value (YAML needs a space after ':', "
                         "as in {depth: 2})")


def build_student(cfg: ModelConfig, img_size: int, num_classes: int, dynamic_img_size: bool = False) -> nn.Module:
    """The student at its native `img_size`. `dynamic_img_size` (set when data.size_schedule
    trains at other sizes): timm's ViTs then keep the position-embedding parameter at the native
    grid and resample it (bicubic, antialiased) in every forward whose grid differs, so the
    parameters, the optimizer state and the checkpoints never change shape; at the native size
    the embedding is used as is, bit-identical to a static model."""
    _check_kwargs(cfg.kwargs, "model")
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.num_classes} but the training folder has {num_classes} classes"
        )
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop, drop_path_rate=cfg.drop_path, **cfg.kwargs)
    dynamic = {"dynamic_img_size": True} if dynamic_img_size else {}
    try:
        model = _create(cfg.name, img_size=img_size, **dynamic, **kwargs)
    except TypeError as e:
        if "'dynamic_img_size'" in str(e):
            raise ConfigError(f"model.name={cfg.name} cannot resample its position embedding per forward "
                             "(timm's dynamic_img_size), which data.size_schedule needs") from e
        if "'img_size'" not in str(e):
            raise
        model = _create(cfg.name, **kwargs)  # convnets: resolution-agnostic
    if cfg.drop_path_mode == "uniform":
        _uniform_drop_path(model, cfg.drop_path, cfg.name)
    elif cfg.drop_path_mode != "linear":
        raise ConfigError(f"model.drop_path_mode must be linear or uniform, got {cfg.drop_path_mode!r}")
    if is_distilled(model):
        model.set_distilled_training(True)  # train: (cls, dist) logits; eval: their average
    if cfg.init_weights:
        load_weights(model, cfg.init_weights, what=f"model.init_weights for {cfg.name}", adapt=True)
    return model


def _uniform_drop_path(model: nn.Module, rate: float, name: str) -> None:
    """Every block's two residual branches dropped at `rate` (timm builds a linear ramp, with
    an Identity where the rate is 0, so the modules are replaced rather than re-parameterised)."""
    from timm.layers import DropPath

    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "drop_path1") and hasattr(b, "drop_path2") for b in blocks):
        raise ConfigError(f"model.drop_path_mode=uniform needs a timm ViT (blocks with drop_path1/2); "
                         f"{name} has none")
    for block in blocks:
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def size_multiple(model: nn.Module) -> Optional[int]:
    """The default rounding of data.size_schedule for this model: twice the patch size of a
    ViT (a multiple of the patch keeps every pixel inside a patch; twice it halves the number of
    distinct sizes); None for models without a patch embedding (the schedule's default)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return None
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    return 2 * math.lcm(*(int(p) for p in patch))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def eval_heads(model: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Logits per head for evaluation: {'cls'} or, for distilled DeiT, {'cls', 'dist', 'avg'}.

    The paper reports distilled models by the average of the two heads' softmax-free logits
    (timm's eval forward); we also report each head, as Table 3 of the paper does.
    """
    if not is_distilled(model):
        return {"cls": model(images)}
    tokens = model.forward_features(images)              # [B, 2 + patches, dim], normed
    cls = model.head(tokens[:, 0])
    dist = model.head_dist(tokens[:, 1])
    return {"cls": cls, "dist": dist, "avg": (cls + dist) / 2}


# --------------------------------------------------------------------------- weights


# Python objects a training checkpoint may hold besides tensors and plain containers (which
# torch's weights_only loading accepts): DeiT's main.py and timm's train.py both pickle their
# argparse.Namespace of command-line arguments next to the weights. Nothing else is allowed.
SAFE_GLOBALS = (argparse.Namespace,)
# Entries holding the (non-EMA) weights, tried in this order when no key is given: DeiT's
# main.py 'model', timm's train.py 'state_dict', DeepSpeed's model states 'module'.
WEIGHTS_KEYS = ("model", "state_dict", "module")


def _safetensors_file(source: str) -> Optional[str]:
    """The .safetensors file ``source`` names: the file itself, or a model folder's (timm's
    local-dir layout, which launch/export.py writes), also spelled ``local-dir:FOLDER``."""
    path = source[len("local-dir:"):] if source.startswith("local-dir:") else source
    if os.path.isdir(path):
        from fastdeit.export import WEIGHTS_FILE

        file = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(file):
            raise WeightsError(f"{path} is a folder without {WEIGHTS_FILE}; expected a model folder "
                               "(launch/export.py, timm's local-dir layout) or a weights file")
        return file
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise WeightsError(f"weights file {path} does not exist")
        return path
    return None


def _load(source: str) -> Any:
    """torch.load of a file or URL with weights_only=True and exactly SAFE_GLOBALS allowed;
    safetensors files and model folders through safetensors (no pickle at all)."""
    safe = _safetensors_file(source)
    if safe is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(safe, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{safe}: not a readable safetensors file ({one_line(e)})") from e
    url = source.startswith(("http://", "https://"))
    if not url and not os.path.isfile(source):
        raise WeightsError(f"weights file {source} does not exist")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            if url:
                return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = []
        if not url:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
            except Exception:   # not a zip checkpoint: nothing more to say than the error
                pass
        if unsafe:
            allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
            raise WeightsError(
                f"{source}: refusing to unpickle {', '.join(unsafe)} (only tensors, plain containers "
                f"and {allowed} are loaded, as arbitrary objects can run code); save its state_dict "
                "alone with torch.save(model.state_dict(), path)") from e
        raise WeightsError(f"{source}: not a readable PyTorch weights file ({one_line(e)})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:   # torn zip, truncated, download
        raise WeightsError(f"{source}: cannot read weights ({type(e).__name__}: {one_line(e)})") from e


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


def read_state_dict(source: str, key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A state_dict from a local file or an http(s) URL (cached by torch.hub): a bare one, or
    the weights inside a DeiT main.py / timm train.py / DeepSpeed checkpoint (see
    _select_state_dict). Every error is a WeightsError naming ``source``."""
    return _select_state_dict(_load(source), source, key)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """Raise a CheckpointMismatchError listing missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
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


def adapt_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Fit weights trained at another resolution: timm's per-architecture filter resamples a
    ViT's position embedding to the model's patch grid (prefix tokens kept as they are).

    Bicubic without antialiasing, as the DeiT reference's F.interpolate does for its 224->384
    fine-tuning. Architectures without a filter (convnets) need no adaptation.
    """
    import sys

    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model, interpolation="bicubic", antialias=False)
    except TypeError:   # filters of other families take no interpolation arguments
        return filter_fn(state, model)


def load_weights(model: nn.Module, source: str, what: str, adapt: bool = False,
                 key: Optional[str] = None) -> None:
    """Strictly load ``source`` (its entry ``key``, see read_state_dict) into ``model``;
    ``adapt`` first resamples position embeddings."""
    state = read_state_dict(source, key)
    if adapt:
        state = adapt_state_dict(model, state)
    check_state_dict(model, state, source, what)
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- teacher


class FrozenTeacher:
    """A frozen, eval-mode classifier that maps a (post-mixing) batch to float32 logits.

    Deliberately not an ``nn.Module``: nothing can register it as a submodule of the student,
    so DeepSpeed never sees, partitions, checkpoints or steps it. With ``compile_mode`` its
    forward is compiled here, once: ``self.module`` stays the plain module (FLOP counting
    copies it), the compiled callable beside it shares its weights.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, channels_last: bool,
                 compile_mode: Optional[str] = None):
        self.module = module.eval().requires_grad_(False)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.forward = torch.compile(self.module, **compile_kwargs(compile_mode)) if compile_mode else self.module

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(dtype=self.dtype, memory_format=self.memory_format)
        return self.forward(x).float()


def build_teacher(cfg: TeacherConfig, num_classes: int, device: torch.device) -> FrozenTeacher:
    if not cfg.weights:
        raise ConfigError(
            "distillation needs teacher.weights (a file, a URL, 'hf-hub:org/repo' or 'timm'); "
            "a randomly initialised teacher would only add noise"
        )
    _check_kwargs(cfg.kwargs, "teacher")
    dtype = precision.resolve(cfg.dtype, device, "teacher.dtype").dtype
    hub = cfg.weights == "timm" or cfg.weights.startswith("hf-hub:")
    if hub and cfg.weights_key is not None:
        raise ConfigError(f"teacher.weights_key={cfg.weights_key!r} picks an entry of a checkpoint file or URL; "
                          f"teacher.weights={cfg.weights!r} are timm's pretrained weights")
    if hub:
        overlay = {"hf_hub_id": cfg.weights[len("hf-hub:"):]} if cfg.weights.startswith("hf-hub:") else None
        module = _create(cfg.name, pretrained=True, num_classes=num_classes,
                         pretrained_cfg_overlay=overlay, **cfg.kwargs)
    else:
        module = _create(cfg.name, num_classes=num_classes, **cfg.kwargs)
        load_weights(module, cfg.weights, what=f"teacher {cfg.name} ({num_classes} classes)",
                     key=cfg.weights_key)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    module = module.to(device=device, dtype=dtype, memory_format=memory_format)
    return FrozenTeacher(module, dtype, cfg.channels_last, compile_mode_for(cfg.compile, cfg.compile_mode, device))
