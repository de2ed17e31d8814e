"""Bytes moved per batch by the on-device augmentation pass, counted on the `meta` device.

    python -m benchmarks.traffic --batch 256 --size 192 [--name NAME]

A GPU-side augmentation is bound by memory traffic, not arithmetic: each eager op reads its
inputs from HBM and writes its output back. Running the loader's own augmentation
(`TrainLoader._augment`: 3-Augment or RandAugment, then normalisation) on `meta` tensors executes
every op with shapes and dtypes but no data, so a dispatch-level counter can sum, per aten op,
the bytes of its tensor inputs (read) and outputs (written), on any machine, in a second.
Views (slices, transposes, expands, permutes) move nothing and are not counted; an in-place op
counts its operand as read and written. This is the traffic of the op sequence as eager torch
runs it, without cache reuse between ops: an upper bound a fused kernel would undercut, and
the number a change of dtype or of op count moves.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.common import base_record, markdown_table, record_header_md, result_stem, write_record

META = torch.device("meta")
GB = 1e9
_GATHERS = {"index_select", "gather", "index", "take", "embedding"}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Sums bytes read and written per aten op (views excluded) while active."""

    def __init__(self):
        super().__init__()
        self.read = 0
        self.written = 0
        self.by_op: Counter = Counter()

    @property
    def total(self) -> int:
        return self.read + self.written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._schema.is_mutable is False and any(r.alias_info for r in func._schema.returns):
            return out          # a view of its input: no data moves
        if func.is_view:
            return out
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        writes = sum(_bytes(o) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
        if func.overloadpacket.__name__ in _GATHERS:
            # reads the selected elements (as many as it writes) and the indices, not the source
            reads = writes + sum(_bytes(a) for a in inputs[1:])
        else:
            reads = sum(_bytes(a) for a in inputs)
        self.read += reads
        self.written += writes
        self.by_op[func.overloadpacket.__name__] += reads + writes
        return out


def count(fn: Callable[[], Any]) -> ByteCounter:
    with ByteCounter() as counter:
        fn()
    return counter


def augment_traffic(kind: str, batch: int, size: int, seed: int = 0) -> ByteCounter:
    """Bytes moved by `TrainLoader._augment` for one uint8 batch [batch, 3, size, size] on meta."""
    from fastdeit.data import DataConfig
    from fastdeit.data.augment.imageops import Normalize
    from fastdeit.data.loading.loader import TrainLoader

    cfg = DataConfig(root="unused", img_size=size, three_augment=kind == "3-augment",
                     color_jitter=0.3 if kind == "3-augment" else 0.0,
                     rand_augment="rand-m9-mstd0.5-inc1" if kind == "randaugment" else None)
    # Only what _augment reads: no source, no DALI pipeline.
    loader = TrainLoader.__new__(TrainLoader)
    loader.seed, loader._epoch, loader.rank = seed, 0, 0
    loader._normalize = Normalize(cfg.mean, cfg.std)
    from fastdeit.data.augment.randaug import BatchRandAugment, parse_rand_augment
    from fastdeit.data.augment.threeaug import ThreeAugment

    loader.randaug = ThreeAugment.from_config(cfg) or BatchRandAugment(
        parse_rand_augment(cfg.rand_augment), [min(255, round(255 * m)) for m in cfg.mean])
    images = torch.empty(batch, 3, size, size, dtype=torch.uint8, device=META,
                         memory_format=torch.channels_last)
    pin = torch.Tensor.pin_memory
    if not torch.cuda.is_available():
        # The plans travel from pinned memory, which needs a CUDA driver; pageable host memory
        # stands in (the host-side copy is not device traffic either way).
        torch.Tensor.pin_memory = lambda t, *a, **k: t
    try:
        loader._augment(images, 0, 0)           # the device constants are made once
        return count(lambda: loader._augment(images, 0, 1))
    finally:
        torch.Tensor.pin_memory = pin


def _markdown(record: Dict[str, Any]) -> str:
    rows = []
    for kind, r in record["results"].items():
        top = ", ".join(f"{op} {b / GB:.2f}" for op, b in r["top_ops"][:5])
        rows.append([kind, f"{r['total'] / GB:.2f}", f"{r['read'] / GB:.2f}", f"{r['written'] / GB:.2f}", top])
    table = markdown_table(["augmentation", "GB moved", "read", "written", "largest ops (GB)"], rows)
    title = (f"Augmentation traffic: bytes moved per batch of {record['batch']} x "
             f"{record['size']}x{record['size']} (meta-device count)")
    notes = record.get("notes")
    return record_header_md(record, title) + (f"\nNotes: {notes}\n" if notes else "") + "\n" + table + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--kinds", nargs="+", default=["3-augment", "randaugment"],
                   choices=["3-augment", "randaugment"])
    p.add_argument("--notes", default=None, help="a sentence for the record")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    record = base_record("traffic", META, argv)
    record.update(batch=args.batch, size=args.size, results={})
    if args.notes:
        record["notes"] = args.notes
    for kind in args.kinds:
        c = augment_traffic(kind, args.batch, args.size)
        record["results"][kind] = {"total": c.total, "read": c.read, "written": c.written,
                                   "top_ops": c.by_op.most_common(8)}
        print(f"{kind}: {c.total / GB:.2f} GB moved ({c.read / GB:.2f} read, {c.written / GB:.2f} written); "
              + ", ".join(f"{op} {b / GB:.2f}" for op, b in c.by_op.most_common(5)), flush=True)
    if not args.no_save:
        stem = result_stem(record, META, args.name)
        paths = write_record(record, _markdown(record), Path(args.out), stem)
        print("wrote " + ", ".join(str(v) for v in paths.values()))
    return record


if __name__ == "__main__":
    main()
