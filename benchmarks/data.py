"""Data-path throughput: our DALI + batched-RandAugment loader against the reference-style one.

    python -m fastdeit.data.synthetic --mode imagenet --out /tmp/inet --classes 10 \
        --train-per-class 48 --val-per-class 0
    python benchmarks/data.py --data /tmp/inet [--batch 32 --workers 2 --epochs 3 --repeats 3]
    python -m fastdeit.data.pack /tmp/inet /tmp/inet-packed --shard-size 16MB
    python benchmarks/data.py --data /tmp/inet-packed [--count-opens]

Both loaders read the same `DIR/train` class-folder tree with the full DeiT train augmentation
and deliver the batch the model would see (normalised, random-erased, Mixup/CutMix-ed, soft
targets), in one process, one after the other:

  ours      Loader (DALI decode + RandomResizedCrop + bicubic resize + flip, `--workers` DALI
            threads) -> batched RandAugment + normalise -> BatchMixer (erasing, Mixup/CutMix);
  baseline  torchvision ImageFolder + PIL + timm create_transform (RandomResizedCrop bicubic,
            flip, rand-m9-mstd0.5-inc1, normalise, random erasing 0.25 pixel), the DeiT
            reference's settings, in a DataLoader with `--workers` processes (persistent, so
            worker start-up is not charged), then timm's Mixup on the batch;
  ours-3aug (with --three-augment) ours with DeiT III's 3-Augment (grayscale / solarise / blur,
            colour jitter 0.3) in place of RandAugment: what the DeiT III recipe's data path costs;
  dali-ra   (with --dali-ra) DALI decode/crop/resize + DALI's per-sample rand_augment (fixed
            magnitude, its own op set) + normalise: the design we replaced, for reference;
  shards    (when --data is a packed folder, python -m fastdeit.data.pack) ours reading the
            packed shards, the others the folder it was packed from (its manifest's "source",
            or --folder). --count-opens also counts the files each of ours opens per epoch
            (strace, one extra epoch pair each, untimed): the reason packing exists.

Images/sec per epoch (epoch 1 includes warm-up; "steady" is the median of the later epochs),
the ratio ours / baseline per repeat and its median, and the CPU time spent per image (all
threads, plus the baseline's worker processes): on a shared machine the wall-clock rates move
with the other load, the CPU cost much less. The loaders run in alternating order. Results go to
benchmarks/results/<date>-<cpu|gpu>-data.{json,md} with the commit, hardware and command.

Pillow >= 11 raises on posterize with 0 bits, which timm's PosterizeIncreasing asks for at
magnitude 10 (m9 + noise clipped at 10, about 0.15% of images): the baseline gets the old
Pillow behaviour (a black image) so it can finish an epoch; our RandAugment does the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import commit, hardware, pick_device, software  # noqa: E402
from fastdeit import threads  # noqa: E402
from fastdeit.data import DataConfig, build_loader  # noqa: E402
from fastdeit.data.augment.mixing import BatchMixer, MixingConfig  # noqa: E402

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def run_ours(args, device, root=None, three_augment=False, ahead=True):
    # Thread counts: --dali-threads / --host-threads, else this process's budget for a data
    # path with no training step (fastdeit.threads.thread_budget). ahead: each epoch's
    # set_epoch names the next (as the trainer does), whose batches are then made while this
    # one's last are taken; False: epoch by epoch, each started from nothing (--compare-ahead).
    augment = dict(rand_augment=None, three_augment=True, color_jitter=0.3) if three_augment else \
        dict(rand_augment=RAND_AUGMENT)
    cfg = DataConfig(root=root or args.folder, img_size=args.img_size, num_threads=args.dali_threads,
                     host_threads=args.host_threads, **augment, repeated_aug=1, val_list=None,
                     device="auto" if device.type == "cuda" else "cpu")
    loader = build_loader(cfg, "train", args.batch, 0, 1, 0, device, threads=args.budget)
    mixer = BatchMixer(MixingConfig(), loader.num_classes, device)
    rates, cpu = [], []
    for epoch in range(args.epochs):
        start, start_cpu = time.perf_counter(), time.process_time()  # all our threads
        if epoch == 1:  # steady epochs only: context switches of all our threads, per image
            switches, images_seen = _context_switches(), 0
        loader.set_epoch(epoch, then=epoch + 1 if ahead and epoch + 1 < args.epochs else None)
        n = 0
        for images, labels in loader:
            images, targets = mixer(images, labels)
            n += images.shape[0]
        _sync(device)
        rates.append(n / (time.perf_counter() - start))
        cpu.append(1e3 * (time.process_time() - start_cpu) / n)
        if epoch >= 1:
            images_seen += n
    loader.close()
    if args.epochs > 1:
        # ours' figure stays ours: the shards' and the epoch-by-epoch runs go to their own lists
        (args.shard_switches if root else args.context_switches if ahead else args.epochwise_switches).append(
            (_context_switches() - switches) / images_seen)
    return rates, cpu


def _spread(runs, name: str) -> str:
    steady_epochs = [v for run in runs for v in run[name][1:]] or [v for run in runs for v in run[name]]
    lo, hi = min(steady_epochs), max(steady_epochs)
    return f"{lo:.0f}-{hi:.0f} img/s (max/min {hi / lo:.2f})"


def _context_switches() -> int:
    """Voluntary + involuntary context switches of this process, all threads (ended ones too)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def run_baseline(args, device):
    import torchvision
    from timm.data import Mixup

    from benchmarks.common import deit_train_transform

    # timm's create_transform with the DeiT settings, made Pillow-safe (see its docstring).
    transform = deit_train_transform(args.img_size)
    dataset = torchvision.datasets.ImageFolder(os.path.join(args.folder, "train"), transform)
    data = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=len(dataset.classes))
    rates, cpu = [], []
    workers = []
    for _ in range(args.epochs):
        start, start_cpu = time.perf_counter(), time.process_time() + _cpu_seconds(workers)
        n = 0
        for images, labels in data:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            images, targets = mixup(images, labels)
            n += images.shape[0]
            if not workers:  # the persistent worker processes, for their CPU time
                workers = [w.pid for w in getattr(data._iterator, "_workers", [])]
                start_cpu -= _cpu_seconds(workers)  # they had no share before this epoch
        _sync(device)
        rates.append(n / (time.perf_counter() - start))
        cpu.append(1e3 * (time.process_time() + _cpu_seconds(workers) - start_cpu) / n)
    del data
    return rates, cpu


