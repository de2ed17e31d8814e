"""A spy on host-to-device copies, for CPU tests of the "no blocking copy per batch" rule.

The `meta` device stands in for CUDA: tensors there have shapes and dtypes but no data, so a
copy onto it runs everywhere, and any read of a device value on the host (item, tolist, cpu)
raises, which also proves the code under test has no device-to-host sync.

A host-to-device copy blocks the host when its source is pageable (not pinned) CPU memory or
when it is made with non_blocking=False: CUDA stages a pageable source through a driver buffer
before returning, and a blocking copy waits for the stream. The spy counts every copy from a
CPU tensor (or from Python data) onto a non-CPU device, and marks these blocking ones:

  * Tensor.to / Tensor.cuda / Tensor.copy_ from CPU to the device;
  * torch.tensor / as_tensor / asarray / Tensor.new_tensor with a device (always pageable);
  * any other op that mixes a CPU tensor of one or more dimensions with a device tensor
    (indexing a device tensor with a CPU index tensor copies the index implicitly).

Pinning: `pin_memory()` and `torch.empty(..., pin_memory=True)` need the CUDA driver on this
torch build (a CUDA wheel on a machine without a GPU raises "Found no NVIDIA driver"). With
`fake_pinning` (the default when CUDA is unavailable) the spy replaces them for its duration
with stand-ins that allocate ordinary CPU memory and remember its storage, and makes
`Tensor.is_pinned()` answer from that record. They are patched on the classes and module, so
threads other than the one running the mode (the loader's feeder and pool threads) pin through
them too; the copies themselves are counted in the thread that entered the spy only (torch
function modes are thread-local), which is where the training step's copies happen.
"""
from __future__ import annotations

import os
import traceback
from typing import List, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import fastdeit

_OURS = os.path.dirname(os.path.abspath(fastdeit.__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep

_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class Copy(NamedTuple):
    what: str
    blocking: bool
    where: str          # the innermost fastdeit frame that asked for it (and the library's)


class CopySpy(TorchFunctionMode):
    def __init__(self, fake_pinning: bool = None):
        super().__init__()
        self.fake_pinning = (not torch.cuda.is_available()) if fake_pinning is None else fake_pinning
        self.copies: List[Copy] = []
        self._pinned = {}     # storage address -> the storage, kept alive so no address is reused
        self._saved = None

    # -- counting ----------------------------------------------------------------------------

    def take(self) -> List[Copy]:
        """The copies recorded since the last take()."""
        out, self.copies = self.copies, []
        return out

    @staticmethod
    def blocking(copies: List[Copy]) -> List[Copy]:
        return [c for c in copies if c.blocking]

    def is_pinned(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return False
        if self.fake_pinning:
            return t.untyped_storage().data_ptr() in self._pinned
        return t.is_pinned()

    def _record(self, what: str, blocking: bool) -> None:
        stack = [f for f in traceback.extract_stack()[:-2]
                 if not os.path.abspath(f.filename).startswith(_TORCH)]
        ours = [f for f in stack if os.path.abspath(f.filename).startswith(_OURS)]
        where = f"{os.path.relpath(ours[-1].filename, _OURS)}:{ours[-1].lineno}" if ours else "?"
        # the library frame that made the copy, when it is not ours (DeepSpeed, timm, DALI)
        if stack and stack[-1] is not (ours[-1] if ours else None):
            where += f" via {'/'.join(stack[-1].filename.split(os.sep)[-2:])}:{stack[-1].lineno}"
        self.copies.append(Copy(what, blocking, where))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            src = args[0]
            to_kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **to_kwargs)
            if device is not None and src.device.type == "cpu" and device.type != "cpu":
                self._record("to", not non_blocking or not self.is_pinned(src))
        elif func is torch.Tensor.cuda:
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            self._record("cuda", not non_blocking or not self.is_pinned(args[0]))
        elif func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            if src.device.type == "cpu" and dst.device.type != "cpu":
                self._record("copy_", not non_blocking or not self.is_pinned(src))
        elif func in _FROM_DATA:
            device = kwargs.get("device")
            data = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else None)
            if device is None and func is torch.Tensor.new_tensor:
                device = args[0].device
            device = torch.device(device) if device is not None else None
            if device is not None and device.type != "cpu" and not (
                    isinstance(data, torch.Tensor) and data.device == device):
                self._record(getattr(func, "__name__", str(func)), True)
        else:
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            if any(t.device.type != "cpu" for t in tensors) and any(
                    t.device.type == "cpu" and t.dim() > 0 for t in tensors):
                self._record(f"implicit ({getattr(func, '__name__', func)})", True)
        return func(*args, **kwargs)

    # -- pinning stand-ins -------------------------------------------------------------------

    def _remember(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self._pinned[storage.data_ptr()] = storage
        return t

    def __enter__(self):
        if self.fake_pinning:
            spy = self
            real_empty = torch.empty
            self._saved = (torch.Tensor.pin_memory, torch.Tensor.is_pinned, real_empty)

            def pin_memory(t, *a, **k):
                return spy._remember(t.detach().clone())

            def is_pinned(t, *a, **k):
                return spy.is_pinned(t)

            def empty(*a, pin_memory=False, **k):
                out = real_empty(*a, **k)
                return spy._remember(out) if pin_memory else out

            torch.Tensor.pin_memory, torch.Tensor.is_pinned, torch.empty = pin_memory, is_pinned, empty
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._saved is not None:
                torch.Tensor.pin_memory, torch.Tensor.is_pinned, torch.empty = self._saved
                self._saved = None
