"""The memory plan before the job: will this config fit, at which ZeRO stage, with or without
activation checkpointing, and at which micro batch?

    python -m benchmarks.memory plan --config configs/deit3_h.yaml --gpu-mem 80GB --gpus 8

Per GPU, for ZeRO stages 0-3 and model.grad_checkpointing off/on, in the run's precision
(engine.precision; ``auto`` is taken as bf16, what every GPU this plan is for computes):

* model states, by ZeRO's partitioning over the ``--gpus`` data-parallel ranks (Rajbhandari et
  al., "ZeRO", SC 2020, section 5; P = parameters, N = ranks, k = 2 bytes in bf16):
  working parameters kP (stage 3: kP/N, plus the layers being gathered), gradients kP (stage
  2/3: kP/N) plus the reduce bucket, optimizer state 12P (fp32 master, AdamW's or LAMB's two
  moments; stages 1-3: 12P/N) and, in bf16 at stages 1-3, the fp32 gradient partition 4P/N
  DeepSpeed steps from. In fp32 the parameters are the masters: 4P + 4P + 8P.
* the EMA (ema.decay > 0): its fp32 shadow, partitioned like the masters (4P/N; 4P at stage
  0), and the full-size evaluation copy in the run's precision (kP) (fastdeit/ema.py).
* activations: the bytes autograd saves for the backward of one image, counted once with
  ``torch.autograd.graph.saved_tensors_hooks`` on the real model (timm, the config's model,
  classes and training size) on the meta device: no GPU, no memory, no FLOPs. Storages are
  counted once (views share them), parameters not at all. The meta device has no fused
  attention kernel, so scaled_dot_product_attention is replaced during the count by a
  stand-in that saves what CUDA's flash / memory-efficient kernels (and the CPU's flash
  kernel) save: q, k, v, the output and the fp32 log-sum-exp, not the N x N matrix. With
  checkpointing (timm's set_grad_checkpointing, one checkpoint per block) autograd keeps the
  tensors saved outside the blocks and each block's input, and the backward recomputes one
  block at a time: plus the largest block's own saved tensors. The backward's own working set
  (activation gradients) is taken as one more largest block.
* the teacher (distill.type != none): its weights in teacher.dtype, and the largest
  input + output of any of its layers per image (a no-grad forward keeps nothing else).
* DALI: nvJPEG's preallocated device buffers (fastdeit.data.loading.pipeline.preallocated_bytes, one
  per DALI thread) and the prefetch queue of output batches (data.prefetch batches of
  3 x S x S fp32 per image, on the GPU).
* a fixed reserve for the CUDA context, NCCL's buffers and the allocator's fragmentation
  (``--reserve``, 3 GiB by default: a CUDA 12 context is ~0.5 GiB, NCCL's channels up to
  ~1 GiB on 8 GPUs, the rest is margin for the caching allocator).

The largest micro batch that fits is (GPU memory - everything above but activations) /
(activations per image). What the plan would use: the lowest ZeRO stage >= 1 (stage 0 in bf16
is refused on CUDA, fastdeit.engine.check_device) that fits the config's whole per-GPU batch
(global / GPUs, no accumulation) without checkpointing; failing that, the smallest
accumulation that fits without checkpointing as long as the micro batch stays >= 32 (enough
work per layer to keep a GPU busy); failing that, checkpointing (a third more compute) with the
largest micro batch. LAMB (fastdeit.lamb) is refused at stage 3 (fastdeit.optim.check_zero_stage).
The H200 suite checks the prediction against torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

GIB = 2**30
MIN_GOOD_MICRO = 32        # below this per-GPU batch a ViT-L/H layer leaves an H100/H200 idle
DEFAULT_RESERVE = 3 * GIB
STAGE3_PERSISTENCE = 100_000   # fastdeit.engine.stage3_settings' stage3_param_persistence_threshold


def parse_bytes(text: str) -> int:
    """'80GB' / '141GiB' / '80' (GiB) -> bytes. GPU makers' 'GB' on memory sizes are GiB in
    practice (an 80 GB H100 reports 79.6 GiB to torch), so GB and GiB are both taken as 2^30."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|G|MB|MiB|M)?\s*", text, flags=re.I)
    if not m:
        raise ValueError(f"--gpu-mem {text!r}: expected a size like 80GB")
    scale = {"m": 2**20, "mb": 2**20, "mib": 2**20}.get((m.group(2) or "g").lower(), GIB)
    return int(float(m.group(1)) * scale)


