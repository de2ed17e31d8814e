"""Copies between the host and the training device that never stall the training thread.

A host-to-device copy from pageable memory is synchronous in CUDA whatever `non_blocking`
says: the driver stages the data through its own pinned buffer and returns only when that is
done, so the host stops queueing work ahead of the GPU once per copy. From page-locked
(pinned) memory with non_blocking=True the copy is one more entry in the stream, and torch's
caching host allocator keeps the pinned block from reuse until that copy has completed, so the
source may be dropped right away. Hence: every host-to-device copy per batch goes through
`to_device` (small per-batch draws) or starts from memory allocated pinned (the loader's host
batches); constants are copied once and kept on the device.

The other direction is the opposite: a non_blocking device-to-host copy returns before the
data has arrived, and nothing marks the CPU tensor as not yet valid, so it is made blocking
(it is a sync by nature; it happens only when a GPU pipeline feeds a CPU run).

Any device other than the CPU counts as an accelerator here, so the tests can stand the `meta`
device in for CUDA (tests/copyspy.py).
"""
from __future__ import annotations

import torch


def pins_for(device: torch.device) -> bool:
    """Whether host buffers bound for `device` should be allocated pinned."""
    return torch.device(device).type != "cpu"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`: host-to-device from pinned memory without blocking; device-to-host
    blocking (the values are there when the caller reads them); a no-op when already there."""
    device = torch.device(device)
    if device.type == "cpu":
        return t if t.device.type == "cpu" else t.to(device)
    if t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()   # one host memcpy of a small tensor, then an asynchronous copy
    return t.to(device, non_blocking=True)
