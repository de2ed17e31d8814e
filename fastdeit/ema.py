"""Model EMA: an fp32 exponential moving average of the weights the optimizer writes.

DeiT's reference keeps one (decay 0.99996 per optimizer step, timm's ModelEma) and saves it;
timm's train.py has ``--model-ema``. After optimizer step t (counted from 1), every
``ema.every`` steps::

    ema <- ema + (1 - d_t ** every) * (w_t - ema)          (one lerp; ema starts as w_0)

where w_t are the fp32 weights the optimizer just wrote and d_t is ``ema.decay``, or with
``ema.warmup`` timm's warmup of it (ModelEmaV3): d_t = min(decay, 1 - (1 + (t-1)/gamma)^-power),
0 at t = 1. Raising d to the power ``every`` keeps the averaging horizon in optimizer steps
whatever the update interval.

Where the average lives. Under bf16 the module holds bf16 copies; the weights the optimizer
just wrote are DeepSpeed's fp32 master weights, and under ZeRO-1/2 (DeepSpeedZeroOptimizer,
or BF16_Optimizer where ``data_types.grad_accum_dtype`` is fp32 at stage 1, which partitions the
same way) each rank holds only its partition of them.
The EMA is partitioned exactly like them: for every fragment of a parameter this rank's
partition holds (``param._hp_mapping``, the mapping DeepSpeed's own
``safe_get_full_fp32_param`` reads) it keeps an fp32 shadow fragment. An update is then one
fused ``torch._foreach_lerp_`` over this rank's fragments: on the device, no communication, no
host sync, 4/world bytes of memory and 12/world bytes of traffic per parameter. A full fp32
copy on every rank would cost world times that for the same numbers. Where every rank holds all
masters (bf16 at ZeRO stage 0, CPU only as it syncs the host on CUDA: DeepSpeed 0.19.8's
FP16_UnfusedOptimizer keeps one full fp32 copy per parameter, its FP16_Optimizer, with
DeepSpeed's FusedAdam, one flat copy per group; fp32 at stage 0: the parameters are the
masters) each rank averages the whole model, identically.

Under ZeRO-3 (DeepSpeedZeroOptimizer_Stage3) every parameter is cut into world equal pieces
and each rank's optimizer holds its pieces in fp32, back to back in one flat tensor per
sub-group; the EMA shadows those pieces (without their padding) the same way: views, one
lerp, no gather per step.

Full weights are assembled only where needed, at evaluation and in checkpoints: one
all-reduce of a flat fp32 buffer in which each rank fills the fragments it owns (each element
has exactly one owner, so the sum is exact). Checkpoints hold them by parameter name
next to the live model's buffers (``ema.pt``, see fastdeit.checkpoint), so they load on any
number of ranks and export as a plain timm state_dict. Buffers (BatchNorm statistics, none in a
ViT) are not averaged: the EMA model uses the live model's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from fastdeit.errors import CheckpointMismatchError, ConfigError


@dataclass
class EmaConfig:
    decay: float = 0.0            # per optimizer step; 0 = no EMA. The DeiT recipes use 0.99996
    every: int = 1                # update every N optimizer steps (with decay**N)
    warmup: bool = False          # timm's warmup of the decay (ModelEmaV3), see fastdeit/ema.py
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3   # timm: 2/3 for runs of a million steps and more, 3/4 for shorter


def check_config(cfg: EmaConfig) -> None:
    if not 0.0 <= cfg.decay < 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1) (0 = no EMA), got {cfg.decay}")
    if cfg.every < 1:
        raise ConfigError(f"ema.every must be at least 1, got {cfg.every}")
    if cfg.warmup_gamma <= 0 or cfg.warmup_power <= 0:
        raise ConfigError(f"ema.warmup_gamma and ema.warmup_power must be positive, "
                         f"got {cfg.warmup_gamma} and {cfg.warmup_power}")


def decay_at(cfg: EmaConfig, step: int) -> float:
    """The per-step decay at optimizer step ``step`` (1 = the first)."""
    if not cfg.warmup:
        return cfg.decay
    n = step - 1
    if n <= 0:
        return 0.0
    return min(cfg.decay, max(0.0, 1.0 - (1.0 + n / cfg.warmup_gamma) ** -cfg.warmup_power))


def update_weight(cfg: EmaConfig, step: int) -> Optional[float]:
    """The lerp weight of the update after optimizer step ``step``; None: no update then."""
    if step % cfg.every:
        return None
    return 1.0 - decay_at(cfg, step) ** cfg.every


def eval_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The module the EMA is evaluated in: a copy of the plain student, made before DeepSpeed
    takes over its parameters, in the dtype the live model is evaluated in."""
    return copy.deepcopy(model).to(dtype=dtype).eval().requires_grad_(False)


