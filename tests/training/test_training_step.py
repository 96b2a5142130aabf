"""The training step: gradient checkpointing changes memory, not results; random draws are seeded."""

from __future__ import annotations

import copy

import pytest
import torch
from skimage import data as skdata

from profusion_rt.training import SubjectImageDataset, TrainConfig, Trainer


@pytest.fixture(scope="module")
def dataset():
    return SubjectImageDataset([skdata.chelsea(), skdata.coffee()], 256)


def _grads(pipe, dataset, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = Trainer(copy.deepcopy(pipe), dataset,
                      TrainConfig.customization(batch_size=2, gradient_checkpointing=checkpointing))
    loss = trainer.loss(trainer.draw_batch())
    loss.backward()
    return float(loss.detach()), {k: p.grad for k, p in trainer.params.items()}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipe, dataset):
    loss_plain, plain = _grads(tiny_pipe, dataset, False)
    loss_ckpt, ckpt = _grads(tiny_pipe, dataset, True)
    assert loss_plain == loss_ckpt
    assert plain.keys() == ckpt.keys()
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-4, atol=1e-7, msg=key)


def test_draws_follow_the_seed(tiny_pipe, dataset):
    pipe = copy.deepcopy(tiny_pipe)

    def draws(seed):
        trainer = Trainer(pipe, dataset, TrainConfig(batch_size=2, seed=seed))
        return [trainer.draw_batch() for _ in range(2)]

    a, b, c = draws(0), draws(0), draws(1)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["noise"], c[0]["noise"])
