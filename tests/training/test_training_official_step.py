"""The training step against an independent computation written from the algorithm (docs/training.md /
the official ``train.py``), and the official defaults (prompt, clipping, precision, EMA warm-up).

The independent side builds the official 6-token prompt itself (``tokenizer("a photo of ", padding=True)``
-> <start> a photo of <end>, a stand-in id inserted before <end>), noises with diffusers' ``DDPMScheduler.
add_noise``, replaces the embedding row of S* through a forward hook on the text encoder's embeddings and runs
transformers' own ``CLIPTextModel`` forward (its causal mask, ``hidden_states[-2]``, final LayerNorm), then
the UNet's epsilon prediction and the per-image MSE. It never calls profusion_rt's training or text code.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from skimage import data as skdata

from profusion_rt.training import SubjectImageDataset, TrainConfig, Trainer
from profusion_rt.training.trainer import (
    OFFICIAL_PRETRAIN_STEPS,
    diffusion_loss,
    ema_decay_at,
    resolve_precision,
    training_prompt_ids,
)


def _independent_loss(pipe, z0, z_ref, tokens, noise, t, pad_to: int | None = None) -> torch.Tensor:
    from diffusers import DDPMScheduler

    tok = pipe.tokenizer
    pre = tok("A photo of ", padding=True, return_tensors="pt")["input_ids"].reshape(-1)
    ids = torch.cat([pre[:-1], torch.tensor([0]), pre[-1:]])  # S* goes where the 0 is
    where = len(pre) - 1
    if pad_to is not None:  # the layout of the former default, to show the check can fail
        ids = torch.cat([ids, torch.full((pad_to - len(ids),), tok.pad_token_id)])
    x_t = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(z0, noise, t)
    s_star = pipe.promptnet(z_ref, t, tokens, x_t)  # (B, 1, D)
    te = pipe.text_encoder

    def insert(module, args, output):
        out = output.expand(s_star.shape[0], -1, -1)
        return torch.cat([out[:, :where], s_star.to(out.dtype), out[:, where + 1:]], dim=1)

    handle = te.embeddings.register_forward_hook(insert)
    try:
        hidden = te(input_ids=ids[None], output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    cond = te.final_layer_norm(hidden[-1 - pipe.text_skip_layers])
    pred = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
    return ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mean()


def _trainable(pipe, mode):
    params = {f"promptnet.{k}": p for k, p in pipe.promptnet.named_parameters()}
    if mode == "customize":
        params.update({f"unet.{k}": p for k, p in pipe.unet.named_parameters()
                       if any(s in k for s in ("to_q", "to_k", "to_v"))})
    return params


@pytest.fixture(scope="module")
def batch(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    b, (c, h, w) = 2, tiny_pipe.latent_shape
    cfg = tiny_pipe.image_encoder.config
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    return {"z0": torch.randn(b, c, h, w, generator=g), "z_ref": torch.randn(b, c, h, w, generator=g),
            "tokens": torch.randn(b, tokens, cfg.hidden_size, generator=g),
            "noise": torch.randn(b, c, h, w, generator=g), "t": torch.tensor([37, 912])}


def test_the_training_prompt_is_the_official_six_tokens(tiny_pipe):
    ids, index = training_prompt_ids(tiny_pipe.tokenizer)
    tok = tiny_pipe.tokenizer
    official = tok("A photo of ", padding=True, return_tensors="pt")["input_ids"].reshape(-1)
    assert len(ids) == 6 and index == 4 == len(official) - 1
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert torch.equal(torch.cat([ids[:4], ids[5:]]), official)


@pytest.mark.parametrize("mode", ["pretrain", "customize"])
def test_loss_and_gradients_match_an_independent_computation(tiny_pipe, batch, mode):
    pipe = copy.deepcopy(tiny_pipe)
    params = _trainable(pipe, mode)
    for p in params.values():
        p.requires_grad_(True)
    ids, index = training_prompt_ids(pipe.tokenizer)
    with torch.no_grad():
        embeds = pipe.text_encoder.embeddings(input_ids=ids[None])
    ours = diffusion_loss(pipe, batch["z0"], batch["z_ref"], batch["tokens"], batch["noise"], batch["t"],
                          embeds, index)
    theirs = _independent_loss(pipe, batch["z0"], batch["z_ref"], batch["tokens"], batch["noise"], batch["t"])
    assert math.isclose(float(ours.detach()), float(theirs.detach()), rel_tol=1e-6), (float(ours.detach()), float(theirs.detach()))
    names = list(params)
    g_ours = torch.autograd.grad(ours, [params[k] for k in names])
    g_theirs = torch.autograd.grad(theirs, [params[k] for k in names])
    total = torch.cat([g.flatten() for g in g_theirs]).norm()
    assert total > 0
    for k, a, b in zip(names, g_ours, g_theirs):
        assert (a - b).norm() <= 1e-4 * total + 1e-5 * b.norm(), k

    # the check has teeth: the former 77-token padded prompt gives other gradients
    padded = _independent_loss(pipe, batch["z0"], batch["z_ref"], batch["tokens"], batch["noise"], batch["t"], 77)
    g_padded = torch.autograd.grad(padded, [params[k] for k in names])
    diff = torch.cat([(a - b).flatten() for a, b in zip(g_padded, g_theirs)]).norm()
    assert diff > 1e-2 * total


def test_trainer_uses_the_public_loss(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    dataset = SubjectImageDataset([skdata.chelsea(), skdata.coffee()], pipe.resolution)
    trainer = Trainer(pipe, dataset, TrainConfig(batch_size=2))
    drawn = trainer.draw_batch()
    assert tuple(trainer.prompt_embeds.shape[:2]) == (1, 6)
    with torch.no_grad():
        a = trainer.loss(drawn)
        b = _independent_loss(pipe, drawn["latents"], drawn["z_ref"], drawn["tokens"], drawn["noise"], drawn["t"])
    assert math.isclose(float(a), float(b), rel_tol=1e-6)


def test_official_defaults():
    pre, cust = TrainConfig(), TrainConfig.customization()
    assert (pre.max_grad_norm, pre.clip_scope, pre.batch_size, pre.learning_rate) == (1.0, "promptnet", 8, 2e-5)
    assert (cust.max_grad_norm, cust.batch_size, cust.learning_rate) == (None, 4, 2e-5)
    assert pre.precision == cust.precision == "auto"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    assert OFFICIAL_PRETRAIN_STEPS == 80_000
    from profusion_rt.training import cli

    assert cli.OFFICIAL_PRETRAIN_STEPS == OFFICIAL_PRETRAIN_STEPS
    # diffusers EMAModel (use_ema_warmup=False) of the official code: 0, then (1 + k) / (10 + k), capped
    assert [ema_decay_at(n, 0.9999) for n in (1, 2, 3)] == [0.0, 2 / 11, 3 / 12]
    assert ema_decay_at(100_000, 0.9999) == 0.9999


def test_ema_warm_up_and_clipping_scope(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    dataset = SubjectImageDataset([skdata.chelsea(), skdata.coffee()], pipe.resolution)
    config = TrainConfig.customization(batch_size=1, learning_rate=1e-3, ema_decay=0.9, max_grad_norm=1e-6)
    trainer = Trainer(pipe, dataset, config)
    promptnet_ids = {id(p) for p in pipe.promptnet.parameters()}
    assert {id(p) for p in trainer.clip_params} == promptnet_ids  # official scope: PromptNet only
    trainer.train_step()
    pn = [p.grad for p in pipe.promptnet.parameters()]
    assert torch.cat([g.flatten() for g in pn]).norm() <= 1.01e-6  # clipped
    qkv = [p.grad for k, p in trainer.params.items() if k.startswith("unet.")]
    assert torch.cat([g.flatten() for g in qkv]).norm() > 1e-4  # not clipped
    after_one = {k: p.detach().clone() for k, p in trainer.params.items()}
    assert all(torch.equal(trainer.ema[k], after_one[k]) for k in after_one)  # decay 0 at the first update
    trainer.train_step()
    for k, p in trainer.params.items():
        expected = after_one[k] + (1 - 2 / 11) * (p.detach() - after_one[k])
        torch.testing.assert_close(trainer.ema[k], expected, rtol=1e-6, atol=1e-7, msg=k)

    everything = Trainer(copy.deepcopy(tiny_pipe), dataset,
                         TrainConfig.customization(batch_size=1, max_grad_norm=1.0, clip_scope="trainable"))
    assert len(everything.clip_params) == len(everything.params)
