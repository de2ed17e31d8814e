"""LAMB (You et al. 2020) that stays LAMB under DeepSpeed's flat, partitioned optimizer state.

DeiT III trains with LAMB (the reference's ``--opt fusedlamb``: Apex's FusedLAMB through timm's
create_optimizer). LAMB scales each parameter tensor's Adam-style update by a trust ratio
||w|| / ||update|| computed over that tensor: a layer-wise quantity. DeepSpeed's ZeRO stage 1/2
(and its BF16_Optimizer, which it uses at stage 1 with ``data_types.grad_accum_dtype: fp32``)
flatten each parameter group into one buffer, cut it into equal partitions across the
data-parallel ranks, and hand the wrapped optimizer one flat fp32 tensor per group per rank.
(At stage 0 in bf16 DeepSpeed 0.19.8 uses FP16_UnfusedOptimizer instead, one full fp32 copy
per parameter: nothing flattened, and refused on CUDA for its host syncs, see
fastdeit.engine.check_device.) Any per-tensor LAMB (Apex FusedLAMB, timm's Lamb, DeepSpeed's
FusedLamb) then computes one trust ratio per *partition*, mixing dozens of layers and cutting
some in two: not the optimizer the recipe was tuned with (DeepSpeed issues #88 and #490; its
own FusedLamb is also refused by the engine without fp16 dynamic loss scaling).

This implementation has Apex FusedLAMB's and timm's maths (bias-corrected Adam moments with
grad averaging, decoupled weight decay inside the update, trust ratio only where weight decay
is non-zero, 1 when either norm is 0, gradients first clipped to a global norm of
``max_grad_norm``), and computes the norms per *original* parameter: after
``deepspeed.initialize``, ``bind_layout(engine.optimizer, model)`` reads where DeepSpeed placed each
parameter in the flat buffer (the model's parameters are views into it), splits this rank's
partition into per-parameter segments, and each step all-reduces the per-parameter partial
sums of squares (two vectors of #params floats, plus the global gradient norm) over the
data-parallel group. Unbound (DeepSpeed stepping the model's own tensors, or no DeepSpeed),
every tensor is its own segment and nothing is communicated.

Clipping is always this optimizer's own (``engine.gradient_clipping`` must stay 0 with LAMB).
DeepSpeed's clipping at ZeRO 1/2 would cost 4 host syncs per step (per group, a blocking
``torch.tensor(-1.0, device=...)`` in its inf/NaN masking and a ``bool()`` of the norm's
validity). ZeRO 1/2 hand the optimizer one parameter group per ``step()`` call, each group's
fp32 gradient partition made just before its call, so the global norm over all groups is
known only once the last group arrives: the earlier groups' steps are deferred to that call
(their gradient partitions kept alive until then, the small no-decay group's in practice),
which then clips by the norm of all of them, steps every group with one all-reduce of the
norms, and writes the deferred groups' fp32 partitions into their bf16 partitions, as
DeepSpeed did after each of their calls, before its all-gather.

The work is a dozen whole-partition elementwise kernels per group plus two segment
reductions: with ZeRO the partition is one flat tensor, so this is as batched as Apex's
multi-tensor kernels, with more passes over memory (no kernel fusion). No host
synchronisation: the step count (``capturable``: a device tensor, as torch keeps it for its
fused and capturable optimizers), the bias corrections, the clip factor and the trust ratios
stay on the device.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist

from fastdeit.errors import ConfigError


class Lamb(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, max_grad_norm: Optional[float] = 1.0,
                 grad_averaging: bool = True, always_adapt: bool = False):
        if not 0.0 <= eps:
            raise ConfigError(f"LAMB eps must be >= 0, got {eps}")
        # capturable: torch's Optimizer.load_state_dict then puts "step" back on the parameter's
        # device in fp32 instead of leaving it where the checkpoint was loaded (the CPU).
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, always_adapt=always_adapt, capturable=True)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        # Per stepped tensor: (lengths int64 [s], ids int64 [s]) of its segments; ids index the
        # original parameters (num_params: padding). None: each tensor is one parameter.
        self._layout: Optional[Dict[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None
        self._num_params = 0
        # Unbound: each tensor's one segment, made on its device once (no per-step copies)
        self._own: Dict[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._group = None       # the data-parallel process group of the partitions
        # ZeRO 1/2 (one group per step() call): every group's partition tensor, the calls
        # deferred so far, and each stepped tensor's bf16 partition (the module's weights) to
        # refresh after them. Tensors, not the group dicts: loading a checkpoint replaces the
        # dicts (torch's Optimizer.load_state_dict), never the partitions they hold.
        self._all_params: Optional[list] = None
        self._deferred: list = []
        self._seen: set = set()
        self._bf16: Dict[torch.Tensor, torch.Tensor] = {}

    # ------------------------------------------------------------------ ZeRO layout

    def bind_layout(self, wrapper, model: torch.nn.Module) -> None:
        """Learn DeepSpeed's flat layout from its optimizer wrapper (engine.optimizer).

        ZeRO 1/2 (DeepSpeedZeroOptimizer) and the bf16 optimizer (BF16_Optimizer) both keep,
        per group, the parameters in flat order, the flat buffer they are views into, and its
        per-rank partitions; this rank's partition is what our param group now holds.

        ZeRO 1/2 also step one parameter group at a time: those calls are deferred until the
        last group's (see the module docstring), so clipping sees every group's gradients.
        DeepSpeed's own clipping must be off: it would clip twice, with host syncs.
        """
        clip = getattr(wrapper, "clip_grad", 0.0) or 0.0
        if clip > 0:
            raise ConfigError(f"LAMB clips gradients itself (optim.lamb_max_grad_norm={self.max_grad_norm}), "
                              f"without host syncs: set engine.gradient_clipping=0 (it is {clip})")
        names = {"bit16_groups": ("bit16_groups_flat", "parallel_partitioned_bit16_groups"),
                 "bf16_groups": ("bf16_groups_flat", "bf16_partitioned_groups")}
        found = next((k for k in names if hasattr(wrapper, k)), None)
        mine = [p for g in self.param_groups for p in g["params"]]
        if found is None:
            # DeepSpeed steps the model's own tensors (fp32, stage 0) or one fp32 copy per
            # parameter (its unfused bf16/fp16 optimizer): per-tensor norms are the right ones.
            shapes = sorted(tuple(p.shape) for p in model.parameters() if p.requires_grad)
            if sorted(tuple(p.shape) for p in mine) != shapes:
                raise RuntimeError(
                    f"LAMB cannot read the parameter layout of {type(wrapper).__name__}: its trust "
                    "ratios would be computed over flattened partitions instead of layers")
            self._layout = None
            return
        flat_name, parts_name = names[found]
        groups, flats, parts = getattr(wrapper, found), getattr(wrapper, flat_name), getattr(wrapper, parts_name)
        dp_groups = getattr(wrapper, "real_dp_process_group", [None] * len(groups))
        if len(groups) != len(self.param_groups):
            raise RuntimeError(f"DeepSpeed has {len(groups)} parameter groups, LAMB {len(self.param_groups)}")
        layout, first_id = [], 0
        for i, (params, flat) in enumerate(zip(groups, flats)):
            group = dp_groups[i]
            rank = dist.get_rank(group=group) if dist.is_initialized() else 0
            part = parts[i][rank]
            size = flat.element_size()
            base = flat.data_ptr()
            start = (part.data_ptr() - base) // size
            stop = start + part.numel()
            (mine_i,) = self.param_groups[i]["params"]
            if mine_i.numel() != part.numel():
                raise RuntimeError("LAMB's partition does not match DeepSpeed's")
            spans = sorted(((p.data_ptr() - base) // size, p.numel(), first_id + k) for k, p in enumerate(params))
            lengths, ids, cursor = [], [], start
            for offset, numel, pid in spans:
                a, b = max(offset, start), min(offset + numel, stop)
                if a >= b:
                    continue
                if a > cursor:                       # alignment padding between parameters
                    lengths.append(a - cursor)
                    ids.append(-1)
                lengths.append(b - a)
                ids.append(pid)
                cursor = b
            if cursor < stop:
                lengths.append(stop - cursor)
                ids.append(-1)
            first_id += len(params)
            layout.append((mine_i, lengths, ids))
            self._bf16[mine_i] = part
            self._group = group
        self._num_params = first_id
        if found == "bit16_groups":            # DeepSpeedZeroOptimizer: one group per step() call
            self._all_params = [p for g in self.param_groups for p in g["params"]]
        for p in mine:       # DeepSpeed links each partition's state after the first call
            self._init_state(p)
        self._layout = {
            p: (torch.tensor(lengths, dtype=torch.int64, device=p.device),
                torch.tensor([first_id if j < 0 else j for j in ids], dtype=torch.int64, device=p.device))
            for p, lengths, ids in layout}

    def _segments(self):
        """(group, tensor, lengths, ids) for every tensor this optimizer steps."""
        if self._layout is not None:     # DeepSpeed may show us a subset of the groups (ZeRO 1/2)
            for group in self.param_groups:
                for p in group["params"]:
                    yield (group, p, *self._layout[p])
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self._own:
                    self._own[p] = (torch.tensor([p.numel()], dtype=torch.int64, device=p.device),
                                    torch.tensor([len(self._own)], dtype=torch.int64, device=p.device))
                yield (group, p, *self._own[p])

    def _count(self) -> int:
        return self._num_params if self._layout is not None else len(self._own)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._layout is not None and dist.is_initialized():
            dist.all_reduce(t, group=self._group)
        return t

    # ------------------------------------------------------------------ step

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _collect(self):
        """The (group, tensor, lengths, ids, grad) to step now, and the tensors whose bf16
        partition DeepSpeed copied before they were stepped; None while groups are missing."""
        tensors = [(*s, s[1].grad) for s in self._segments() if s[1].grad is not None]
        if self._all_params is None:
            return tensors, []
        # ZeRO 1/2: DeepSpeed has just set this group's gradient partition and frees it after
        # this call; the reference keeps it alive until the last group's call.
        self._deferred += tensors
        current = {id(p) for g in self.param_groups for p in g["params"]}
        self._seen |= current
        if any(id(p) not in self._seen for p in self._all_params):
            return None
        tensors, self._deferred, self._seen = self._deferred, [], set()
        return tensors, [p for _, p, *_ in tensors if id(p) not in current]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        collected = self._collect()
        if collected is None:
            return loss                  # the last group's call steps this one too
        tensors, refresh = collected
        if not tensors:
            return loss
        device = tensors[0][1].device
        clip = None
        if self.max_grad_norm:
            sq = torch.stack(torch._foreach_norm([g for *_, g in tensors])).float().square().sum()
            norm = self._all_reduce(sq).sqrt()
            clip = (norm / self.max_grad_norm).clamp_(min=1.0)      # timm / Apex: divide grads by it

        n = self._count()
        norms = torch.zeros(2, n + 1, dtype=torch.float32, device=device)   # ||w||^2, ||u||^2; [n]: padding
        updates = []
        for group, p, lengths, ids, grad in tensors:
            beta1, beta2 = group["betas"]
            state = self._init_state(p)
            state["step"] += 1
            # Bias corrections on the device, in float64 as Apex and timm compute them on the host.
            step = state["step"].double()
            correction1 = (1 - beta1 ** step).float()
            root_correction2 = (1 - beta2 ** step).sqrt().float()
            if clip is not None:
                grad = grad / clip
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(grad, alpha=(1 - beta1) if group["grad_averaging"] else 1.0)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / root_correction2).add_(group["eps"])
            update = (m / correction1).div_(denom)
            if group["weight_decay"] != 0:
                update.add_(p, alpha=group["weight_decay"])
            flat_p, flat_u = p.reshape(-1), update.reshape(-1)
            norms[0].index_add_(0, ids, torch.segment_reduce(flat_p * flat_p, "sum", lengths=lengths, unsafe=True))
            norms[1].index_add_(0, ids, torch.segment_reduce(flat_u * flat_u, "sum", lengths=lengths, unsafe=True))
            updates.append(update)

        w, u = self._all_reduce(norms).sqrt().unbind(0)
        trust = torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
        for (group, p, lengths, ids, _), update in zip(tensors, updates):
            if group["weight_decay"] != 0 or group["always_adapt"]:
                ratio = torch.repeat_interleave(trust.index_select(0, ids), lengths, output_size=p.numel())
                update.reshape(-1).mul_(ratio)
            p.add_(update, alpha=-group["lr"])
        for p in refresh:                # DeepSpeed copied these before their deferred step
            self._bf16[p].copy_(p)
        return loss
