"""benchmarks/memplan.py: the activation count on the meta device against a measured CPU run,
ZeRO's partition arithmetic by hand, and the command line."""

import pytest
import timm
import torch

from benchmarks import memplan
from tests.savedbytes import saved_tensor_bytes

KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=4)


def measured_saved_bytes(model, images):
    """A real CPU forward: bytes autograd saves (storages once, parameters not)."""
    with saved_tensor_bytes(model) as saved:
        model.train()(images)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_count_on_meta_matches_a_cpu_run(dtype):
    batch = 4
    with torch.device("meta"):
        meta = timm.create_model("deit_tiny_distilled_patch16_224", **KW).to(dtype)
    per_image = memplan.count_saved(meta, torch.zeros(1, 3, 32, 32, dtype=dtype, device="meta"))
    cpu = timm.create_model("deit_tiny_distilled_patch16_224", **KW).to(dtype)
    images = torch.randn(batch, 3, 32, 32).to(dtype)
    # The meta count (with its fused-attention stand-in), times the batch, is what the CPU's
    # fused attention kernel and every other op really saved, byte for byte in fp32. In bf16
    # the CPU's layer_norm saves its mean and rstd [B, N, 1] in bf16 where CUDA's (and the
    # meta device's) keep fp32: 2 bytes more per token for each of them, 5 norms (2 per block
    # and the final one).
    measured = measured_saved_bytes(cpu, images)
    assert memplan.count_saved(cpu, images).at_end_of_forward(False) == measured
    norm_stats = 0 if dtype == torch.float32 else 5 * 2 * batch * (2 + 16) * 2
    assert batch * per_image.at_end_of_forward(False) == measured + norm_stats
    # Checkpointing: autograd still saves what lies outside the blocks (one norm) and, through
    # the checkpoints' own saved inputs, each block's input: [B, 2 + 16 tokens, 64].
    cpu.set_grad_checkpointing(True)
    assert batch * (per_image.outside + per_image.inputs) == measured_saved_bytes(cpu, images) + norm_stats // 5
    assert per_image.inputs == 2 * (2 + 16) * 64 * dtype.itemsize
    # The plan's totals: one more largest block for the backward (its recompute, with
    # checkpointing; the activation gradients, without). Two blocks save little; ViT-L's 24 do.
    o, (b0, b1), i = per_image.outside, per_image.blocks, per_image.inputs
    assert (per_image.total(False), per_image.total(True)) == (o + b0 + b1 + max(b0, b1), o + i + 2 * max(b0, b1))
    assert per_image.total(True) < per_image.total(False)


def test_zero_partitioning_by_hand():
    P, N = 8_000_000, 8
    # bf16: 2 B weights, 2 B gradients, 12 B fp32 master + moments, 4 B fp32 gradient partition
    s0 = memplan.zero_states(P, 0, N, bf16=True)
    assert (s0.params, s0.grads, s0.optimizer, s0.ema) == (16e6, 16e6, 96e6, 0)
    s1 = memplan.zero_states(P, 1, N, bf16=True, reduce_bucket=1000)
    assert (s1.params, s1.grads, s1.optimizer) == (16e6, 16e6 + 2000, 12e6 + 4e6)
    s2 = memplan.zero_states(P, 2, N, bf16=True, reduce_bucket=1000, overlap_comm=True)
    assert (s2.params, s2.grads, s2.optimizer) == (16e6, 2e6 + 4000, 16e6)
    s3 = memplan.zero_states(P, 3, N, bf16=True, reduce_bucket=1000, gathered=500, persistent=100, ema=True)
    assert (s3.params, s3.grads, s3.optimizer) == (2e6 + 1200, 2e6 + 2000, 16e6)
    assert s3.ema == 4e6 + 16e6                    # fp32 shadow / N + the bf16 eval copy, whole
    # fp32: the parameters are the masters (4 + 4 + 8 B), nothing else
    f2 = memplan.zero_states(P, 2, N, bf16=False)
    assert (f2.params, f2.grads, f2.optimizer) == (32e6, 4e6, 8e6)
    # partitions round up: 10 parameters over 8 ranks hold 2 each
    assert memplan.zero_states(10, 3, 8, bf16=False).params == 4 * 2


