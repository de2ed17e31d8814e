"""The DeepSpeed config derived from ours, and batch-size consistency."""
import pytest

from fastdeit import engine
from fastdeit.engine import bucket_elements, deepspeed_config, resolve_batch


def EngineConfig(**kw):
    """A config whose precision is resolved, as build.py hands it on (bf16 unless given)."""
    return engine.EngineConfig(**{"precision": "bf16", **kw})


@pytest.mark.parametrize("kw,world,expected", [
    (dict(global_batch_size=1024), 8, (1024, 128, 1)),
    (dict(global_batch_size=1024, micro_batch_size=64), 8, (1024, 64, 2)),
    (dict(global_batch_size=1024, grad_accum_steps=4), 8, (1024, 32, 4)),
    (dict(global_batch_size=1024, micro_batch_size=32, grad_accum_steps=4), 8, (1024, 32, 4)),
    (dict(global_batch_size=64), 2, (64, 32, 1)),
])
def test_resolve_batch(kw, world, expected):
    assert resolve_batch(EngineConfig(**kw), world) == expected


@pytest.mark.parametrize("kw,world,match", [
    (dict(global_batch_size=1000), 16, "not a multiple of accum x world = 16"),
    (dict(global_batch_size=1024, micro_batch_size=48), 8, "not a multiple of micro x world = 384"),
    (dict(global_batch_size=1024, micro_batch_size=32, grad_accum_steps=2), 8, "micro x accum x world = 512 != global"),
    (dict(global_batch_size=0), 1, "positive"),
])
def test_inconsistent_batches_are_errors(kw, world, match):
    with pytest.raises(ValueError, match=match):
        resolve_batch(EngineConfig(**kw), world)


