"""Top-1/top-5 over a sharded validation loader, per head, reduced across ranks.

Counts stay on the device during the pass; one all-reduce and one host read at the end.
Each val image is read by exactly one rank, so the reduced counts cover the set once.

Evaluation runs eager even when the student is compiled (model.compile). On ImageNet it is
about 1.3% of an epoch's compute (50k val images, one forward each, against 1.28M training
images with forward and backward; twice that with the EMA evaluated too), so compiling it could
save about half a percent of a run, while it would add graphs of its own (eval mode, no grad,
the partial last batch, the EMA's module), each compiled at the first evaluation and each a
chance of recompiling later.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.distributed as dist
from torch import nn

from fastdeit.models import eval_heads, is_distilled


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def evaluate(module: nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
             dtype: torch.dtype, device: torch.device) -> Dict[str, float]:
    """``{'val/images', 'val/<head>_top1', 'val/<head>_top5'}`` in percent; heads: cls[, dist, avg]."""
    was_training = module.training
    module.eval()
    heads = ["cls", "dist", "avg"] if is_distilled(module) else ["cls"]
    counts = torch.zeros(len(heads), 2, dtype=torch.long, device=device)   # correct@1, correct@5
    total = torch.zeros(1, dtype=torch.long, device=device)
    batches, last = 0, None
    for images, labels in loader:
        logits = eval_heads(module, images.to(dtype))
        for i, head in enumerate(heads):
            z = logits[head]
            hit = z.topk(min(5, z.shape[1]), dim=1).indices == labels[:, None]   # [B, k]
            counts[i, 0] += hit[:, 0].sum()
            counts[i, 1] += hit.any(dim=1).sum()
        total += labels.numel()
        batches, last = batches + 1, images[:1]
    if zero3_partitioned(module):
        # ZeRO-3 all-gathers each layer's parameters inside every forward: a rank that ran
        # out of validation images (the shards differ by one image, which can be one batch)
        # must still join the others' gathers. It runs forwards on a stand-in image and
        # discards them; the counts above are untouched.
        for _ in range(_most_batches(batches, device) - batches):
            eval_heads(module, last.to(dtype) if last is not None else _stand_in(loader, dtype, device))
    module.train(was_training)
    packed = torch.cat([counts.flatten(), total])
    if dist.is_initialized():
        dist.all_reduce(packed)
    packed = packed.cpu().tolist()
    n = max(packed[-1], 1)
    out = {"val/images": float(packed[-1])}
    for i, head in enumerate(heads):
        out[f"val/{head}_top1"] = 100.0 * packed[2 * i] / n
        out[f"val/{head}_top5"] = 100.0 * packed[2 * i + 1] / n
    return out


def zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed's ZeRO-3 partitioned ``module``'s parameters (each gathered per forward)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _most_batches(batches: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return batches
    n = torch.tensor([batches], dtype=torch.long, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())            # once per evaluation, at its end


def _stand_in(loader, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    size = getattr(loader, "img_size", None)
    if size is None:
        raise RuntimeError("ZeRO-3 evaluation: this rank has no validation batch and the loader no img_size")
    return torch.zeros(1, 3, size, size, dtype=dtype, device=device)
