"""Models through timm's registry: exact parameter counts (docs/DESIGN.md), heads, teacher loading."""
import pytest
import timm
import torch

from fastdeit.models import (CheckpointMismatchError, ModelConfig, TeacherConfig, build_student, compile_kwargs,
                             compile_mode_for,
                             build_teacher, count_params, eval_heads)
from fastdeit.weights import load_weights

# The exact counts from the paper's released models (docs/DESIGN.md), at 1000 classes.
PARAMS = {
    ("deit_tiny_patch16_224", 224): 5_717_416,
    ("deit_small_patch16_224", 224): 22_050_664,
    ("deit_base_patch16_224", 224): 86_567_656,
    ("deit_base_patch16_384", 384): 86_859_496,
    ("deit_tiny_distilled_patch16_224", 224): 5_910_800,
    ("deit_small_distilled_patch16_224", 224): 22_436_432,
    ("deit_base_distilled_patch16_224", 224): 87_338_192,
}


@pytest.mark.parametrize("name,img", list(PARAMS))
def test_param_counts(name, img):
    model = build_student(ModelConfig(name=name), img_size=img, num_classes=1000)
    assert count_params(model) == PARAMS[(name, img)]


def tiny(distilled=True, **kw):
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    cfg = ModelConfig(name=name, drop_path=0.1, kwargs=dict(patch_size=8, embed_dim=48, depth=3, num_heads=3, **kw))
    return build_student(cfg, img_size=32, num_classes=7)


def test_drop_path_linear_over_depth():
    model = tiny()
    rates = [0.0 if not hasattr(b.drop_path1, "drop_prob") else b.drop_path1.drop_prob for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])


def test_distilled_heads():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(4, 3, 32, 32)
    cls, dist = model(x)                       # training: both heads
    assert cls.shape == dist.shape == (4, 7)
    model.eval()
    with torch.no_grad():
        avg = model(x)                         # eval: their average (timm)
        heads = eval_heads(model, x)
    torch.testing.assert_close(heads["avg"], avg)
    torch.testing.assert_close(heads["avg"], (heads["cls"] + heads["dist"]) / 2)
    assert not torch.allclose(heads["cls"], heads["dist"])


def test_class_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="num_classes=10 but the training folder has 7"):
        build_student(ModelConfig(name="resnet10t", num_classes=10), img_size=32, num_classes=7)


def test_teacher_from_file_frozen_channels_last(tmp_path):
    ref = timm.create_model("resnet10t", num_classes=5).eval()
    path = tmp_path / "teacher.pth"
    torch.save({"model": ref.state_dict()}, path)   # the DeiT reference nests under 'model'
    teacher = build_teacher(TeacherConfig(name="resnet10t", weights=str(path), dtype="fp32"), 5, torch.device("cpu"))
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert teacher.module.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)


def test_teacher_mismatch_names_file_and_keys(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"wrong\.pth.*shape mismatch: fc\.bias: file \(3,\) vs model \(5,\), fc\.weight: file \(3, 512\) vs model \(5, 512\)"):
        build_teacher(TeacherConfig(name="resnet10t", weights=str(path)), 5, torch.device("cpu"))
    torch.save({"fc.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointMismatchError, match="missing: .*unexpected|missing:"):
        load_weights(timm.create_model("resnet10t", num_classes=5), str(path), "x")


def test_teacher_needs_weights():
    with pytest.raises(ValueError, match="teacher.weights"):
        build_teacher(TeacherConfig(weights=None), 10, torch.device("cpu"))


def test_compile_settings():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_mode_for("auto", "default", cpu) is None                 # eager on CPU (measured)
    assert compile_mode_for("auto", "max-autotune", cuda) == "max-autotune"
    assert compile_mode_for(True, "default", cpu) == "default"
    assert compile_mode_for(False, "default", cuda) is None
    # static graphs, one per training size (timm's PatchEmbed pins H and W: dynamic is wasted)
    assert compile_kwargs("default") == {"dynamic": False}
    assert compile_kwargs("max-autotune") == {"dynamic": False, "mode": "max-autotune"}


def test_compiled_teacher_keeps_its_plain_module(tmp_path):
    """teacher.compile wraps the forward beside the module: the module FLOP counting and
    anything else reads stays the plain timm one (no _orig_mod. keys)."""
    ref = timm.create_model("resnet10t", num_classes=5)
    path = tmp_path / "teacher.pth"
    torch.save(ref.state_dict(), path)
    teacher = build_teacher(TeacherConfig(name="resnet10t", weights=str(path), compile=True), 5, torch.device("cpu"))
    assert isinstance(teacher.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert teacher.forward._orig_mod is teacher.module
    assert list(teacher.module.state_dict()) == list(ref.state_dict())
    eager = build_teacher(TeacherConfig(name="resnet10t", weights=str(path), compile=False), 5, torch.device("cpu"))
    assert eager.forward is eager.module


def test_uniform_drop_path_like_the_deit3_reference():
    """DeiT III's vit_models drops every block at the same rate; timm ramps it linearly."""
    from timm.layers import DropPath

    cfg = ModelConfig(name="deit3_small_patch16_224", drop_path=0.05, drop_path_mode="uniform",
                      kwargs=dict(depth=3, init_values=1e-4))
    model = build_student(cfg, 224, 10)
    rates = [m.drop_prob for b in model.blocks for m in (b.drop_path1, b.drop_path2)]
    assert all(isinstance(m, DropPath) for b in model.blocks for m in (b.drop_path1, b.drop_path2))
    assert rates == [0.05] * 6
    assert float(model.blocks[0].ls1.gamma[0]) == pytest.approx(1e-4)     # the reference's LayerScale init
    linear = build_student(ModelConfig(name="deit3_small_patch16_224", drop_path=0.05, kwargs=dict(depth=3)), 224, 10)
    assert [getattr(b.drop_path1, "drop_prob", 0.0) for b in linear.blocks] == pytest.approx([0.0, 0.025, 0.05])
    with pytest.raises(ValueError, match="drop_path_mode=uniform"):
        build_student(ModelConfig(name="resnet10t", drop_path_mode="uniform"), 32, 10)
