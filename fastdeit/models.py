"""Student and teacher construction through timm's registry (their weights: fastdeit.weights).

The student is a plain timm ``nn.Module``; wrapping (DeepSpeed, compile) happens in
``fastdeit.engine``. The teacher is never an ``nn.Module`` attribute of anything we hand to
DeepSpeed: ``FrozenTeacher`` holds it, so its weights can't be partitioned, saved or stepped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Literal, Optional, Union

import timm
import torch
from torch import nn

from fastdeit import precision
from fastdeit.errors import CheckpointMismatchError, ConfigError  # noqa: F401  (re-exported)
from fastdeit.weights import load_weights


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
    # Fine-tune from these weights: a file (.pth/.bin/.safetensors, DeiT main.py or timm
    # train.py checkpoint), a model folder or run dir, local-dir:, an http(s) URL, hf-hub:org/repo,
    # or 'timm' (timm's pretrained weights for `name`). Heads re-initialised when the class count
    # differs, distilled <-> plain tokens mapped, pos_embed resampled (fastdeit/weights.py).
    init_weights: Optional[str] = None
    init_weights_key: Optional[str] = None           # entry of a training checkpoint, as teacher.weights_key
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
    # Where the weights come from (fastdeit/weights.py): a local file (.pth/.bin, or
    # .safetensors), a model folder as launch/export.py writes it or a fastdeit run dir (timm's
    # local-dir layout; 'local-dir:FOLDER' too), an http(s)/file URL, 'hf-hub:org/repo', or
    # 'timm' (timm's default pretrained tag for `name`). Loaded strictly: the file's head must
    # have the dataset's class count. Required whenever distillation is on.
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


def build_student(cfg: ModelConfig, img_size: int, num_classes: int, dynamic_img_size: bool = False,
                  log: Optional[Callable[[str], None]] = None) -> nn.Module:
    """The student at its native `img_size`. `dynamic_img_size` (set when data.size_schedule
    trains at other sizes): timm's ViTs then keep the position-embedding parameter at the native
    grid and resample it (bicubic, antialiased) in every forward whose grid differs, so the
    parameters, the optimizer state and the checkpoints never change shape; at the native size
    the embedding is used as is, bit-identical to a static model. ``log`` gets the one line of
    what ``model.init_weights`` loaded and what it left at its initialisation."""
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
        load_weights(model, cfg.init_weights, what=f"model.init_weights for {cfg.name} ({num_classes} classes)",
                     finetune=True, key=cfg.init_weights_key, model_name=cfg.name, log=log)
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
    module = _create(cfg.name, num_classes=num_classes, **cfg.kwargs)
    # Strict: a teacher whose head did not come from the file would only add noise.
    load_weights(module, cfg.weights, what=f"teacher {cfg.name} ({num_classes} classes)",
                 key=cfg.weights_key, model_name=cfg.name)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    module = module.to(device=device, dtype=dtype, memory_format=memory_format)
    return FrozenTeacher(module, dtype, cfg.channels_last, compile_mode_for(cfg.compile, cfg.compile_mode, device))
