"""The DeepSpeed engine: its config dict derived from ours (one source of truth), and init.

Batch arithmetic: global = micro x accumulation x world. Any two of them fix the third; we
accept global plus at most one of micro/accumulation and refuse values that don't divide.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple

import torch
from torch import nn

from fastdeit.errors import ConfigError
from fastdeit.models import compile_kwargs, limit_recompiles


@dataclass
class EngineConfig:
    global_batch_size: int = 1024
    micro_batch_size: Optional[int] = None     # per rank per forward; None = derived
    grad_accum_steps: Optional[int] = None     # None = derived (1 when micro is also None)
    # 0-3. DeiT-Ti/S/B fit at stage 1; ZeRO-3 (parameters partitioned too, gathered per layer
    # in forward and backward) is for ViT-L/H with large micro batches: python -m
    # benchmarks.memory plan --config CONFIG says which stage fits (benchmarks/memplan.py).
    zero_stage: int = 1
    # auto: bf16 where the device computes it natively (CUDA Ampere+, CPUs with avx512_bf16 or
    # AMX that oneDNN may use), fp32 elsewhere; fastdeit.precision decides, build.py records it.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_clipping: float = 0.0             # DeiT clips nothing; DeepSpeed's default is 1.0
    # ZeRO-1/2: reduce gradients while the backward pass runs. Off by default: with it on,
    # DeepSpeed 0.19.8 calls torch.cuda.synchronize() after every backward (stage_1_and_2.py,
    # the ipg epilogue), a host sync per step that stops the host from queueing ahead. Whether
    # the overlap pays for that on a multi-GPU node is for the GPU step benchmark to say.
    overlap_comm: bool = False
    # Merged last into the DS config, e.g. {"zero_optimization": {"reduce_bucket_size": 5e8}}
    # puts back DeepSpeed's own bucket size instead of the one sized from the model.
    deepspeed: Dict[str, Any] = field(default_factory=dict)


def resolve_batch(cfg: EngineConfig, world_size: int) -> Tuple[int, int, int]:
    """(global, micro, accumulation) consistent with ``world_size``; a clear error otherwise."""
    g, m, a = cfg.global_batch_size, cfg.micro_batch_size, cfg.grad_accum_steps
    where = (f"engine.global_batch_size={g}, engine.micro_batch_size={m}, "
             f"engine.grad_accum_steps={a}, world size {world_size}")
    if g < 1 or (m is not None and m < 1) or (a is not None and a < 1):
        raise ConfigError(f"batch sizes must be positive: {where}")
    if m is not None and a is not None:
        if m * a * world_size != g:
            raise ConfigError(f"inconsistent batch sizes: micro x accum x world = "
                             f"{m * a * world_size} != global ({where})")
        return g, m, a
    if m is not None:
        if g % (m * world_size):
            raise ConfigError(f"global batch is not a multiple of micro x world = {m * world_size} ({where})")
        return g, m, g // (m * world_size)
    a = a or 1
    if g % (a * world_size):
        raise ConfigError(f"global batch is not a multiple of accum x world = {a * world_size} ({where})")
    return g, g // (a * world_size), a


# ZeRO-1/2 bucket sizing (elements). DeepSpeed's default, 5e8, is sized for billion-parameter
# models: with contiguous_gradients it allocates its reduce bucket up front (twice with
# overlap_comm, double buffering) in the gradient dtype (fp32 where it stages an fp32
# accumulator): 5e8 x 2 B = 1 GB of bf16 (2 GB with overlap) for DeiT-B, whose gradients are
# only 175 MB.
# Four buckets per backward: with engine.overlap_comm the reduction of each runs beside the
# rest of the backward; without it they only bound the buffer, at a few collectives a step.
# Below 2^24 elements (32 MB of bf16) NCCL's all-reduce runs well under its bus bandwidth,
# so smaller models get one bucket of at least that size (never more than the model).
BUCKETS_PER_MODEL = 4
MIN_BUCKET_ELEMENTS = 2**24
DEEPSPEED_DEFAULT_BUCKET = 500_000_000


def bucket_elements(num_params: int) -> int:
    """ZeRO reduce/allgather bucket size for a model of ``num_params`` parameters: a quarter of
    the model, at least min(model, 2^24), at most DeepSpeed's 5e8; even, as DeepSpeed wants
    (allgather_bucket_size must be a multiple of 2 for NCCL's 4-byte alignment of bf16)."""
    if num_params < 1:
        raise ValueError(f"num_params must be positive, got {num_params}")
    size = max(-(-num_params // BUCKETS_PER_MODEL), min(num_params, MIN_BUCKET_ELEMENTS))
    size = min(size, DEEPSPEED_DEFAULT_BUCKET)
    return size + size % 2


def stage3_settings(num_params: Optional[int]) -> Dict[str, Any]:
    """ZeRO-3's knobs, sized like the stage 1/2 buckets from the student's parameter count.

    reduce_bucket_size: the gradient reduce-scatter bucket (bucket_elements). The prefetch
    bucket (parameters all-gathered ahead of the layer that needs them) holds about one ViT
    block: a quarter of the model is ~6 ViT-L blocks, so a tenth of it, at least 2^22
    elements. stage3_param_persistence_threshold: parameters below it stay whole on every
    rank (biases, norms, LayerScale gammas: 1e5 is DeepSpeed's default, a few MB for ViT-H),
    which saves one all-gather per small tensor per layer. stage3_gather_16bit_weights_on_model_save
    stays off: exports read the fp32 partitions from the checkpoint (fastdeit.checkpoint).
    """
    out: Dict[str, Any] = {"stage3_param_persistence_threshold": 100_000,
                           "stage3_gather_16bit_weights_on_model_save": False}
    if num_params is not None:
        bucket = bucket_elements(num_params)
        out.update(reduce_bucket_size=bucket,
                   stage3_prefetch_bucket_size=max(min(num_params, 2**22), num_params // 10))
    return out


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_config(cfg: EngineConfig, world_size: int, num_params: Optional[int] = None) -> Dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` at ``world_size`` ranks.

    ``num_params`` (the student's parameter count) sizes ZeRO-1/2's reduce and allgather
    buckets (bucket_elements), and ZeRO-3's (stage3_settings); without it DeepSpeed's 5e8-element defaults apply. Anything in
    ``cfg.deepspeed`` is merged last and wins, buckets included.
    """
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    batch_keys = sorted(set(cfg.deepspeed) & set(BATCH_KEYS))
    if batch_keys:
        # The loaders are sized from resolve_batch before the engine exists: one source only.
        raise ConfigError(f"engine.deepspeed sets {', '.join(batch_keys)}: use engine.global_batch_size, "
                          "engine.micro_batch_size and engine.grad_accum_steps instead")
    g, m, a = resolve_batch(cfg, world_size)
    model_dtype(cfg)                # 'auto' must be resolved against the device by now
    ds: Dict[str, Any] = {
        "train_batch_size": g,
        "train_micro_batch_size_per_gpu": m,
        "gradient_accumulation_steps": a,
        "gradient_clipping": cfg.gradient_clipping,
        "bf16": {
            "enabled": cfg.precision == "bf16",
            # On by default in DeepSpeed (copied from fp16, where loss scaling needs it): a pass
            # over every gradient for inf/NaN whose verdict is read on the host, i.e. a device
            # sync inside every engine.step(). bf16 has fp32's range, and the trainer already
            # catches a non-finite loss on the device and stops before the next checkpoint.
            "check_grad_overflow": False,
        },
        "zero_optimization": {
            "stage": cfg.zero_stage,
            "overlap_comm": cfg.zero_stage > 0 and cfg.overlap_comm,
            "contiguous_gradients": cfg.zero_stage > 0,
            # ZeRO-1/2 compute the global gradient norm every step; only clipping uses it.
            # (Stage 0 has no such switch: DeepSpeed's bf16 stage-0 optimizer always checks; nor
            # has stage 3, which always computes it.)
            **({"compute_grad_norm": cfg.gradient_clipping > 0} if cfg.zero_stage in (1, 2) else {}),
            **({"reduce_bucket_size": bucket_elements(num_params),
                "allgather_bucket_size": bucket_elements(num_params)}
               if cfg.zero_stage in (1, 2) and num_params is not None else {}),
            **(stage3_settings(num_params) if cfg.zero_stage == 3 else {}),
        },
        # Our optimizers (torch fused AdamW, Apex) are standard Adam(W) maths; ZeRO partitions
        # their state the same way it does for its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,          # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        # A synchronised throughput timer would add a device sync per step.
        "timers": {"throughput": {"enabled": True, "synchronized": False}},
    }
    for key, value in cfg.deepspeed.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def model_dtype(cfg: EngineConfig) -> torch.dtype:
    """The compute dtype of a resolved config (build.py turns 'auto' into bf16 or fp32 first)."""
    if cfg.precision not in ("bf16", "fp32"):
        raise ValueError(f"engine.precision={cfg.precision!r} is not resolved: "
                         "fastdeit.precision.resolve it against the device first")
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def check_device(cfg: EngineConfig, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before anything is built, what would read the device every step on CUDA.

    bf16 at ZeRO stage 0: DeepSpeed 0.19.8 wraps a torch optimizer in FP16_UnfusedOptimizer
    (DeepSpeed's FusedAdam in FP16_Optimizer), whose overflow check and norm read one value
    per parameter tensor on the host each step (about 158 host syncs for DeiT-B); its
    BF16_Optimizer is reached only from stage 1. ZeRO-1 keeps the same full replicas of weights
    and gradients and partitions only the fp32 masters and moments: on one GPU it is stage 0's
    memory, on several less. CPU runs keep stage 0 (tests, debugging).
    """
    if device.type == "cuda" and cfg.zero_stage == 0 and dtype == torch.bfloat16:
        raise ConfigError("engine.zero_stage=0 with bf16 on CUDA syncs the host once per parameter tensor "
                          "every step (DeepSpeed's FP16_UnfusedOptimizer): use engine.zero_stage=1")


# torch.compile modes that capture CUDA graphs (cudagraph trees)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_cuda_graphs(compile_mode: Optional[str], zero_stage: int, accum: int) -> None:
    """CUDA graphs with gradient accumulation at ZeRO 0/1: the backward graph's outputs (the
    gradients) live in the graph's memory pool and ``param.grad`` keeps accumulating into them,
    so the next micro-batch's replay overwrites the gradients summed so far (torch's
    cudagraph_trees names this case). ZeRO-2 copies each gradient out into its partition
    during the backward, so it accumulates outside the pool. ``compile_mode`` is the configured
    mode whenever the student may be compiled (model.compile true or auto), so a CPU dry run of a
    GPU config refuses it too."""
    if compile_mode in CUDA_GRAPH_MODES and accum > 1 and zero_stage < 2:
        raise ConfigError(
            f"model.compile_mode={compile_mode} (CUDA graphs) with engine.grad_accum_steps={accum} at "
            f"engine.zero_stage={zero_stage} overwrites the accumulated gradients at every replay: use "
            "engine.zero_stage=2, grad_accum_steps=1 or compile_mode=default / max-autotune-no-cudagraphs")


def set_grad_checkpointing(model: nn.Module, enable: bool, name: str = "the student") -> None:
    """Activation checkpointing with timm's ``set_grad_checkpointing`` (model.grad_checkpointing).

    Why timm's and not DeepSpeed's (``deepspeed.checkpointing.checkpoint``): timm's wraps each
    block in ``torch.utils.checkpoint`` with ``use_reentrant=False``, which torch.compile traces
    into the graph (tests/test_grad_checkpointing.py compiles it with ``fullgraph=True``), keeps
    the RNG state for the recompute (drop path draws the same masks: identical losses and
    gradients), and leaves the forward's outputs alone, so the distillation head and
    ``eval_heads`` see the same module. DeepSpeed's is a reentrant autograd Function that
    dynamo refuses to trace ("function marked as skipped": a graph break around every
    block), would have to be called from inside timm's block loop (a change to the model),
    and what it adds (partitioning the checkpointed activations across model-parallel ranks,
    CPU offload of them) has nothing to partition in data-parallel ViT training.
    """
    if not enable:
        return
    if not hasattr(model, "set_grad_checkpointing"):
        raise ConfigError(f"model.grad_checkpointing=true: {name} ({type(model).__name__}) has no timm "
                         "set_grad_checkpointing")
    model.set_grad_checkpointing(True)


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: Dict[str, Any],
               compile_mode: Optional[str] = None, shapes: int = 1, grad_checkpointing: bool = False):
    """Wrap the student and its optimizer; returns the DeepSpeed engine.

    ``compile_mode`` (a torch.compile mode, None = eager) compiles the student here, the one
    place it is compiled, with DeepSpeed's ``engine.compile()`` rather than ``torch.compile``
    before wrapping. Both compile the same forward and backward (benchmarks/step.py measures
    the two side by side), but ``engine.compile()`` compiles the module in place
    (``nn.Module.compile``): ``engine.module`` stays the plain timm module, so DeepSpeed's
    checkpoints, the exports, the EMA and ``models.eval_heads`` all see its own parameter
    names, whereas a ``torch.compile`` wrapper would prefix every key with ``_orig_mod.`` and
    hide ``forward_features``/``head_dist`` behind the wrapper. A compiled run therefore
    resumes eager and the other way round. ``shapes``: the number of distinct training input
    shapes (sizes of data.size_schedule), each one static graph (models.limit_recompiles).
    ``grad_checkpointing``: activation checkpointing per block (set_grad_checkpointing).
    """
    import deepspeed

    set_grad_checkpointing(model, grad_checkpointing)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if hasattr(optimizer, "bind_layout"):
        # Layer-wise optimizers (fastdeit.lamb.Lamb) learn how ZeRO flattened and partitioned
        # the parameters they now step, to keep their per-parameter norms.
        optimizer.bind_layout(engine.optimizer, engine.module)
    if ds_config.get("bf16", {}).get("enabled"):
        # DeepSpeed casts parameters, not buffers: BatchNorm running stats stay fp32, which
        # CPU batch_norm rejects next to bf16 weights. One dtype for the whole module.
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(torch.bfloat16)
    if compile_mode is not None:
        limit_recompiles(shapes)
        engine.compile(compile_kwargs=compile_kwargs(compile_mode))
    return engine
