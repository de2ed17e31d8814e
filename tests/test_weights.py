"""fastdeit.weights: every weight source gives the same tensors, and fine-tuning fits them as
timm's own pretrained loading does (heads, position embedding) plus the distilled <-> plain
mapping, with one log line of what was not loaded.

No network here: the URL sources are read through torch.hub's real downloader from file://
URLs and through a monkeypatched downloader for http(s); the Hub sources (hf-hub:, timm) through
timm's real Hub reader with huggingface_hub's download function monkeypatched to hand back a
local file. timm's own loading of the same file (pretrained_cfg_overlay=dict(file=...)) is the
reference for what `timm` and the head re-initialisation must give.
"""
import argparse
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from fastdeit.errors import CheckpointMismatchError, WeightsError
from fastdeit.models import ModelConfig, TeacherConfig, build_student, build_teacher, eval_heads
from fastdeit.weights import read_state_dict

KW = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)
PLAIN, DISTILLED = "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"


def tiny(name=DISTILLED, classes=7, img=32, **cfg):
    torch.manual_seed(1)
    return build_student(ModelConfig(name=name, kwargs=KW, **cfg), img, classes)


def same(a, b, keys=None):
    keys = sorted(a) if keys is None else keys
    assert set(keys) <= set(a) and set(keys) <= set(b)
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def ref():
    return tiny().state_dict()


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """The same weights in every on-disk layout a user has."""
    d = tmp_path_factory.mktemp("sources")
    torch.save(ref, d / "bare.pth")
    torch.save(ref, d / "pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in ref.items()}, str(d / "w.safetensors"))
    args = argparse.Namespace(model=DISTILLED, lr=5e-4)
    torch.save({"model": ref, "model_ema": {k: v + 1 for k, v in ref.items()}, "epoch": 3, "args": args},
               d / "deit_main.pth")
    torch.save({"state_dict": ref, "state_dict_ema": {k: v + 1 for k, v in ref.items()}, "arch": DISTILLED,
                "args": args}, d / "timm_train.pth.tar")
    model = tiny()
    save_for_hf(model, str(d / "folder"), safe_serialization=True)                # timm's local-dir / Hub layout
    (d / "bin_folder").mkdir()
    shutil.copy(d / "pytorch_model.bin", d / "bin_folder" / "pytorch_model.bin")
    (d / "run" / "checkpoints").mkdir(parents=True)                              # a fastdeit run dir
    (d / "run" / "config.yaml").write_text("model: {}\n")
    shutil.copytree(d / "folder", d / "run" / "model")
    torch.save({k: v + 1 for k, v in ref.items()}, d / "run" / "model.pth")   # a run dir means its model/
    return d


def test_url_hash_in_the_name_is_checked(files, ref, monkeypatch, tmp_path):
    """A file named <stem>-<sha256 prefix>.pth (the DeiT release's naming) is checked on download
    by torch.hub's real downloader, here from a file:// URL."""
    import hashlib

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    data = (files / "deit_main.pth").read_bytes()
    good = tmp_path / f"deit-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    good.write_bytes(data)
    same(read_state_dict(f"file://{good}"), ref)
    bad = tmp_path / "deit-0badc0de.pth"
    bad.write_bytes(data)
    with pytest.raises(WeightsError, match=r"deit-0badc0de.pth: download failed \(RuntimeError: invalid hash value"):
        read_state_dict(f"file://{bad}")


@pytest.mark.parametrize("source,key", [
    ("bare.pth", None), ("pytorch_model.bin", None), ("w.safetensors", None), ("deit_main.pth", None),
    ("deit_main.pth", "model"), ("timm_train.pth.tar", None), ("folder", None), ("local-dir:folder", None),
    ("bin_folder", None), ("run", None), ("file://bare.pth", None), ("file://w.safetensors", None),
])
def test_every_local_source_reads_the_same_tensors(source, key, files, ref, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))          # torch.hub's cache, per test
    for prefix in ("local-dir:", "file://"):
        if source.startswith(prefix):
            source = prefix + str(files / source[len(prefix):])
            break
    else:
        source = str(files / source)
    same(read_state_dict(source, key), ref)
    # and through the student's model.init_weights (same class count: a plain load)
    same(tiny(init_weights=source, init_weights_key=key).state_dict(), ref)


def test_ema_entries_and_timm_reference(files, ref):
    """weights_key picks the EMA of either trainer's checkpoint, as timm's load_checkpoint does."""
    for name, key in (("deit_main.pth", "model_ema"), ("timm_train.pth.tar", "state_dict_ema")):
        got = read_state_dict(str(files / name), key)
        model = tiny()
        timm.models.load_checkpoint(model, str(files / name), use_ema=True, weights_only=False)
        same(got, model.state_dict())
        assert not torch.equal(got["head.weight"], ref["head.weight"])


