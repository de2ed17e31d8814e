"""Host reads per training step through the real DeepSpeed engine, on CPU, in process, one rank.

On CUDA a read of a device value on the host (``.item()``, ``bool()`` of a tensor, ``.tolist()``,
``.cpu()``, ``.numpy()``, a device-to-host ``.to``) waits for the GPU to finish everything queued
so far, and so does a blocking copy of host data onto the device (``torch.tensor(x,
device=...)``, which stages pageable memory): one per step caps how far the host can queue ahead.
Here the real Trainer (build_trainer: DALI CPU loader, mixer, loss, DeepSpeed engine) runs on
the CPU under a TorchFunctionMode spy that records every such call in the training thread,
from the end of the second optimizer step to the logging step (whose one read of the meters is
the permitted sync; log_every is larger than the epoch, so only the last step logs). On the
CPU every tensor is a host tensor, so the spy cannot tell a device value from a host one:
it records every read, and the test expects none at all in the supported configurations. Two
configurations that do sync on CUDA are counted too, as the reason for what the code refuses
or warns about: bf16 at ZeRO stage 0 (refused on CUDA: engine.check_device) and DeepSpeed's
gradient clipping at ZeRO 1/2 (which LAMB therefore does itself: fastdeit/lamb.py).
"""
import os
import traceback
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastdeit import distributed
from fastdeit.build import build_trainer
from fastdeit.config import load_config
from tests.launching import TINY

_READS = {torch.Tensor.item: "item", torch.Tensor.__bool__: "bool", torch.Tensor.__float__: "float",
          torch.Tensor.__int__: "int", torch.Tensor.__index__: "index", torch.Tensor.tolist: "tolist",
          torch.Tensor.cpu: "cpu", torch.Tensor.numpy: "numpy", torch.equal: "equal",
          torch.allclose: "allclose", torch.is_nonzero: "is_nonzero"}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep

STEPS = 12          # one epoch: 192 images at a global batch of 16
WARM = 2            # lazy initialisation (optimizer states, DeepSpeed's links) happens here


class HostReadSpy(TorchFunctionMode):
    """Records (kind, where) for every host read and every host-data copy onto a device."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.reads = []

    def _record(self, kind):
        if not self.armed:
            return
        stack = [f for f in traceback.extract_stack()[:-2] if not os.path.abspath(f.filename).startswith(_TORCH)]
        frame = stack[-1]
        # Our files by their path in the package (fastdeit/data/augment/mixing.py), others by
        # their last three parts.
        parts = frame.filename.split(os.sep)
        first = len(parts) - 1 - parts[::-1].index("fastdeit") if "fastdeit" in parts else len(parts) - 3
        self.reads.append((kind, f"{'/'.join(parts[first:])}:{frame.name}"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            self._record(_READS[func])
        elif func is torch.Tensor.to:
            device = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})[0]
            if device is not None and device.type == "cpu":
                self._record("to(cpu)")
        elif func in _FROM_DATA and kwargs.get("device") is not None:
            # With an explicit device (the accelerator's on CUDA): a blocking copy from pageable memory.
            self._record(f"{func.__name__}(device=)")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def world():
    env = distributed.init()
    yield env
    distributed.teardown()


def reads_per_step(world, dataset, tmp_path, *overrides):
    """{step: Counter of (kind, where)} over the armed steps, and the number of armed steps."""
    cfg = load_config(None, [*TINY, f"data.root={dataset}", f"trainer.run_dir={tmp_path}",
                             "model.name=deit_tiny_patch16_224", "distill.type=none", "trainer.epochs=1",
                             "engine.global_batch_size=16", "logging.log_every=1000000",
                             "mixing.prob=1.0", "mixing.erase_prob=0.25", *overrides])
    trainer = build_trainer(cfg, world)
    engine, spy = trainer.engine, HostReadSpy()
    per_step, armed_steps = {}, []
    step, log_step = engine.step, trainer._log_step

    def counted_step(*a, **k):
        out = step(*a, **k)
        if spy.armed:
            armed_steps.append(engine.global_steps)
            per_step[engine.global_steps] = Counter(spy.reads)
            spy.reads = []
        elif engine.global_steps == WARM:
            spy.armed = True
        return out

    def logged(*a, **k):                  # the logging step: its reads are the permitted ones
        spy.armed = False
        return log_step(*a, **k)

    engine.step, trainer._log_step = counted_step, logged
    with spy:
        trainer.train_epoch(0)
    trainer.train_loader.close()
    return per_step, armed_steps


# Reads of values that live on the host by design, on CUDA too (so no sync there), which the
# CPU run cannot tell from device reads: each named, with why it is a host value.
HOST_VALUES = {
    # Random erasing draws its boxes on the host and sizes one scatter by their pixel count;
    # the boxes then travel from pinned memory. tests/test_host_copies.py runs the mixer on
    # meta, where a read of a device value would raise.
    ("int", "fastdeit/data/augment/mixing.py:__call__"),
}

SUPPORTED = {
    "adamw-zero0-fp32": ["engine.zero_stage=0", "engine.precision=fp32"],
    "adamw-zero1": ["engine.zero_stage=1"],
    "adamw-zero2": ["engine.zero_stage=2"],
    "lamb-zero1": ["engine.zero_stage=1", "optim.name=lamb"],
    "lamb-zero2": ["engine.zero_stage=2", "optim.name=lamb"],
}


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_no_host_read_between_logging_steps(world, dataset, tmp_path, name):
    per_step, armed = reads_per_step(world, dataset, tmp_path, *SUPPORTED[name])
    # Steps 3 .. 12 ran armed: each window ends with the engine's step, so the last one holds
    # step 12's work up to its engine.step(); its logging read after that is the permitted sync.
    assert armed == list(range(WARM + 1, STEPS + 1)), armed
    device_reads = {s: {k: n for k, n in c.items() if k not in HOST_VALUES} for s, c in per_step.items()}
    assert {s: r for s, r in device_reads.items() if r} == {}


def test_the_configurations_refused_or_avoided_do_sync(world, dataset, tmp_path):
    """Why engine.check_device refuses bf16 at ZeRO 0 on CUDA, and why LAMB clips itself."""
    per_step, armed = reads_per_step(world, dataset, tmp_path / "z0", "engine.zero_stage=0", "engine.precision=bf16")
    params = 4 + 2 * 12 + 4    # the tiny DeiT's parameter tensors: tokens and patch embedding, 2 blocks, norm, head
    assert armed and all(sum(per_step[s].values()) >= params for s in armed), \
        {s: sum(c.values()) for s, c in per_step.items()}
    per_step, armed = reads_per_step(world, dataset, tmp_path / "clip", "engine.zero_stage=1",
                                     "engine.gradient_clipping=1.0")
    # Per step and parameter group (2): one torch.tensor(-1.0, device=...) in DeepSpeed's
    # inf/NaN masking of the group norm and one bool() of the norm's validity.
    for s in armed:
        kinds = Counter(kind for (kind, _), n in per_step[s].items() for _ in range(n))
        assert kinds["tensor(device=)"] >= 2 and kinds["bool"] >= 2, dict(per_step[s])