def test_deepspeed_dict():
    ds = deepspeed_config(EngineConfig(global_batch_size=1024, zero_stage=2), 8)
    assert ds["train_batch_size"] == 1024 and ds["train_micro_batch_size_per_gpu"] == 128
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0            # DeiT clips nothing; DS defaults to 1.0
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}   # no host sync per step
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["compute_grad_norm"] is False          # nothing to clip
    assert deepspeed_config(EngineConfig(zero_stage=1, gradient_clipping=1.0), 1)["zero_optimization"]["compute_grad_norm"]
    assert "compute_grad_norm" not in deepspeed_config(EngineConfig(zero_stage=0), 1)["zero_optimization"]
    assert ds["timers"]["throughput"]["synchronized"] is False
    ds = deepspeed_config(EngineConfig(precision="fp32", deepspeed={"zero_optimization": {"reduce_bucket_size": 1}}), 1)
    assert ds["bf16"] == {"enabled": False, "check_grad_overflow": False}
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": False, "contiguous_gradients": True,
                                       "compute_grad_norm": False, "reduce_bucket_size": 1}
    # overlap_comm costs a torch.cuda.synchronize() per backward in DeepSpeed: opt-in only
    assert deepspeed_config(EngineConfig(overlap_comm=True), 2)["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(EngineConfig(zero_stage=0, overlap_comm=True), 2)["zero_optimization"]["overlap_comm"] is False
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        deepspeed_config(EngineConfig(zero_stage=-1), 1)
    # 'auto' (the default) is the hardware's call, made in build.py: never a silent fp32 here.
    assert engine.EngineConfig().precision == "auto"
    with pytest.raises(ValueError, match="not resolved"):
        deepspeed_config(engine.EngineConfig(), 1)


# Exact distilled parameter counts (docs/DESIGN.md) -> elements per ZeRO bucket, by hand:
# DeiT-B a quarter of the model; DeiT-S a quarter would be under 2^24, so 2^24; DeiT-Ti the
# whole model (smaller than 2^24).
@pytest.mark.parametrize("params,expected", [
    (87_338_192, 21_834_548),
    (22_436_432, 2**24),
    (5_910_800, 5_910_800),
    (3, 4),                                      # even, for DeepSpeed's allgather alignment
    (10**10, 500_000_000),                       # never above DeepSpeed's own default
])
def test_bucket_elements(params, expected):
    assert bucket_elements(params) == expected


def test_buckets_sized_from_the_model_and_overridable():
    deit_b = 87_338_192
    for stage in (1, 2):
        zero = deepspeed_config(EngineConfig(zero_stage=stage), 8, num_params=deit_b)["zero_optimization"]
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 21_834_548
        # Even double-buffered (overlap_comm), bf16: 87 MB instead of DeepSpeed's 2 GB.
        assert 2 * zero["reduce_bucket_size"] * 2 < 0.1 * 2 * 500_000_000 * 2
    # ZeRO-0 has no buckets; without a parameter count DeepSpeed's defaults stay.
    assert "reduce_bucket_size" not in deepspeed_config(EngineConfig(zero_stage=0), 1, num_params=deit_b)["zero_optimization"]
    assert "reduce_bucket_size" not in deepspeed_config(EngineConfig(zero_stage=1), 1)["zero_optimization"]
    # engine.deepspeed wins over the sizing, key by key.
    cfg = EngineConfig(zero_stage=2, deepspeed={"zero_optimization": {"reduce_bucket_size": int(5e8)}})
    zero = deepspeed_config(cfg, 1, num_params=deit_b)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 500_000_000 and zero["allgather_bucket_size"] == 21_834_548


def test_buckets_are_deepspeeds_own_keys():
    """DeepSpeed's ZeRO config reads the sized buckets (its model forbids unknown keys, so a
    misspelt key could not pass silently)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = deepspeed_config(EngineConfig(zero_stage=2), 8, num_params=87_338_192)["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**zero)
    assert parsed.reduce_bucket_size == parsed.allgather_bucket_size == 21_834_548
    with pytest.raises(Exception):
        DeepSpeedZeroConfig(**{**zero, "reduce_bucket_sise": 1})


def test_zero3_settings_parse_and_are_sized_from_the_model():
    """Stage 3: DeepSpeed's own config model reads every key (it forbids unknown ones), the
    prefetch bucket is a tenth of ViT-L (about one of its 24 blocks, 12.6 M parameters), and
    no compute_grad_norm (DeepSpeed accepts it at stages 1/2 only)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    vit_l = 304_374_760
    zero = deepspeed_config(EngineConfig(zero_stage=3), 8, num_params=vit_l)["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**zero)
    assert parsed.stage == 3 and "compute_grad_norm" not in zero and "allgather_bucket_size" not in zero
    assert parsed.prefetch_bucket_size == vit_l // 10 and parsed.reduce_bucket_size == bucket_elements(vit_l)
    assert parsed.param_persistence_threshold == 100_000 and not parsed.gather_16bit_weights_on_model_save
    with pytest.raises(ValueError, match="engine.zero_stage must be 0, 1, 2 or 3"):
        deepspeed_config(EngineConfig(zero_stage=4), 8)


def test_lamb_is_refused_at_zero3_with_the_reason():
    from fastdeit.optim import OptimConfig, check_zero_stage

    with pytest.raises(ValueError, match="optim.name=lamb with engine.zero_stage=3: ZeRO-3 partitions every parameter"):
        check_zero_stage(OptimConfig(name="lamb"), 3)
    check_zero_stage(OptimConfig(name="lamb"), 2)
    check_zero_stage(OptimConfig(name="adamw"), 3)


def test_batch_keys_in_engine_deepspeed_are_refused():
    with pytest.raises(ValueError, match="engine.deepspeed sets train_micro_batch_size_per_gpu"):
        deepspeed_config(EngineConfig(deepspeed={"train_micro_batch_size_per_gpu": 8}), 1)


def test_bf16_at_stage_0_is_refused_on_cuda_only():
    """DeepSpeed's FP16_UnfusedOptimizer (bf16, ZeRO 0) reads one value per parameter tensor
    on the host every step (tests/test_host_syncs.py counts them on CPU): refused on CUDA with
    the fix in the message, kept on CPU and in fp32."""
    import torch

    from fastdeit.engine import check_device
    from fastdeit.errors import ConfigError

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with pytest.raises(ConfigError, match="use engine.zero_stage=1$"):
        check_device(EngineConfig(zero_stage=0), torch.bfloat16, cuda)
    check_device(EngineConfig(zero_stage=0), torch.bfloat16, cpu)
    check_device(EngineConfig(zero_stage=0), torch.float32, cuda)
    check_device(EngineConfig(zero_stage=1), torch.bfloat16, cuda)


@pytest.mark.parametrize("mode,stage,accum,refused", [
    ("reduce-overhead", 0, 2, True), ("max-autotune", 1, 4, True),
    ("reduce-overhead", 2, 2, False),           # ZeRO-2 copies gradients out during the backward
    ("reduce-overhead", 1, 1, False),           # nothing to accumulate
    ("max-autotune-no-cudagraphs", 1, 4, False), ("default", 0, 4, False), (None, 1, 4, False),
])
def test_cuda_graphs_with_gradient_accumulation_at_zero_0_1_are_refused(mode, stage, accum, refused):
    from fastdeit.engine import check_cuda_graphs
    from fastdeit.errors import ConfigError

    if refused:
        with pytest.raises(ConfigError, match=f"model.compile_mode={mode} .*grad_accum_steps={accum} at "
                                              f"engine.zero_stage={stage}"):
            check_cuda_graphs(mode, stage, accum)
    else:
        check_cuda_graphs(mode, stage, accum)


@pytest.mark.parametrize("overrides,match", [
    # model.compile auto is off on CPU, yet the GPU config it would run is refused here already
    (["model.compile_mode=reduce-overhead", "engine.grad_accum_steps=2", "engine.zero_stage=1"],
     "model.compile_mode=reduce-overhead"),
    (["optim.name=lamb", "engine.gradient_clipping=1.0"], "optim.name=lamb clips gradients itself"),
])
def test_build_refuses_before_building_anything(tmp_path, overrides, match):
    from fastdeit import distributed
    from fastdeit.build import build_trainer
    from fastdeit.config import load_config
    from fastdeit.errors import ConfigError

    cfg = load_config(None, [f"data.root={tmp_path / 'absent'}", f"trainer.run_dir={tmp_path / 'run'}",
                             "engine.global_batch_size=8", *overrides])
    env = distributed.DistEnv()
    with pytest.raises(ConfigError, match=match):
        build_trainer(cfg, env)


def test_bf16_stage_0_on_cuda_is_refused_before_the_loaders(tmp_path, monkeypatch):
    import torch

    from fastdeit import distributed
    from fastdeit.build import build_trainer
    from fastdeit.config import load_config
    from fastdeit.errors import ConfigError

    from fastdeit import precision

    monkeypatch.setattr(distributed, "device_for", lambda env: torch.device("cuda", 0))
    # The teacher's dtype (auto) asks the fake GPU whether it computes bf16: an Ampere+ answer.
    monkeypatch.setattr(precision, "cuda_bf16", lambda device: precision.Bf16Support(True, "(fake) computes bf16"))
    cfg = load_config(None, [f"data.root={tmp_path / 'absent'}", f"trainer.run_dir={tmp_path / 'run'}",
                             "engine.zero_stage=0", "engine.precision=bf16"])
    env = distributed.DistEnv()
    with pytest.raises(ConfigError, match="engine.zero_stage=0 with bf16 on CUDA"):
        build_trainer(cfg, env)
