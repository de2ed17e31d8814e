"""Teachers from other trainers' checkpoints: timm's train.py (written here by timm's own
CheckpointSaver) and DeiT's main.py (its dict of model, model_ema, optimizer, lr_scheduler,
scaler, epoch and args). Both pickle an argparse.Namespace, which torch's weights_only loading
refuses unless allowed; we allow exactly that, and timm's own loader is the reference for which
weights each key selects."""
import argparse
import pathlib
import pickle

import pytest
import timm
import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, get_state_dict

from fastdeit.errors import WeightsError
from fastdeit.models import TeacherConfig, build_teacher
from fastdeit.weights import read_state_dict

CPU = torch.device("cpu")


def trained(num_classes=5):
    """resnet10t after one AdamW step, and an EMA of it that differs from it."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=num_classes)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    optimizer.step()
    ema.update(model)
    return model, ema, optimizer


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("timm")
    model, ema, optimizer = trained()
    args = argparse.Namespace(model="resnet10t", lr=1e-2, epochs=1, device="cpu", mean=None)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, amp_scaler=NativeScaler(),
                            checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=0, metric=42.0)
    return folder / "last.pth.tar"


@pytest.fixture(scope="module")
def deit_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("deit") / "checkpoint.pth"
    model, ema, optimizer = trained()
    scheduler = CosineLRScheduler(optimizer, t_initial=300, warmup_t=5, warmup_lr_init=1e-6)
    args = argparse.Namespace(model="resnet10t", batch_size=64, lr=5e-4, model_ema=True, data_path="/data",
                              input_size=224, distillation_type="none", teacher_path="")
    # DeiT main.py's checkpoint dict, entry for entry.
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 0, "model_ema": get_state_dict(ema),
                "scaler": NativeScaler().state_dict(), "args": args}, path)
    return path


def reference(path, use_ema):
    """The weights timm's own checkpoint loader picks (it trusts the file: weights_only=False)."""
    model = timm.create_model("resnet10t", num_classes=5)
    timm.models.load_checkpoint(model, str(path), use_ema=use_ema, weights_only=False)
    return model.state_dict()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_plain_weights_only_loading_refuses_them(timm_checkpoint, deit_checkpoint):
    # What the issue saw: an UnpicklingError that doesn't name the file.
    for path in (timm_checkpoint, deit_checkpoint):
        with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
            torch.load(path, weights_only=True)


@pytest.mark.parametrize("kind", ["timm", "deit"])
@pytest.mark.parametrize("ema", [False, True])
def test_teacher_from_training_checkpoint(kind, ema, timm_checkpoint, deit_checkpoint):
    path = timm_checkpoint if kind == "timm" else deit_checkpoint
    key = None if not ema else ("state_dict_ema" if kind == "timm" else "model_ema")
    teacher = build_teacher(TeacherConfig(name="resnet10t", weights=str(path), weights_key=key, dtype="fp32",
                                          channels_last=False), 5, CPU)
    expected = reference(path, use_ema=ema)
    assert_same(teacher.module.state_dict(), expected)
    if not ema:   # the default is the non-EMA weights, and they do differ from the EMA ones
        assert not torch.equal(expected["fc.weight"], reference(path, use_ema=True)["fc.weight"])


def test_explicit_non_ema_keys(timm_checkpoint, deit_checkpoint):
    assert_same(read_state_dict(str(timm_checkpoint), "state_dict"), read_state_dict(str(timm_checkpoint)))
    assert_same(read_state_dict(str(deit_checkpoint), "model"), read_state_dict(str(deit_checkpoint)))


def test_a_missing_key_names_the_file_and_what_it_holds(deit_checkpoint):
    with pytest.raises(WeightsError, match=rf"{deit_checkpoint}: no state_dict under weights_key "
                                           r"'state_dict_ema'; the file holds entries \['lr_scheduler', 'model', "
                                           r"'model_ema', 'optimizer', 'scaler'\]"):
        read_state_dict(str(deit_checkpoint), "state_dict_ema")


def test_other_pickled_objects_stay_refused_and_the_file_is_named(tmp_path):
    path = tmp_path / "sneaky.pth"
    torch.save({"model": timm.create_model("resnet10t", num_classes=5).state_dict(),
                "extra": pathlib.PurePosixPath("/data")}, path)
    with pytest.raises(WeightsError, match=rf"{path}: refusing to unpickle pathlib.PurePosixPath"):
        read_state_dict(str(path))


def test_unreadable_and_missing_files_are_named(tmp_path):
    torn = tmp_path / "torn.pth"
    torch.save(timm.create_model("resnet10t", num_classes=5).state_dict(), torn)
    torn.write_bytes(torn.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=rf"{torn}: cannot read weights"):
        read_state_dict(str(torn))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match=rf"{garbage}: not a readable PyTorch weights file"):
        read_state_dict(str(garbage))
    with pytest.raises(WeightsError, match="nope.pth does not exist"):
        read_state_dict(str(tmp_path / "nope.pth"))
    empty = tmp_path / "optimizer_only.pth"
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "epoch": 1}, empty)
    with pytest.raises(WeightsError, match=r"optimizer_only.pth: does not hold a state_dict of tensors "
                                           r"\(its entries: \['optimizer'\]"):
        read_state_dict(str(empty))
