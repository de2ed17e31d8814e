"""Activation checkpointing (model.grad_checkpointing, timm's set_grad_checkpointing applied by
fastdeit.engine): the same losses and gradients as without it, fewer saved bytes, traceable
by torch.compile in one graph, and through launch/train.py the same losses bit for bit."""
import pytest
import timm
import torch

from fastdeit.engine import set_grad_checkpointing
from fastdeit.errors import ConfigError
from fastdeit.preemption import Stopped
from tests.savedbytes import saved_tensor_bytes

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=4)


def distilled(checkpointing):
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_distilled_patch16_224", drop_path_rate=0.2, **TINY)
    m.set_distilled_training(True)
    set_grad_checkpointing(m, checkpointing)
    return m.train()


def step(model, images):
    """(loss, gradients, bytes autograd saved for the backward): storages counted once,
    parameters not counted."""
    torch.manual_seed(1)                      # the same drop-path masks in both runs
    with saved_tensor_bytes(model) as saved:
        cls, dist = model(images)
    loss = torch.nn.functional.cross_entropy(cls, torch.arange(4)) + dist.logsumexp(1).mean()
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], sum(saved.values())


def test_same_losses_and_gradients_with_fewer_saved_bytes():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    loss0, grads0, bytes0 = step(distilled(False), images)
    loss1, grads1, bytes1 = step(distilled(True), images)
    assert torch.equal(loss0, loss1)                                   # fp32 on CPU: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    # Without it the two blocks' tensors are saved; with it only what lies outside them
    # (the patch embedding, the final norm, the heads) and each block's input.
    assert bytes1 < bytes0 / 3, (bytes0, bytes1)


def test_compiles_in_one_graph_with_the_distillation_head():
    """torch.compile traces timm's (non-reentrant) checkpoints: fullgraph=True has no graph
    break; the compiled step's loss equals eager's. DeepSpeed's checkpoint would break the
    graph at every block (fastdeit.engine.set_grad_checkpointing)."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    eager = step(distilled(True), images)[0]
    torch._dynamo.reset()
    compiled = torch.compile(distilled(True), backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    cls, dist = compiled(images)
    loss = torch.nn.functional.cross_entropy(cls, torch.arange(4)) + dist.logsumexp(1).mean()
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager, rtol=1e-6, atol=1e-6)


def test_refused_for_a_model_without_it():
    with pytest.raises(ConfigError, match="model.grad_checkpointing=true.*set_grad_checkpointing"):
        set_grad_checkpointing(torch.nn.Linear(2, 2), True)
    set_grad_checkpointing(torch.nn.Linear(2, 2), False)              # off: nothing asked of it


def test_trainer_losses_identical_with_checkpointing(dataset, tmp_path):
    """One rank, fp32, drop path, mixing and erasing on: the logged losses are the same floats
    (the trainer in this process: launch/train.py's build and fit, without the launch)."""
    from tests.launching import records, train_in_process

    common = [f"data.root={dataset}", "model.name=deit_tiny_patch16_224", "distill.type=none",
              "engine.precision=fp32", "model.drop_path=0.1", "mixing.prob=1.0", "mixing.erase_prob=0.5",
              "logging.log_every=1", "trainer.epochs=1", "trainer.stop_after_steps=3", "checkpoint.export=false"]
    runs = {}
    for on in (False, True):
        run = tmp_path / f"ckpt-{on}"
        with pytest.raises(Stopped):
            train_in_process(*common, f"trainer.run_dir={run}", f"model.grad_checkpointing={str(on).lower()}")
        runs[on] = [(r["step"], r["loss"]) for r in records(run, "step")]
    assert len(runs[False]) == 3 and runs[False] == runs[True]