def test_http_url_through_torch_hub(files, ref, monkeypatch, tmp_path):
    """An http(s) URL is downloaded once into torch.hub's cache (the downloader stands in for the
    network here) and read as a file; a failed download names the URL."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        shutil.copy(files / url.rsplit("/", 1)[1], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for name in ("deit_main.pth", "w.safetensors"):
        url = f"https://example.org/weights/{name}"
        same(read_state_dict(url), ref)
        same(read_state_dict(url), ref)                                  # cached: no second download
    assert calls == [("https://example.org/weights/deit_main.pth", None), ("https://example.org/weights/w.safetensors", None)]

    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"https://example.org/x/other.pth: download failed \(OSError"):
        read_state_dict("https://example.org/x/other.pth")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub's download, as timm's Hub reader calls it, serving {repo: file}."""
    import timm.models._hub as hub
    from huggingface_hub.utils import EntryNotFoundError

    served, asked = {}, []

    def download(repo_id=None, filename=None, revision=None, cache_dir=None, **kw):
        asked.append((repo_id, filename))
        if (repo_id, filename) not in served:
            raise EntryNotFoundError(f"{repo_id}/{filename}")
        return str(served[(repo_id, filename)])

    monkeypatch.setattr(hub, "hf_hub_download", download)
    return served, asked


def test_hf_hub_source(files, ref, fake_hub):
    served, asked = fake_hub
    served[("someone/tiny-deit", "model.safetensors")] = files / "folder" / "model.safetensors"
    same(read_state_dict("hf-hub:someone/tiny-deit"), ref)
    assert asked == [("someone/tiny-deit", "model.safetensors")]
    with pytest.raises(WeightsError, match="hf-hub:someone/none: cannot load"):
        read_state_dict("hf-hub:someone/none")
    with pytest.raises(WeightsError, match="weights_key='model_ema' picks an entry"):
        read_state_dict("hf-hub:someone/tiny-deit", "model_ema")


# timm's smallest registered ViT with pretrained weights on the Hub (timm/test_vit.r160_in1k): the
# same VisionTransformer class and checkpoint filter as DeiT, at 0.4 M parameters.
TIMM_NAME, TIMM_HUB = "test_vit", "timm/test_vit.r160_in1k"


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """A state_dict of test_vit at its pretrained config (1000 classes, 160 px), standing in for
    the Hub's file."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("pretrained") / "model.safetensors"
    save_file(timm.create_model(TIMM_NAME).state_dict(), str(path))
    return path


def test_timm_source_and_head_reinit_match_timms_own_loading(pretrained_file, fake_hub):
    """'timm' gives what timm.create_model(pretrained=True) loads; a student with another class
    count keeps every tensor timm's load_pretrained keeps, and a fresh head as timm does."""
    served, _ = fake_hub
    served[(TIMM_HUB, "model.safetensors")] = pretrained_file
    overlay = dict(file=str(pretrained_file))
    reference = timm.create_model(TIMM_NAME, pretrained=True, pretrained_cfg_overlay=overlay).state_dict()
    same(read_state_dict("timm", model_name=TIMM_NAME), reference)

    lines = []
    torch.manual_seed(0)
    ours = build_student(ModelConfig(name=TIMM_NAME, drop_path=0.0, init_weights="timm"), 160, 5, log=lines.append)
    torch.manual_seed(0)
    theirs = timm.create_model(TIMM_NAME, pretrained=True, num_classes=5, pretrained_cfg_overlay=overlay)
    backbone = [k for k in reference if not k.startswith("head.")]
    same(ours.state_dict(), theirs.state_dict(), backbone)
    same(ours.state_dict(), reference, backbone)
    width = reference["head.weight"].shape[1]
    assert ours.head.weight.shape == (5, width) and not torch.equal(ours.head.weight, theirs.head.weight * 0)
    assert lines == [f"model.init_weights for {TIMM_NAME} (5 classes): {len(reference) - 2} tensors loaded from timm; "
                     "not loaded (fresh init): head.bias, head.weight; dropped from the file: "
                     f"head.bias (1000,) (model (5,)), head.weight (1000, {width}) (model (5, {width}))"]


