"""The DeepSpeed config derived from ours, and batch-size consistency."""
import pytest

from fastdeit.engine import EngineConfig, deepspeed_config, resolve_batch


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
    with pytest.raises(ValueError, match="zero_stage must be 0, 1 or 2"):
        deepspeed_config(EngineConfig(zero_stage=3), 1)