def test_plan_command_prints_every_stage_and_a_choice(capsys):
    from benchmarks import memory

    rec = memory.main(["plan", "--config", "configs/deit_ti.yaml", "--gpu-mem", "80GB", "--gpus", "8",
                       "model.kwargs={depth: 2}"])
    out = capsys.readouterr().out
    assert [(r["stage"], r["checkpointing"]) for r in rec["rows"]] == [(s, c) for s in range(4) for c in (False, True)]
    assert "would use: engine.zero_stage=1 model.grad_checkpointing=false" in out
    row = next(r for r in rec["rows"] if (r["stage"], r["checkpointing"]) == (1, False))
    # The fixed part plus micro x per-image bytes fits 80 GiB; one more image per GPU would not.
    fixed = row["params"] + row["grads"] + row["optimizer"] + row["ema"] + row["teacher"] + row["reserve"]
    assert row["teacher"] > 0 and rec["act_bytes_per_image"]["off"] > rec["act_bytes_per_image"]["on"]
    assert row["max_micro"] >= row["micro"] > 0
    assert fixed + row["dali"] + row["micro"] * row["act_per_image"] <= 80 * 2**30


def test_gpu_memory_sizes():
    assert memplan.parse_bytes("80GB") == memplan.parse_bytes("80GiB") == 80 * 2**30
    assert memplan.parse_bytes("141") == 141 * 2**30
    with pytest.raises(ValueError, match="--gpu-mem"):
        memplan.parse_bytes("lots")


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_prediction_against_cuda_allocations(checkpointing):
    """On a GPU: what a bf16 DeiT III ViT-B forward at 192 px leaves allocated (the saved
    tensors, plus the small logits) is the plan's count from the meta device, within 5%
    (the allocator rounds each block up to 512 bytes)."""
    batch, dtype = 32, torch.bfloat16
    with torch.device("meta"):
        meta = timm.create_model("deit3_base_patch16_224", img_size=192).to(dtype)
    per_image = memplan.count_saved(meta, torch.zeros(1, 3, 192, 192, dtype=dtype, device="meta"))
    model = timm.create_model("deit3_base_patch16_224", img_size=192).to("cuda", dtype)
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(batch, 3, 192, 192, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = model.train()(images)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    predicted = batch * (per_image.outside + (per_image.inputs if checkpointing else sum(per_image.blocks)))
    assert held == pytest.approx(predicted, rel=0.05), (held, predicted)


def peak_tensor_bytes(run) -> int:
    """The largest rise of live CPU tensor bytes while ``run()`` runs: the profiler's allocator
    accounting (every CPU allocation and free torch makes, its running total reported with
    each), as torch.cuda.max_memory_allocated is on a GPU. The total counts what was allocated
    under a profiler and not yet freed, so the rise is measured from the value before the
    first allocation of this profile."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # In the order they happened (the trace lists them by thread and event kind).
    cpu = [e["args"] for e in sorted((e for e in events if e.get("name") == "[memory]"),
                                     key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
           if e["args"].get("Device Type") == 0]
    start = cpu[0]["Total Allocated"] - cpu[0]["Bytes"]
    return max(a["Total Allocated"] for a in cpu) - start


@pytest.fixture(scope="module")
def world():
    from fastdeit import distributed

    env = distributed.init()
    yield env
    distributed.teardown()


def plan_and_step(stage, precision, checkpointing, device, model_kwargs, size, batch):
    """(the plan's per-rank bytes for a config: ZeRO's model states + batch x the activations
    counted on the meta device; a function that builds that config's engine as the trainer
    does and trains two steps on ``device``)."""
    from fastdeit import engine as engine_lib
    from fastdeit.build import build_engine, build_models
    from fastdeit.config import Config
    from fastdeit.data.augment.mixing import MixingConfig
    from fastdeit.data.config import DataConfig
    from fastdeit.ema import EmaConfig
    from fastdeit.losses import DistillConfig
    from fastdeit.models import ModelConfig
    from fastdeit.optim import OptimConfig, ScheduleConfig
    from fastdeit.step import TrainStep

    cfg = Config(data=DataConfig(img_size=size, device="cpu"), mixing=MixingConfig(prob=0.0, erase_prob=0.0),
                 model=ModelConfig(name="deit_tiny_patch16_224", drop_path=0.0, grad_checkpointing=checkpointing,
                                   kwargs=model_kwargs),
                 distill=DistillConfig(type="none"), optim=OptimConfig(lr=1e-3, lr_base_batch=batch),
                 schedule=ScheduleConfig(warmup_epochs=0), ema=EmaConfig(decay=0.0),
                 engine=engine_lib.EngineConfig(global_batch_size=batch, zero_stage=stage, precision=precision))
    facts = memplan.model_facts(cfg, num_classes=10, device="meta")
    (row,) = [r for r in memplan.plan(cfg, facts, gpu_mem=2**40, gpus=1)
              if (r.stage, r.checkpointing) == (stage, checkpointing)]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)

    def build_and_train():
        models = build_models(cfg, device, num_classes=10, micro=batch)
        step = TrainStep(build_engine(cfg, models, world_size=1, steps_per_epoch=2), device)
        for _ in range(2):
            step(images, labels)

    return row.states.total + batch * row.act_per_image, build_and_train


CONFIGS = [(0, "fp32", False), (1, "bf16", False), (1, "bf16", True), (3, "fp32", False), (3, "bf16", False)]


@pytest.mark.parametrize("stage,precision,checkpointing", CONFIGS)
def test_plan_against_a_measured_step(world, stage, precision, checkpointing):
    """The plan's per-rank memory for a config against what building the engine and two
    training steps of it really allocate at their peak on this CPU (DeepSpeed's own buffers,
    the optimizer's state, autograd's saved tensors and every temporary). The plan adds the
    gradients and the activations as if both were whole at once, where backward frees the
    activations as it makes the gradients, and ZeRO-3's gathered block and prefetch bucket
    as if both were full: measured 0.80-1.00 of the plan on a Xeon with AMX, 0.82-0.96 with
    oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, as on CPUs without native bf16), across
    stages, precisions and checkpointing (a 1.9 M-parameter ViT at batch 16, 64 px)."""
    import gc

    predicted, build_and_train = plan_and_step(stage, precision, checkpointing, torch.device("cpu"),
                                               dict(patch_size=16, embed_dim=192, depth=4, num_heads=3), 64, 16)
    gc.collect()
    measured = peak_tensor_bytes(build_and_train)
    gc.collect()
    assert 0.75 * predicted <= measured <= 1.15 * predicted, (measured, predicted, measured / predicted)


@pytest.mark.gpu
@pytest.mark.parametrize("stage,precision,checkpointing", [c for c in CONFIGS if c[:2] != (0, "bf16")])
def test_plan_against_max_memory_allocated(world, stage, precision, checkpointing):
    """The same on a GPU, against torch.cuda.max_memory_allocated over the build and two steps
    of a DeiT-S at 224 px, batch 64 (large enough that cuBLAS's workspace and the allocator's
    rounding are noise): the band the CPU measures, until the first GPU run says otherwise."""
    import gc

    device = torch.device("cuda", torch.cuda.current_device())
    predicted, build_and_train = plan_and_step(stage, precision, checkpointing, device,
                                               dict(embed_dim=384, depth=12, num_heads=6), 224, 64)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    build_and_train()
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) - before
    gc.collect()
    torch.cuda.empty_cache()
    assert 0.75 * predicted <= measured <= 1.15 * predicted, (measured, predicted, measured / predicted)