def run_dali_ra(args, device):
    """The replaced design: DALI's per-sample rand_augment inside the graph (CPU or GPU)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from fastdeit.data.loading.folder import scan_image_folder

    files, labels, _ = scan_image_folder(os.path.join(args.folder, "train"))
    gpu = device.type == "cuda"
    size = args.img_size

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=True,
                                       initial_fill=len(files), name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu",
                                               output_type=types.RGB)
        images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC)
        images = rand_augment.rand_augment(images, n=2, m=9, num_magnitude_bins=11,
                                           monotonic_mag=True, shape=[size, size])
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375], mirror=fn.random.coin_flip())
        return images, label

    pipe = graph(batch_size=args.batch, num_threads=args.workers,
                 device_id=device.index or 0 if gpu else None, seed=0)
    pipe.build()
    it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                             last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
    rates, cpu = [], []
    for _ in range(args.epochs):
        start, start_cpu = time.perf_counter(), time.process_time()
        n = 0
        for out in it:
            n += out[0]["images"].shape[0]
        _sync(device)
        rates.append(n / (time.perf_counter() - start))
        cpu.append(1e3 * (time.process_time() - start_cpu) / n)
    return rates, cpu


def count_opens(args, root, epochs=2):
    """Files under `root` that our loader opens in each of `epochs` train epochs, counted with
    strace in a child process (DALI opens files in C++, out of Python's sight). The child
    opens a marker path before each epoch, so the log splits into epochs."""
    import shutil
    import tempfile

    if shutil.which("strace") is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".strace") as log:
        cmd = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", log.name, sys.executable,
               os.path.abspath(__file__), "--data", root, "--opens-child", str(epochs),
               "--batch", str(args.batch), "--img-size", str(args.img_size), "--device", "cpu"]
        subprocess.run(cmd, check=True, capture_output=True)
        lines = open(log.name, errors="replace").read().splitlines()
    return count_successful_opens(lines, os.path.realpath(root), epochs)


def count_successful_opens(lines, root, epochs):
    """Successful opens of files under `root` in each epoch, from `strace -f` lines ("PID call").
    Under -f a call that another thread interrupts is printed in two pieces: the path on
    `PID openat(..., "path", ... <unfinished ...>` and the result on a later
    `PID <... openat resumed>) = FD`; the pieces are joined per PID, and a call counts for the
    epoch it began in."""
    counts, epoch, pending = [0] * epochs, -1, {}
    under_root = re.compile(rf'"{re.escape(root)}/[^"]*"')
    for line in lines:
        pid, _, call = line.partition(" ")
        marker = re.search(r'"/nonexistent/fastdeit-epoch-(\d+)"', call)
        if marker:
            epoch = int(marker.group(1))
            continue
        if call.rstrip().endswith("<unfinished ...>"):
            pending[pid] = (call, epoch)
            continue
        began = epoch
        if "resumed>" in call and pid in pending:
            start, began = pending.pop(pid)
            call = start + call
        # strace pads a short line's result out to its column (`-a`, 40): a resumed call's
        # `<... openat resumed>)` is short, so `)` and `= FD` may be spaces apart
        if began >= 0 and under_root.search(call) and re.search(r"\)\s+= \d+", call):
            counts[began] += 1
    return counts


def _opens_child(args):
    cfg = DataConfig(root=args.data, img_size=args.img_size, num_threads=2, host_threads=1,
                     rand_augment=RAND_AUGMENT, repeated_aug=1, device="cpu")
    loader = build_loader(cfg, "train", args.batch, 0, 1, 0, torch.device("cpu"))
    for epoch in range(args.opens_child):
        try:
            open(f"/nonexistent/fastdeit-epoch-{epoch}")
        except OSError:
            pass
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    loader.close()


def _cpu_seconds(pids):
    """user + system CPU seconds of other processes (Linux /proc), 0 for any unreadable."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_partial(args, device, runs, current):
    """What is measured so far, where the final JSON goes (the GPU suite caps each stage: a
    stopped run keeps its figures). The finished run overwrites it."""
    done = runs + [current]
    names = list(dict.fromkeys(k for run in done for k in run if k not in ("ratio", "shards_over_folder", "ahead_over_epochwise")))
    partial = {"partial": True, "date": datetime.date.today().isoformat(), "commit": commit(),
               "images_per_sec_steady": {k: statistics.median(steady(run[k]) for run in done if k in run)
                                         for k in names}}
    if "ours" in current and "baseline" in current:
        partial["ratio_ours_over_baseline"] = steady(current["ours"]) / steady(current["baseline"])
    path = _prefix(args, device) + ".json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(partial, f, indent=2)
    os.replace(path + ".tmp", path)


def _prefix(args, device):
    kind = "gpu" if device.type == "cuda" else "cpu"
    return args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{datetime.date.today().isoformat()}-{kind}-data")


def steady(rates):
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder holding train/<class>/*.jpg, or a "
                   "packed one (python -m fastdeit.data.pack)")
    p.add_argument("--folder", default=None, help="with a packed --data: the class-folder tree "
                   "for the other loaders (default: the one it was packed from)")
    p.add_argument("--count-opens", action="store_true",
                   help="also count the files ours opens per epoch, folder and shards (strace)")
    p.add_argument("--opens-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (baseline)")
    p.add_argument("--dali-threads", type=int, default=None,
                   help="ours: DALI threads (default: the rank's thread budget, see the README)")
    p.add_argument("--host-threads", type=int, default=None,
                   help="ours: threads finishing CPU batches (default: the thread budget)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="run both loaders this many times")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--cores", type=int, default=None,
                   help="ours: the thread budget's core count, set by hand (default: this process's "
                   "usable cores); more than the machine has shows how the split scales, not speed")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op threads of the main process (both loaders; default: the budget)")
    p.add_argument("--device", default="auto", help="auto: the trainer's rule (DeepSpeed's "
                   "accelerator, this rank's GPU), else cpu / cuda")
    p.add_argument("--dali-ra", action="store_true", help="also time DALI's own rand_augment")
    p.add_argument("--three-augment", action="store_true", help="also time ours with DeiT III's 3-Augment")
    p.add_argument("--compare-ahead", action="store_true",
                   help="also time ours epoch by epoch (no next epoch made ahead): what set_epoch's `then` gives")
    p.add_argument("--out", default=None, help="results path prefix (default "
                   "benchmarks/results/<date>-<cpu|gpu>-data)")
    args = p.parse_args(argv)
    if args.opens_child:
        return _opens_child(args)
    packed = None
    if os.path.isfile(os.path.join(args.data, "manifest.json")):
        with open(os.path.join(args.data, "manifest.json")) as f:
            args.folder, packed = args.folder or json.load(f)["source"], args.data
    else:
        args.folder = args.data
    device = pick_device(args.device)
    data_on_gpu = device.type == "cuda"
    args.budget = threads.rank_budget(threads.RuntimeConfig(cores_per_rank=args.cores,
                                                            torch_threads=args.torch_threads),
                                      data_on_gpu, None, args.dali_threads, args.host_threads)
    torch.set_num_threads(args.budget.torch)
    print(args.budget.describe(), flush=True)
    args.context_switches, args.shard_switches, args.epochwise_switches = [], [], []

    loaders = {"ours": run_ours, "baseline": run_baseline}
    if args.three_augment:
        loaders["ours-3aug"] = lambda args, device: run_ours(args, device, three_augment=True)
    if args.dali_ra:
        loaders["dali-ra"] = run_dali_ra
    if packed:
        loaders["shards"] = lambda args, device: run_ours(args, device, packed)
    if args.compare_ahead:
        loaders["ours-epochwise"] = lambda args, device: run_ours(args, device, ahead=False)
    runs, cpu_runs = [], []
    for r in range(args.repeats):
        # alternate the order, so that a drift in the machine's load favours neither
        names = list(loaders) if r % 2 == 0 else list(loaders)[::-1]
        results = {}
        for name in names:
            results[name] = loaders[name](args, device)
            _write_partial(args, device, runs, {k: v[0] for k, v in results.items()})
        row = {name: results[name][0] for name in loaders}
        cpu_runs.append({name: results[name][1] for name in loaders})
        row["ratio"] = steady(row["ours"]) / steady(row["baseline"])
        if packed:
            row["shards_over_folder"] = steady(row["shards"]) / steady(row["ours"])
        if args.compare_ahead:
            row["ahead_over_epochwise"] = steady(row["ours"]) / steady(row["ours-epochwise"])
        runs.append(row)
        print(f"repeat {r + 1}: " + " | ".join(
            f"{k} {' '.join(f'{v:.0f}' for v in row[k])} img/s "
            f"({steady(cpu_runs[-1][k]):.2f} CPU ms/img)" for k in loaders)
            + f" | ratio {row['ratio']:.2f}", flush=True)
    opens = ({"folder": count_opens(args, args.folder), "shards": count_opens(args, packed)}
             if packed and args.count_opens else None)

    names = list(loaders)
    summary = {k: statistics.median(steady(run[k]) for run in runs) for k in names}
    cpu_ms = {k: statistics.median(steady(run[k]) for run in cpu_runs) for k in names}
    ratio = statistics.median(run["ratio"] for run in runs)
    # CPU seconds per wall second over the steady epochs: how many cores the loader kept busy
    cores_busy = {k: statistics.median(steady([r * c / 1e3 for r, c in zip(run[k], cpu_run[k])])
                                       for run, cpu_run in zip(runs, cpu_runs)) for k in names}
    kind = "gpu" if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    record = {
        "date": date, "commit": commit(), "hardware": hardware(device), "software": software(),
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items()
                 if k not in ("budget", "context_switches", "shard_switches", "epochwise_switches")},
        "threads": dataclasses.asdict(args.budget),
        "ours_context_switches_per_image": args.context_switches,
        "images_per_sec_steady": summary, "ratio_ours_over_baseline": ratio,
        "cpu_ms_per_image_steady": cpu_ms, "cores_busy_steady": cores_busy, "load_average_at_end": os.getloadavg(),
        "runs": runs, "cpu_ms_per_image_runs": cpu_runs,
    }
    if packed:
        record.update(folder=args.folder, packed=packed, file_opens_per_epoch=opens,
                      shards_context_switches_per_image=args.shard_switches,
                      ratio_shards_over_folder=statistics.median(
                          run["shards_over_folder"] for run in runs))
    lines = [
        f"# Data-path throughput, {kind.upper()} ({date}, commit {record['commit']})", "",
        f"Hardware: {record['hardware'].get('cpu')} ({record['hardware']['cpu_cores']} cores)"
        + (f", {record['hardware']['gpu']}" if "gpu" in record["hardware"] else ""), "",
        f"Command: `{record['command']}`", "",
        "| loader | img/s per epoch (each repeat) | steady img/s (median) | CPU ms per image | cores busy |",
        "|---|---|---|---|---|"]
    for k in names:
        per = "; ".join(" ".join(f"{v:.0f}" for v in run[k]) for run in runs)
        lines.append(f"| {k} | {per} | {summary[k]:.0f} | {cpu_ms[k]:.2f} | {cores_busy[k]:.2f} |")
    per_repeat = ", ".join(f"{run['ratio']:.2f}" for run in runs)
    lines += ["", f"Ratio ours / baseline (median of repeats, steady epochs): **{ratio:.2f}x** "
              f"(per repeat: {per_repeat}). CPU ms per image: all CPU time of the loader's "
              f"process (and, for the baseline, its worker processes) per image delivered; cores "
              f"busy: that CPU time per second of wall time (steady epochs). "
              f"Load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}.", "",
              f"Ours: {args.budget.describe()}; steady epochs of all repeats span "
              f"{_spread(runs, 'ours')}; context switches per image (all threads, steady "
              f"epochs): {', '.join(f'{v:.1f}' for v in args.context_switches) or 'n/a'}.", ""]
    if args.compare_ahead:
        record.update(ratio_ahead_over_epochwise=statistics.median(run["ahead_over_epochwise"] for run in runs),
                      epochwise_context_switches_per_image=args.epochwise_switches)
        per_repeat = ", ".join(f"{run['ahead_over_epochwise']:.2f}" for run in runs)
        lines += [f"Next epoch made ahead (the trainer's set_epoch(e, then=e + 1)) against epoch by epoch "
                  f"(each epoch's pipeline and producer started when the epoch starts), both ours: "
                  f"**{record['ratio_ahead_over_epochwise']:.2f}x** (per repeat: {per_repeat}); context "
                  f"switches per image epoch by epoch: "
                  f"{', '.join(f'{v:.1f}' for v in args.epochwise_switches) or 'n/a'}.", ""]
    if packed:
        per_repeat = ", ".join(f"{run['shards_over_folder']:.2f}" for run in runs)
        lines += [f"Shards ({packed}) against the folder they were packed from ({args.folder}), "
                  f"both read by ours: **{record['ratio_shards_over_folder']:.2f}x** (per "
                  f"repeat: {per_repeat})."
                  + ("" if opens is None else
                     f" Files opened per train epoch (strace, 2 epochs): folder "
                     f"{opens['folder']}, shards {opens['shards']}."), ""]
    text = "\n".join(lines)
    print(text)
    prefix = _prefix(args, device)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(record, f, indent=2)
    with open(prefix + ".md", "w") as f:
        f.write(text)
    print(f"wrote {prefix}.json and {prefix}.md")


if __name__ == "__main__":
    main()