# --------------------------------------------------------------------------- counting


@dataclass
class Saved:
    """Bytes autograd keeps for one forward's backward, by where they were saved."""

    outside: int = 0                                        # outside the blocks
    blocks: List[int] = field(default_factory=list)         # per block, everything it saved
    inputs: int = 0                                         # the blocks' inputs (kept by checkpointing)

    def total(self, checkpointing: bool) -> int:
        """What autograd holds at the end of the forward, plus the backward's recompute (with
        checkpointing) or its activation gradients (without): one more largest block."""
        biggest = max(self.blocks, default=0)
        if checkpointing:
            return self.outside + self.inputs + biggest + biggest
        return self.outside + sum(self.blocks) + biggest

    def at_end_of_forward(self, checkpointing: bool) -> int:
        """What autograd holds once the forward is done (what saved_tensors_hooks see)."""
        return self.outside + (self.inputs if checkpointing else sum(self.blocks))


def _flash_like_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """A scaled_dot_product_attention for the meta device that saves what the fused kernels
    do: q, k, v, out and the fp32 log-sum-exp [..., L]."""
    return _FlashLike.apply(q, k, v)


class _FlashLike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        # [B, L, H, D] memory seen as [B, H, L, D], as the fused kernels return it: the
        # caller's transpose(1, 2).reshape(B, L, H * D) is then a view, not a copy.
        out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype,
                          device=q.device).transpose(1, 2)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):          # never run: the plan does no backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _fused_attention_stand_in(device: torch.device):
    if device.type != "meta":
        yield
        return
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def blocks_of(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks timm's set_grad_checkpointing checkpoints (ViTs: ``model.blocks``)."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if blocks is not None else []


def count_saved(model: nn.Module, images: torch.Tensor) -> Saved:
    """One training forward of ``model`` on ``images`` with saved_tensors_hooks: the bytes
    saved for the backward, by storage, parameters excluded, attributed to the block running,
    and the blocks' inputs (what checkpointing keeps instead of the blocks' tensors)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, outside_keys, inputs = set(), set(), {}
    out = Saved(blocks=[0] * len(blocks_of(model)))
    current = [None]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params and key not in seen:
            seen.add(key)
            if current[0] is None:
                out.outside += storage.nbytes()
                outside_keys.add(key)
            else:
                out.blocks[current[0]] += storage.nbytes()
        return t

    def enter(i):
        def hook(module, args):
            x = args[0]
            inputs[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
            current[0] = i
        return hook

    def leave(module, args, output):
        current[0] = None

    handles = []
    for i, block in enumerate(blocks_of(model)):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(leave))
    was = getattr(model, "grad_checkpointing", False)
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)   # count every block's tensors; checkpointing's sum is derived
    try:
        model.train()
        with torch.enable_grad(), _fused_attention_stand_in(images.device), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(images)
    finally:
        for h in handles:
            h.remove()
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(was)
    out.inputs = sum(n for key, n in inputs.items() if key not in outside_keys)
    return out


def teacher_bytes_per_image(teacher: nn.Module, images: torch.Tensor) -> int:
    """The largest input + output of any leaf module in a no-grad forward, per image."""
    biggest = [0]

    def hook(module, args, output):
        ins = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        outs = output.numel() * output.element_size() if isinstance(output, torch.Tensor) else 0
        biggest[0] = max(biggest[0], ins + outs)

    handles = [m.register_forward_hook(hook) for m in teacher.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            teacher.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return -(-biggest[0] // images.shape[0])


# --------------------------------------------------------------------------- ZeRO arithmetic


@dataclass
class States:
    """Per-GPU bytes of the model states at one ZeRO stage."""

    params: int
    grads: int
    optimizer: int
    ema: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema


def zero_states(num_params: int, stage: int, world: int, bf16: bool, ema: bool = False,
                reduce_bucket: int = 0, gathered: int = 0, persistent: int = 0, overlap_comm: bool = False) -> States:
    """ZeRO's per-GPU model states (bytes) for ``num_params`` trainable parameters.

    bf16: parameters and gradients 2 bytes, fp32 master + two moments 12 bytes, and from
    stage 1 the fp32 gradient partition (4 bytes) DeepSpeed steps from. fp32: 4 + 4 + 8 (the
    parameters are the masters). ``reduce_bucket`` (elements, stages 1-3; twice with
    overlap_comm), ``gathered`` (elements ZeRO-3 holds whole while a layer runs: the prefetch
    bucket and the block in use) and ``persistent`` (elements of the parameters too small to
    partition at stage 3) are DeepSpeed's buffers.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}")
    P, N = num_params, world
    k = 2 if bf16 else 4
    part = lambda n: -(-n // N)                               # noqa: E731  (ceil: padded partitions)
    opt = 12 if bf16 else 8
    params = k * P if stage < 3 else k * (part(P) + gathered + persistent)
    buckets = (2 if overlap_comm else 1) * k * reduce_bucket if stage > 0 else 0
    grads = (k * P if stage < 2 else k * part(P)) + buckets
    optimizer = opt * P if stage == 0 else opt * part(P)
    if bf16 and stage > 0:
        optimizer += 4 * part(P)                               # the fp32 gradient partition
    ema_bytes = 0
    if ema:
        ema_bytes = (4 * P if stage == 0 else 4 * part(P)) + k * P   # shadow + full eval copy
    return States(params, grads, optimizer, ema_bytes)


# --------------------------------------------------------------------------- the plan


@dataclass
class ModelFacts:
    name: str
    num_params: int
    largest_block: int            # parameters of the largest block (ZeRO-3 gathers one at a time)
    persistent: int               # parameters in tensors below ZeRO-3's persistence threshold
    train_size: int
    saved: Saved                  # per image, in the run's precision
    teacher_params: int = 0
    teacher_bytes: int = 0        # teacher weights' bytes
    teacher_act: int = 0          # teacher working set per image


def model_facts(cfg, num_classes: int = 1000, device: str = "meta") -> ModelFacts:
    """Count the config's student (and teacher) at the largest training size, on ``device``."""
    from fastdeit.data.loading.schedule import size_schedule
    from fastdeit.models import build_student, size_multiple

    bf16 = cfg.engine.precision != "fp32"
    dtype = torch.bfloat16 if bf16 else torch.float32
    dev = torch.device(device)
    model_cfg = dataclasses.replace(cfg.model, init_weights=None)
    with dev:
        model = build_student(model_cfg, cfg.data.img_size, num_classes,
                              dynamic_img_size=cfg.data.size_schedule is not None).to(dtype)
    sizes = size_schedule(cfg.data, size_multiple(model)).sizes(cfg.trainer.epochs)
    size = max(sizes)
    images = torch.zeros(1, 3, size, size, dtype=dtype, device=dev)
    saved = count_saved(model, images)
    num = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in blocks_of(model)]
    persistent = sum(p.numel() for p in model.parameters() if p.numel() < STAGE3_PERSISTENCE)
    facts = ModelFacts(cfg.model.name, num, max(blocks, default=num), persistent, size, saved)
    if cfg.distill.type != "none":
        import timm

        tdtype = torch.float32 if cfg.teacher.dtype == "fp32" else torch.bfloat16
        with dev:
            teacher = timm.create_model(cfg.teacher.name, num_classes=num_classes, **cfg.teacher.kwargs).to(tdtype)
        facts.teacher_params = sum(p.numel() for p in teacher.parameters())
        facts.teacher_bytes = facts.teacher_params * (4 if tdtype == torch.float32 else 2)
        facts.teacher_act = teacher_bytes_per_image(teacher, images.to(tdtype))
    return facts


@dataclass
class Row:
    stage: int
    checkpointing: bool
    states: States
    teacher: int
    dali: int
    reserve: int
    act_per_image: int
    max_micro: int
    micro: int                    # the largest divisor of the per-GPU batch that fits (0: none)
    accum: int
    refused: Optional[str] = None

    @property
    def fixed(self) -> int:
        return self.states.total + self.teacher + self.dali + self.reserve

    def at(self, micro: int) -> int:
        return self.fixed + micro * self.act_per_image


def dali_bytes(cfg, micro: int, cores_per_gpu: int, size: int) -> int:
    """nvJPEG's preallocation plus the prefetch queue's output batches, per GPU."""
    from fastdeit.data.loading.pipeline import preallocated_bytes
    from fastdeit.threads import thread_budget

    if cfg.data.device == "cpu":
        return 0
    threads = cfg.data.num_threads or thread_budget(cores_per_gpu, True, "cuda").dali
    return preallocated_bytes(cfg.data, threads)[0] + cfg.data.prefetch * micro * 3 * size * size * 4


def plan(cfg, facts: ModelFacts, gpu_mem: int, gpus: int, cores_per_gpu: int = 12,
         reserve: int = DEFAULT_RESERVE) -> List[Row]:
    from fastdeit.engine import bucket_elements, stage3_settings

    bf16 = cfg.engine.precision != "fp32"
    per_gpu = cfg.engine.global_batch_size // gpus
    if per_gpu * gpus != cfg.engine.global_batch_size:
        raise ValueError(f"engine.global_batch_size={cfg.engine.global_batch_size} does not split over {gpus} GPUs")
    rows = []
    for stage in (0, 1, 2, 3):
        s3 = stage3_settings(facts.num_params)
        states = zero_states(
            facts.num_params, stage, gpus, bf16, ema=cfg.ema.decay > 0,
            reduce_bucket=bucket_elements(facts.num_params) if stage else 0,
            gathered=s3["stage3_prefetch_bucket_size"] + facts.largest_block if stage == 3 else 0,
            persistent=facts.persistent if stage == 3 else 0, overlap_comm=cfg.engine.overlap_comm)
        refused = None
        if stage == 0 and bf16:
            refused = "bf16 at stage 0 syncs the host per tensor on CUDA (engine.check_device)"
        elif stage == 3 and cfg.optim.name in ("lamb", "apex_fused_lamb"):
            refused = f"optim.name={cfg.optim.name} is refused at stage 3 (optim.check_zero_stage)"
        for ckpt in (False, True):
            act = facts.saved.total(ckpt) + facts.teacher_act
            fixed_no_dali = states.total + facts.teacher_bytes + reserve
            # DALI's queue grows with the micro batch: fold it into the per-image cost.
            dali0 = dali_bytes(cfg, 0, cores_per_gpu, facts.train_size)
            dali_img = dali_bytes(cfg, 1, cores_per_gpu, facts.train_size) - dali0
            room = gpu_mem - fixed_no_dali - dali0
            max_micro = max(room // (act + dali_img), 0)
            micro = max((d for d in range(1, per_gpu + 1) if per_gpu % d == 0 and d <= max_micro), default=0)
            rows.append(Row(stage, ckpt, states, facts.teacher_bytes, dali_bytes(cfg, micro, cores_per_gpu, facts.train_size),
                            reserve, act, int(max_micro), micro, per_gpu // micro if micro else 0, refused))
    return rows


def choose(rows: List[Row], per_gpu: int) -> Optional[Row]:
    """The settings the plan would use (see the module docstring for the rule)."""
    ok = [r for r in rows if r.refused is None and r.micro > 0 and r.stage > 0]
    if not ok:
        return None
    whole = [r for r in ok if not r.checkpointing and r.micro == per_gpu]
    if whole:
        return min(whole, key=lambda r: r.stage)
    plain = [r for r in ok if not r.checkpointing and r.micro >= min(MIN_GOOD_MICRO, per_gpu)]
    if plain:
        return min(plain, key=lambda r: (r.accum, r.stage))
    return min([r for r in ok if r.checkpointing] or ok, key=lambda r: (r.accum, r.stage))


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def report(cfg, facts: ModelFacts, rows: List[Row], gpu_mem: int, gpus: int) -> Tuple[str, Optional[Row]]:
    per_gpu = cfg.engine.global_batch_size // gpus
    prec = "fp32" if cfg.engine.precision == "fp32" else "bf16"
    lines = [
        f"memory plan: {facts.name}, {facts.num_params:,} parameters, training at {facts.train_size} px, {prec}, "
        f"{gpus} GPUs x {gib(gpu_mem)} GiB, global batch {cfg.engine.global_batch_size} ({per_gpu} per GPU)",
        f"activations per image (saved for the backward, counted on the meta device): "
        f"{facts.saved.total(False) / 2**20:.1f} MiB, with checkpointing {facts.saved.total(True) / 2**20:.1f} MiB"
        + (f"; teacher {cfg.teacher.name}: {facts.teacher_params:,} parameters, {facts.teacher_act / 2**20:.1f} MiB "
           f"per image in its forward" if facts.teacher_params else ""),
        "",
        "stage ckpt | params  grads  optim    ema teacher   dali reserve | act/img MiB | max micro | "
        "micro x accum | GiB at micro",
    ]
    for r in rows:
        s = r.states
        head = (f"{r.stage:>5} {'on' if r.checkpointing else 'off':>4} | {gib(s.params):>6} {gib(s.grads):>6} "
                f"{gib(s.optimizer):>6} {gib(s.ema):>6} {gib(r.teacher):>7} {gib(r.dali):>6} {gib(r.reserve):>7} | "
                f"{r.act_per_image / 2**20:>11.1f} | ")
        if r.refused:
            lines.append(head + f"refused: {r.refused}")
        elif r.micro == 0:
            lines.append(head + f"{r.max_micro:>9} | does not fit")
        else:
            lines.append(head + f"{r.max_micro:>9} | {r.micro:>5} x {r.accum:<5} | {gib(r.at(r.micro)):>6}")
    best = choose(rows, per_gpu)
    lines.append("")
    if best is None:
        lines.append("would use: nothing fits; more GPUs or a smaller model")
    else:
        lines.append(f"would use: engine.zero_stage={best.stage} model.grad_checkpointing="
                     f"{'true' if best.checkpointing else 'false'} engine.micro_batch_size={best.micro} "
                     f"(grad_accum_steps {best.accum}): {gib(best.at(best.micro))} of {gib(gpu_mem)} GiB")
    return "\n".join(lines), best


def run(args) -> Dict[str, Any]:
    """``python -m benchmarks.memory plan``: print the plan, return it as a record."""
    from fastdeit.config import load_config

    cfg = load_config(args.config, args.overrides)
    gpu_mem = parse_bytes(args.gpu_mem)
    facts = model_facts(cfg, args.classes)
    rows = plan(cfg, facts, gpu_mem, args.gpus, args.cores_per_gpu, int(args.reserve_gib * GIB))
    text, best = report(cfg, facts, rows, gpu_mem, args.gpus)
    print(text, flush=True)
    return {"what": "plan", "config": args.config, "gpu_mem_bytes": gpu_mem, "gpus": args.gpus,
            "num_params": facts.num_params, "train_size": facts.train_size,
            "act_bytes_per_image": {"off": facts.saved.total(False), "on": facts.saved.total(True)},
            "rows": [{"stage": r.stage, "checkpointing": r.checkpointing, **dataclasses.asdict(r.states),
                      "teacher": r.teacher, "dali": r.dali, "reserve": r.reserve, "act_per_image": r.act_per_image,
                      "max_micro": r.max_micro, "micro": r.micro, "accum": r.accum, "refused": r.refused}
                     for r in rows],
            "choice": None if best is None else {"zero_stage": best.stage, "grad_checkpointing": best.checkpointing,
                                                 "micro_batch_size": best.micro, "grad_accum_steps": best.accum},
            "summary": text.splitlines()[-1]}


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a fastdeit YAML config")
    p.add_argument("--gpu-mem", required=True, help="memory per GPU, e.g. 80GB or 141GB")
    p.add_argument("--gpus", type=int, required=True, help="data-parallel GPUs (all nodes)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--cores-per-gpu", type=int, default=12, help="CPU cores per GPU (sizes DALI's threads)")
    p.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE / GIB,
                   help="CUDA context, NCCL buffers, allocator fragmentation")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
