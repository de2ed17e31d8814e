"""Strict config loading: unknown keys and wrong types are errors naming the key and the file."""
import glob

import pytest

from fastdeit.config import ConfigError, load_config, parse_override, save_config, to_dict


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*optim\.weight_decy.*did you mean 'weight_decay'"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        load_config(write(tmp_path, "optimizer: {lr: 1}\n"))


@pytest.mark.parametrize("text,match", [
    ("optim: {lr: fast}", "optim.lr: expected a number"),
    ("engine: {zero_stage: '1'}", "engine.zero_stage: expected an integer"),
    ("logging: {progress: sometimes}", "logging.progress: 'sometimes' is not one of"),
    ("data: {scale: [0.08]}", "data.scale: expected 2 values"),
    ("trainer: {epochs: true}", "trainer.epochs: expected an integer"),
    ("model: 3", "model: expected a mapping"),
])
def test_wrong_types(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_yaml_exponent_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "optim: {lr: 5e-4}\n"))
    assert cfg.optim.lr == 5e-4


def test_overrides():
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("data.root=/data/imagenet") == (["data", "root"], "/data/imagenet")
    assert parse_override("data.scale=[0.2,1]") == (["data", "scale"], [0.2, 1])
    cfg = load_config("configs/deit_b.yaml", ["optim.lr=1e-3", "data.root=/x", "teacher.weights=null"])
    assert (cfg.optim.lr, cfg.data.root, cfg.teacher.weights) == (1e-3, "/x", None)
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config("configs/deit_b.yaml", ["optim.lrr=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/deit_s.yaml", ["optim.lr=2e-3"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


SHIPPED = sorted(glob.glob("configs/**/*.yaml", recursive=True))


def test_every_config_folder_is_checked():
    assert "configs/finetune/cifar10.yaml" in SHIPPED and "configs/deit_b.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_load(path):
    load_config(path)


# The DeiT authors' fine-tuning settings (sources in each config's header): optimizer, lr per
# 512 images (main.py's --lr), weight decay, epochs, erasing, drop path; and the paper's DeiT-B
# top-1 (transfer table) quoted in the header.
FINETUNE = {
    "cifar10": ("sgd", 0.01, 1e-4, 1000, 0.0, 0.0, "99.1"),        # deit#45
    "cars": ("sgd", 0.01, 1e-4, 1000, 0.0, 0.0, "92.1"),           # deit#45
    "flowers102": ("sgd", 0.01, 1e-4, 1000, 0.0, 0.0, "98.4"),     # deit#45's Cars recipe
    "cifar100": ("adamw", 5e-6, 0.05, 1000, 0.25, 0.1, "90.8"),    # dino#144, deit#117
    "inat2018": ("adamw", 5e-5, 0.05, 360, 0.1, 0.1, "73.2"),      # deit#105, deit#141
    "inat2019": ("adamw", 5e-5, 0.05, 360, 0.1, 0.1, "77.7"),
}


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetune_configs_match_their_sources(name):
    path = f"configs/finetune/{name}.yaml"
    c = load_config(path)
    opt, lr, wd, epochs, erase, drop_path, top1 = FINETUNE[name]
    assert (c.optim.name, c.optim.lr, c.optim.lr_base_batch, c.optim.weight_decay) == (opt, lr, 512, wd)
    assert (c.trainer.epochs, c.mixing.erase_prob, c.model.drop_path) == (epochs, erase, drop_path)
    assert (c.engine.global_batch_size, c.data.img_size, c.data.eval_crop_pct) == (768, 224, 0.875)
    assert (c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr) == (5, 1e-6, 1e-5)
    assert (c.mixing.mixup_alpha, c.mixing.cutmix_alpha, c.mixing.label_smoothing, c.data.repeated_aug) == (0.8, 1.0, 0.1, 3)
    assert c.model.name == "deit_base_patch16_224" and c.distill.type == "none"
    assert c.model.init_weights == "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"
    assert c.data.root == f"data/{name}" and c.ema.decay == 0.99996
    assert f"DeiT-B {top1}% top-1" in open(path).read()
    if opt == "sgd":
        assert c.optim.momentum == 0.9


@pytest.mark.parametrize("path,model", [
    ("configs/deit_ti.yaml", "deit_tiny_distilled_patch16_224"),
    ("configs/deit_s.yaml", "deit_small_distilled_patch16_224"),
    ("configs/deit_b.yaml", "deit_base_distilled_patch16_224"),
])
def test_recipe_configs_match_the_paper(path, model):
    c = load_config(path)
    assert c.model.name == model and c.teacher.name == "regnety_160"
    assert (c.optim.lr, c.optim.lr_base_batch, c.optim.weight_decay, c.optim.eps) == (5e-4, 512, 0.05, 1e-8)
    assert (c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr) == (5, 1e-6, 1e-5)
    assert (c.trainer.epochs, c.engine.global_batch_size, c.engine.gradient_clipping) == (300, 1024, 0.0)
    assert (c.model.drop_path, c.model.drop) == (0.1, 0.0)
    assert (c.mixing.mixup_alpha, c.mixing.cutmix_alpha, c.mixing.switch_prob, c.mixing.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert (c.mixing.erase_prob, c.mixing.erase_mode, c.mixing.erase_count) == (0.25, "pixel", 1)
    assert (c.data.scale, c.data.hflip, c.data.rand_augment, c.data.repeated_aug) == ((0.08, 1.0), 0.5, "rand-m9-mstd0.5-inc1", 3)
    assert (c.distill.type, c.distill.alpha, c.distill.tau) == ("hard", 0.5, 1.0)
    assert int(c.data.img_size / c.data.eval_crop_pct) == 256