def test_distilled_into_plain_drops_the_distillation_token(ref, files):
    lines = []
    torch.manual_seed(0)
    plain = build_student(ModelConfig(name=PLAIN, kwargs=KW, init_weights=str(files / "bare.pth")), 48, 7,
                          log=lines.append)
    got = plain.state_dict()
    same(got, ref, [k for k in got if k not in ("pos_embed",)])
    assert "dist_token" not in got and "head_dist.weight" not in got
    # cls slot kept, the 4x4 grid (after the dist slot) resampled to 6x6 as the reference does
    grid = ref["pos_embed"][:, 2:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(got["pos_embed"][:, :1], ref["pos_embed"][:, :1])
    torch.testing.assert_close(got["pos_embed"][:, 1:], up.permute(0, 2, 3, 1).reshape(1, 36, 48))
    assert lines[0].endswith("not loaded (fresh init): none; dropped from the file: dist_token, head_dist.weight, "
                             "head_dist.bias, pos_embed[:, 1] (the distillation token's slot)")
    assert "resampled pos_embed (1, 17, 48) -> (1, 37, 48)" in lines[0]


def test_plain_into_distilled_starts_both_tokens_equal(tmp_path):
    plain = tiny(PLAIN).eval()
    path = tmp_path / "plain.pth"
    torch.save(plain.state_dict(), path)
    lines = []
    torch.manual_seed(5)
    model = build_student(ModelConfig(name=DISTILLED, kwargs=KW, init_weights=str(path)), 32, 7, log=lines.append)
    state = model.state_dict()
    same(state, plain.state_dict(), [k for k in plain.state_dict() if k != "pos_embed"])
    torch.testing.assert_close(state["dist_token"], state["cls_token"])
    torch.testing.assert_close(state["head_dist.weight"], state["head.weight"])
    torch.testing.assert_close(state["pos_embed"][:, 1], state["pos_embed"][:, 0])
    # Equal tokens stay equal through every block: both heads start as the pretrained head.
    heads = eval_heads(model.eval(), torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(heads["cls"], heads["dist"])
    assert "initialised from the file's: dist_token <- cls_token, pos_embed[:, 1] <- pos_embed[:, 0], " \
           "head_dist.weight <- head.weight, head_dist.bias <- head.bias; not loaded (fresh init): none" in lines[0]
    # another class count: both heads fresh, nothing derived for them
    lines.clear()
    build_student(ModelConfig(name=DISTILLED, kwargs=KW, init_weights=str(path)), 32, 3, log=lines.append)
    assert "head_dist.weight <- head.weight" not in lines[0]
    assert "not loaded (fresh init): head.bias, head.weight, head_dist.bias, head_dist.weight" in lines[0]


def test_other_mismatches_stay_errors_naming_the_keys(files, tmp_path):
    with pytest.raises(CheckpointMismatchError, match=r"bare\.pth does not match model.init_weights for "
                                                      r"deit_tiny_distilled_patch16_224 \(7 classes\): .*shape mismatch: "
                                                      r"blocks\.0\.attn\.proj\.bias: file \(48,\) vs model \(24,\)"):
        build_student(ModelConfig(name=DISTILLED, kwargs=dict(KW, embed_dim=24), init_weights=str(files / "bare.pth")),
                      32, 7)
    extra = dict(read_state_dict(str(files / "bare.pth")), **{"blocks.9.norm1.weight": torch.ones(48)})
    torch.save(extra, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: blocks\.9\.norm1\.weight"):
        tiny(init_weights=str(tmp_path / "deeper.pth"))


def test_teacher_stays_strict_about_its_head(files):
    """A teacher is loaded strictly: a fresh head would only add noise to the distillation targets."""
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch: head\.bias: file \(7,\) vs model \(5,\)"):
        build_teacher(TeacherConfig(name=DISTILLED, kwargs=dict(KW, img_size=32), weights=str(files / "folder"),
                                    compile=False, dtype="fp32"), 5, torch.device("cpu"))


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(WeightsError, match=r"is a fastdeit run without an exported model/ folder; write one with "
                                           r"python launch/export.py"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.yaml").write_text("{}\n")
        read_state_dict(str(tmp_path / "run"))
    with pytest.raises(WeightsError, match="local-dir:/nope: /nope is not a folder"):
        read_state_dict("local-dir:/nope")
    with pytest.raises(WeightsError, match="weights 'timm' need a model name"):
        read_state_dict("timm")


def test_deit3_reference_checkpoint_layout(tmp_path):
    """The DeiT III reference (models_v2.py) names LayerScale gamma_1/gamma_2 inside each block;
    timm's ViT filter renames them (as timm's deit.py asks it to) and the weights load."""
    torch.manual_seed(2)
    cfg = ModelConfig(name="deit3_small_patch16_224", drop_path=0.0, kwargs=dict(KW, init_values=1e-4))
    ref = build_student(cfg, 32, 5).state_dict()
    ref["blocks.1.ls2.gamma"] = torch.rand_like(ref["blocks.1.ls2.gamma"])
    reference_keys = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in ref.items()}
    assert "blocks.1.gamma_2" in reference_keys
    torch.save({"model": reference_keys}, tmp_path / "deit3.pth")
    import dataclasses

    same(build_student(dataclasses.replace(cfg, init_weights=str(tmp_path / "deit3.pth")), 32, 5).state_dict(), ref)
