"""Checkpoints: Ctrl-C saves one, resuming gives exactly the uninterrupted run; settings, base and data are
checked; files are never half-written."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from skimage import data as skdata

from profusion_rt.core.errors import OutputPathError
from profusion_rt.training import SubjectImageDataset, TrainConfig, Trainer
from profusion_rt.training.errors import CheckpointError
from profusion_rt.core.safeio import read, save_atomic

CONFIG = TrainConfig.customization(batch_size=2, learning_rate=1e-3, ema_decay=0.99)


@pytest.fixture(scope="module")
def dataset():
    return SubjectImageDataset([skdata.chelsea(), skdata.coffee(), skdata.rocket()], 256)


def test_ctrl_c_then_resume_equals_uninterrupted_run(tiny_pipe, dataset, tmp_path):
    straight = Trainer(copy.deepcopy(tiny_pipe), dataset, CONFIG)
    reference = straight.run(5, progress=False)

    def ctrl_c_after_step_3(trainer, loss):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    previous_handler = signal.getsignal(signal.SIGINT)
    first = Trainer(copy.deepcopy(tiny_pipe), dataset, CONFIG)
    stopped = first.run(5, checkpoint_dir=tmp_path, callback=ctrl_c_after_step_3, progress=False)
    assert signal.getsignal(signal.SIGINT) is previous_handler
    assert stopped.interrupted and stopped.step == 3
    assert stopped.checkpoint == tmp_path / "step-0000003.safetensors" and stopped.checkpoint.is_file()
    assert stopped.losses == reference.losses[:3]

    resumed = Trainer(copy.deepcopy(tiny_pipe), dataset, CONFIG)
    assert resumed.load_checkpoint(tmp_path) == 3  # the folder's latest checkpoint
    finished = resumed.run(5, progress=False)
    assert finished.losses == reference.losses  # bitwise: the next losses match exactly
    for key, param in straight.params.items():
        assert torch.equal(param, resumed.params[key]), key
        assert torch.equal(straight.ema[key], resumed.ema[key]), key
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())

    # a checkpoint only resumes the run it belongs to
    with pytest.raises(CheckpointError, match="learning_rate=0.001"):
        Trainer(copy.deepcopy(tiny_pipe), dataset, TrainConfig.customization(
            batch_size=2, learning_rate=2e-3, ema_decay=0.99)).load_checkpoint(stopped.checkpoint)
    with pytest.raises(CheckpointError, match="other training images"):
        Trainer(copy.deepcopy(tiny_pipe), SubjectImageDataset([skdata.astronaut()], 256), CONFIG).load_checkpoint(
            stopped.checkpoint)
    other_base = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        other_base.promptnet.conv_in.bias.add_(1e-3)
    with pytest.raises(CheckpointError, match="another base model"):
        Trainer(other_base, dataset, CONFIG).load_checkpoint(stopped.checkpoint)


def test_checkpoint_files_are_written_atomically(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "step-0000001.safetensors"
    save_atomic(target, {"w": torch.ones(3)}, {"format": "x"})
    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt  # e.g. Ctrl-C while the new file is being written

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(target, {"w": torch.zeros(3)}, {"format": "x"})
    tensors, metadata = read(target)
    assert torch.equal(tensors["w"], torch.ones(3)) and metadata == {"format": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary file left
    with pytest.raises(OutputPathError):
        save_atomic(target / "below-a-file", {"w": torch.ones(1)}, {})


def test_missing_or_foreign_checkpoint(tmp_path):
    from profusion_rt.training.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    save_atomic(tmp_path / "step-0000001.safetensors", {"w": torch.ones(1)}, {"format": "other"})
    with pytest.raises(CheckpointError, match="not a profusion-rt training checkpoint"):
        load_checkpoint(tmp_path)