class ModelEma:
    """The EMA of a DeepSpeed engine's fp32 master weights, partitioned as they are."""

    def __init__(self, cfg: EmaConfig, engine, eval_module: nn.Module):
        check_config(cfg)
        self.cfg = cfg
        self.engine = engine
        self.eval_module = eval_module
        self._bind()
        self.weights: List[torch.Tensor] = [m.detach().clone() for m in self.masters]

    def _bind(self) -> None:
        """Find the fp32 master weights this rank holds (DeepSpeed re-links them on load)."""
        params = [p for _, p in self.engine.module.named_parameters()]
        self.zero3 = any(hasattr(p, "ds_id") for p in params)
        if self.zero3:
            self._bind_zero3(params)
            return
        # ZeRO-1/2 (DeepSpeedZeroOptimizer or BF16_Optimizer): each parameter's fragment in this
        # rank's partition.
        self.partitioned = any(hasattr(p, "_hp_mapping") for p in params)
        self.group = next((p._dp_group for p in params if hasattr(p, "_dp_group")), None)
        flat_masters = self._flat_masters()
        # (index into named_parameters, start inside the flattened parameter, numel)
        self.fragments: List[Tuple[int, int, int]] = []
        self.masters: List[torch.Tensor] = []
        self.untracked: List[int] = []   # parameters no optimizer steps (frozen): taken live
        for i, p in enumerate(params):
            if self.partitioned and hasattr(p, "_hp_mapping"):
                mapping = p._hp_mapping
                if mapping is None:                      # wholly in another rank's partition
                    continue
                address, master = mapping.lp_fragment_address, mapping.hp_fragment
                self.fragments.append((i, address.start, address.numel))
            elif id(p) in flat_masters:
                master = flat_masters[id(p)]
                self.fragments.append((i, 0, p.numel()))
            elif not p.requires_grad or self.partitioned:
                self.untracked.append(i)
                continue
            elif p.dtype == torch.float32:               # fp32 without ZeRO: the parameter is the master
                master = p.detach().view(-1)
                self.fragments.append((i, 0, p.numel()))
            else:
                raise RuntimeError(f"EMA: parameter {i} is {p.dtype} and DeepSpeed's optimizer "
                                   f"({type(self.engine.optimizer).__name__}) holds no fp32 master for it")
            self.masters.append(master)
        if hasattr(self, "weights") and len(self.weights) != len(self.masters):
            raise RuntimeError("EMA: DeepSpeed's partition layout changed under the EMA")

    def _bind_zero3(self, params: List[nn.Parameter]) -> None:
        """ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): every parameter is cut into world equal
        pieces of ``partition_numel()`` elements (the last padded), rank r holding elements
        [r * n, (r + 1) * n) of the flattened parameter; the optimizer keeps this rank's
        pieces, in fp32, back to back in one flat tensor per sub-group, and ``grad_position``
        says where each one starts (what its own ``get_local_fp32_param`` reads). The EMA keeps
        a shadow of each piece without its padding: views, no copy, no gather."""
        opt = self.engine.optimizer
        if not hasattr(opt, "grad_position") or not hasattr(opt, "fp32_partitioned_groups_flat"):
            raise RuntimeError(f"EMA: ZeRO-3 parameters, but DeepSpeed's optimizer {type(opt).__name__} "
                               "keeps no fp32 partitions the EMA can read")
        if getattr(opt, "offload_optimizer", False) or getattr(opt, "swap_optimizer", False):
            raise ConfigError("ema.decay with ZeRO-3 optimizer offload: the fp32 partitions live on the "
                             "host or NVMe and are swapped in per sub-group; switch the offload or the EMA off")
        self.partitioned = True
        self.group = params[0].ds_process_group if params else None
        self.fragments, self.masters, self.untracked = [], [], []
        for i, p in enumerate(params):
            if not p.requires_grad:
                self.untracked.append(i)
                continue
            group_idx, offset, piece = opt.grad_position[opt.get_param_id(p)]
            rank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0
            start = rank * piece
            numel = min(piece, p.ds_numel - start)
            if numel <= 0:                       # this rank's piece is all padding
                continue
            self.fragments.append((i, start, numel))
            self.masters.append(opt.fp32_partitioned_groups_flat[group_idx].narrow(0, offset, numel))
        if hasattr(self, "weights") and len(self.weights) != len(self.masters):
            raise RuntimeError("EMA: DeepSpeed's partition layout changed under the EMA")

    def _shapes(self) -> List[Tuple[str, torch.Size]]:
        """(name, full shape) per parameter; ZeRO-3 leaves the module's tensors empty."""
        return [(n, p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                for n, p in self.engine.module.named_parameters()]

    def _flat_masters(self) -> Dict[int, torch.Tensor]:
        """Full fp32 masters on every rank, by id of the low-precision parameter: DeepSpeed's
        FP16_UnfusedOptimizer (bf16 at ZeRO stage 0 with a torch optimizer) keeps one fp32
        clone per parameter, its FP16_Optimizer (with DeepSpeed's FusedAdam) one flat fp32
        buffer per group laid out as the flat buffer the parameters view."""
        opt = self.engine.optimizer
        out: Dict[int, torch.Tensor] = {}
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
                out.update({id(lp): hp.detach().view(-1) for lp, hp in zip(lp_group, hp_group)})
        elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups_flat"):
            for group, lp_flat, hp_flat in zip(opt.fp16_groups, opt.fp16_groups_flat, opt.fp32_groups_flat):
                for p in group:
                    offset = (p.data_ptr() - lp_flat.data_ptr()) // p.element_size()
                    out[id(p)] = hp_flat.narrow(0, offset, p.numel())
        return out

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step``: fold the masters just written into the average."""
        weight = update_weight(self.cfg, step)
        if weight is not None and self.weights:
            torch._foreach_lerp_(self.weights, self.masters, weight)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current master weights."""
        self._bind()
        torch._foreach_copy_(self.weights, self.masters)

    # ------------------------------------------------------------------ full weights

    @torch.no_grad()
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's state_dict with the EMA in place of the parameters (fp32, on the device;
        buffers as the live model has them). Collective: every rank calls it."""
        named = self._shapes()
        live = [p for _, p in self.engine.module.named_parameters()]
        offsets, total = [], 0
        for _, shape in named:
            offsets.append(total)
            total += shape.numel()
        device = self.weights[0].device if self.weights else live[0].device
        flat = torch.zeros(total, dtype=torch.float32, device=device)
        for (i, start, numel), w in zip(self.fragments, self.weights):
            flat.narrow(0, offsets[i] + start, numel).copy_(w)
        if self.partitioned and dist.is_initialized():
            dist.all_reduce(flat, group=self.group)
        if self.untracked:
            frozen = [live[i] for i in self.untracked]
            with _gathered(frozen, self.zero3):      # ZeRO-3: frozen parameters are partitioned too
                for i, p in zip(self.untracked, frozen):
                    flat.narrow(0, offsets[i], p.numel()).copy_(p.detach().reshape(-1))
        params = {name: flat.narrow(0, off, shape.numel()).view(shape) for (name, shape), off in zip(named, offsets)}
        state = {}
        for key, value in self.engine.module.state_dict().items():   # the module's key order
            if key in params:
                state[key] = params[key]
            else:
                state[key] = value.float() if value.is_floating_point() else value
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor], source: str) -> None:
        """Take this rank's fragments of saved EMA weights (any world size wrote them)."""
        self._bind()
        named = self._shapes()
        wrong = [n for n, shape in named if n not in state or tuple(state[n].shape) != tuple(shape)]
        if wrong:
            raise CheckpointMismatchError(f"{source}: EMA weights do not fit the model "
                                          f"(missing or other shape: {wrong[:5]})")
        for (i, start, numel), w in zip(self.fragments, self.weights):
            w.copy_(state[named[i][0]].reshape(-1).narrow(0, start, numel))

    def module(self) -> nn.Module:
        """The eval module holding the EMA weights. Collective: every rank calls it."""
        state = self.state_dict()
        with torch.no_grad():
            for name, p in self.eval_module.named_parameters():
                p.copy_(state[name])
            for mine, live in zip(self.eval_module.buffers(), self.engine.module.buffers()):
                mine.copy_(live)               # all buffers, the non-persistent ones too
        return self.eval_module


def _gathered(params: List[nn.Parameter], zero3: bool):
    """ZeRO-3: the whole parameters for the block's duration (collective); else nothing to do."""
    import contextlib

    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
