"""Customization outputs on the tiny preset: only the intended tensors change, and base + delta equals the
full customized model; delta checks (another base, other shapes, foreign files) and hot swapping."""

from __future__ import annotations

import copy

import pytest
import torch

from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.training import (
    TrainConfig,
    apply_delta,
    base_fingerprint,
    customize,
    extract_delta,
    load_delta,
)
from profusion_rt.core.errors import DeltaError, DeltaMismatchError
from profusion_rt.models.delta import Delta, delta_parameters, is_attention_qkv


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v for net, module in pipe.networks().items() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def customized(tiny_pipe, astronaut, tmp_path_factory):
    """A 2-step customization (batch 2, 3 augmentations) of a copy of the shared tiny pipeline, with outputs."""
    pipe = copy.deepcopy(tiny_pipe)
    out = tmp_path_factory.mktemp("customize") / "out"
    result = customize(pipe, astronaut, out, steps=2, config=TrainConfig.customization(batch_size=2),
                       num_augmentations=3, progress=False)
    return pipe, result


def test_customization_changes_only_promptnet_and_qkv(tiny_pipe, customized):
    pipe, _ = customized
    before, after = _state(tiny_pipe), _state(pipe)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    intended = {k for k in before if k.startswith("promptnet.") or (k.startswith("unet.") and is_attention_qkv(k))}
    assert changed <= intended, f"unexpected changes: {sorted(changed - intended)[:5]}"
    assert changed == intended  # AdamW's decoupled weight decay moves every trainable (non-zero) tensor
    assert any(".attn1.to_q." in k for k in changed) and any(".attn2.to_v." in k for k in changed)
    assert all(not p.requires_grad for p in pipe.unet.parameters())  # frozen again after training


def test_base_plus_delta_equals_full_model(tiny_pipe, customized):
    pipe, result = customized
    assert result.model_dir.name == "model" and result.delta_path.name == "subject.delta.safetensors"
    full = ProFusionPipeline.from_pretrained(result.model_dir)
    delta = load_delta(result.delta_path)
    assert set(delta.tensors) == set(delta_parameters(tiny_pipe))
    assert delta.base_fingerprint == base_fingerprint(tiny_pipe) == result.base_fingerprint
    assert delta.metadata["format"] == "profusion-rt-delta" and delta.metadata["dtype"] == "float32"
    rebuilt = apply_delta(copy.deepcopy(tiny_pipe), delta)
    want, got, trained = _state(full), _state(rebuilt), _state(pipe)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert all(torch.equal(trained[k], got[k]) for k in want)


def test_delta_for_another_base_is_refused(tiny_pipe, customized):
    _, result = customized
    delta = load_delta(result.delta_path)
    other = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        other.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight[0, 0] += 1e-3
    before = _state(other)
    with pytest.raises(DeltaMismatchError, match="another base model"):
        apply_delta(other, delta)
    assert all(torch.equal(before[k], v) for k, v in _state(other).items())  # nothing copied

    key = next(k for k, v in delta.tensors.items() if v.ndim > 1)
    reshaped = Delta({**delta.tensors, key: delta.tensors[key].reshape(-1)}, delta.base_fingerprint)
    with pytest.raises(DeltaMismatchError, match=key):
        apply_delta(copy.deepcopy(tiny_pipe), reshaped)
    fewer = Delta({k: v for k, v in delta.tensors.items() if k != key}, delta.base_fingerprint)
    with pytest.raises(DeltaMismatchError, match="lacks 1"):
        apply_delta(copy.deepcopy(tiny_pipe), fewer)


def test_delta_files_are_checked(tmp_path, customized):
    _, result = customized
    with pytest.raises(DeltaError, match="does not exist"):
        load_delta(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DeltaError, match="cannot read"):
        load_delta(tmp_path / "junk.safetensors")
    checkpoint_like = result.model_dir / "promptnet" / "model.safetensors"
    with pytest.raises(DeltaError, match="not a profusion-rt delta"):
        load_delta(checkpoint_like)


def test_hot_swap_in_place(tiny_pipe, customized):
    _, result = customized
    pipe = copy.deepcopy(tiny_pipe)
    restore = extract_delta(pipe, base_fingerprint(pipe))
    storage = {k: p.data_ptr() for k, p in delta_parameters(pipe).items()}
    subject = load_delta(result.delta_path)
    apply_delta(pipe, subject)
    apply_delta(pipe, subject.to(dtype=torch.float16))  # the remembered base fingerprint allows the swap
    apply_delta(pipe, restore)
    assert {k: p.data_ptr() for k, p in delta_parameters(pipe).items()} == storage  # same buffers
    base = _state(tiny_pipe)
    assert all(torch.equal(base[k], v) for k, v in _state(pipe).items())
