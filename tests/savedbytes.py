"""The bytes autograd saves for the backward, measured: an independent reference for the memory
plan (tests/test_memplan.py) and for activation checkpointing (tests/test_grad_checkpointing.py)."""
from contextlib import contextmanager
from typing import Dict, Iterator

import torch


@contextmanager
def saved_tensor_bytes(model: torch.nn.Module) -> Iterator[Dict[int, int]]:
    """Around a forward: {storage: bytes} of what autograd saves inside the block, each storage
    once (views of one tensor share it), the model's parameters left out."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            saved[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
