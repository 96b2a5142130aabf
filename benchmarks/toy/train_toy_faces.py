"""Train the ``toy-faces`` preset from nothing on scikit-image's LFW faces and ship it (docs/toy-faces.md).

    python -m profusion_rt.benchmarks.toy.train_toy_faces [--stages vae,unet,promptnet,ship,report]

Stages (each reads the previous stage's file under ``<out>/work/`` and can be rerun alone):

1. ``vae``: the VAE (KL autoencoder, SD's loss without the GAN/LPIPS terms: L2 reconstruction + a small KL)
   on the 90 training faces and the 100 non-faces, with horizontal flips; then an exact rescaling of the
   latent space (encoder output x c, decoder input / c) so that the scaled latents have unit variance with
   the preset's scaling factor; weights rounded to float16 values (what ships).
2. ``unet``: the text-conditioned UNet (epsilon prediction, SD2's DDPM schedule) on the VAE latents: faces
   with :data:`FACE_PROMPTS`, non-faces with :data:`OTHER_PROMPTS`, 10% empty prompts (classifier-free
   guidance); EMA weights; the text tower is frozen at its seeded random init.
3. ``promptnet``: PromptNet pre-training with OUR training code (:func:`profusion_rt.training.pretrain`,
   the ProFusion loss, PromptNet initialised from the UNet's encoder half as the official code does):
   each training face and its mirror image are one subject (the reference of a face is its mirror).
4. ``ship``: every component as float16 safetensors in ``profusion_rt/data/toy-faces/``.
5. ``report``: loss curves (PNG, JSON), per-stage times, and the identity figures on the held-out faces
   (:mod:`profusion_rt.benchmarks.toy.evaluate`).

Everything is seeded (one seed per stage); on the same machine and torch build a rerun reproduces the losses
to float rounding (threads change summation order: pass the same ``--threads``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch
from profusion_rt.benchmarks.toy import faces
from profusion_rt.benchmarks.toy.evaluate import identity_figures
from safetensors.torch import load_file

from profusion_rt.core.presets import get_preset
from profusion_rt.core.safeio import save_atomic
from profusion_rt.models.factory import Components, build_components
from profusion_rt.models.text import encode_plain
from profusion_rt.models.tokenizer import tokenize_prompt, unpadded_length
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.training.data import SubjectImageDataset
from profusion_rt.training.init import promptnet_from_pipeline_unet
from profusion_rt.training.jobs import pretrain
from profusion_rt.training.trainer import TrainConfig

logger = logging.getLogger("toy-faces")

STAGES = ("vae", "unet", "promptnet", "ship", "report")
PRESET = "toy-faces"
DEFAULT_OUT = Path("benchmarks/results/toy-faces")
SHIP_PATH = Path(__file__).resolve().parents[2] / "profusion_rt" / "data" / "toy-faces" / "toy-faces.safetensors"
#: Weights seed of the networks' initialisation (text and image towers stay at it).
WEIGHTS_SEED = 0


# -- helpers ----------------------------------------------------------------------------------------------

def base_preset():
    """The toy-faces preset without its shipped weights (what training starts from)."""
    return dataclasses.replace(get_preset(PRESET), shipped_weights=None)


def fresh_components() -> Components:
    """Seeded random components; the frozen towers rounded to float16 values (so that shipping them in
    float16 is exact)."""
    c = build_components(base_preset(), seed=WEIGHTS_SEED)
    round_fp16(c.text_encoder)
    round_fp16(c.image_encoder)
    return c


@torch.no_grad()
def round_fp16(net: torch.nn.Module) -> None:
    for p in net.parameters():
        p.copy_(p.half().float())


def state(net: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in net.state_dict().items()}


def load_state(net: torch.nn.Module, path: Path) -> None:
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} threads"


def record(out: Path, stage: str, info: dict) -> None:
    """Merge ``info`` into ``<out>/training.json`` under ``stage``."""
    path = out / "training.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[stage] = info
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def training_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared pixels (N, 3, 32, 32) of the training faces and of the non-faces."""
    arrays = faces.lfw_arrays()
    return (faces.prepared(faces.images(faces.TRAIN_FACES, arrays)),
            faces.prepared(faces.images(faces.NON_FACES, arrays)))


def with_flips(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.flip(-1)])


# -- stage 1: VAE -----------------------------------------------------------------------------------------

def train_vae(out: Path, steps: int, batch: int, lr: float, kl_weight: float, seed: int) -> dict:
    c = fresh_components()
    vae = c.vae.train().requires_grad_(True)
    face_px, other_px = training_pixels()
    data = with_flips(torch.cat([face_px, other_px])) * 2.0 - 1.0
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses, recs, kls = [], [], []
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(len(data), (batch,), generator=g)
        x = data[idx]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        rec_loss = ((rec - x) ** 2).mean()
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        recs.append(float(rec_loss))
        kls.append(float(kl))
        if step % 50 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.5f (rec %.5f, kl %.3f) %.1f s", step, steps, losses[-1], recs[-1],
                        kls[-1], time.perf_counter() - start)
    seconds = time.perf_counter() - start
    vae.eval().requires_grad_(False)
    # Rescale the latent space so that scaling_factor * mean has unit variance (an exact reparametrisation).
    with torch.no_grad():
        sf = vae.config.scaling_factor
        mean = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
        c_ = 1.0 / float((mean * sf).std())
        lat = vae.config.latent_channels
        vae.quant_conv.weight[:lat] *= c_
        vae.quant_conv.bias[:lat] *= c_
        vae.quant_conv.bias[lat:] += 2.0 * math.log(c_)
        vae.post_quant_conv.weight /= c_
        round_fp16(vae)
        mean = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
        rec = torch.cat([vae.decode(vae.encode(data[i:i + 64]).latent_dist.mean).sample
                         for i in range(0, len(data), 64)])
        final_rec = float(((rec - data) ** 2).mean())
    save_atomic(out / "work" / "vae.safetensors", state(vae), {"stage": "vae"})
    return {"steps": steps, "batch": batch, "lr": lr, "kl_weight": kl_weight, "seed": seed, "seconds": seconds,
            "loss": losses, "rec": recs, "kl": kls, "latent_rescale": c_,
            "scaled_latent_std": float((mean * sf).std()), "final_rec_mse_fp16": final_rec,
            "final_rec_psnr_db": 10 * math.log10(4.0 / final_rec)}


# -- stage 2: UNet ----------------------------------------------------------------------------------------

class PlainObjective:
    """The plain text-to-image objective (MSE to the scheduler's target, epsilon or v) on the training
    pixels of ``c`` (:class:`Components`: VAE, tokenizer, frozen text tower, scheduler): faces with
    :data:`~profusion_rt.benchmarks.toy.faces.FACE_PROMPTS`, non-faces with ``OTHER_PROMPTS``, a share ``drop``
    of empty prompts (classifier-free guidance). A share ``unpadded`` of the batches sees the prompts
    unpadded, as ProFusion's training step does (:func:`~profusion_rt.training.trainer.training_prompt_ids`),
    the rest padded, as sampling does (the text tower is causal, so the first tokens are the same)."""

    def __init__(self, c: Components, drop: float = 0.1, seed: int = 2, unpadded: float = 0.5):
        face_px, other_px = training_pixels()
        px = torch.cat([with_flips(face_px), with_flips(other_px)]) * 2.0 - 1.0
        self.is_face = torch.cat([torch.ones(2 * len(face_px)), torch.zeros(2 * len(other_px))]).bool()
        prompts = ("",) + faces.FACE_PROMPTS + faces.OTHER_PROMPTS
        ids = torch.stack([tokenize_prompt(c.tokenizer, p)[0] for p in prompts])
        with torch.no_grad():
            dists = [c.vae.encode(px[i:i + 64]).latent_dist for i in range(0, len(px), 64)]
            self.mean = torch.cat([d.mean for d in dists])
            self.std = torch.cat([d.std for d in dists])
            # frozen text conditioning (P, 77, D) of each prompt, padded as the pipeline pads
            self.ctx = encode_plain(c.text_encoder, ids, c.text_skip_layers)
        self.lengths = torch.tensor([unpadded_length(c.tokenizer, row) for row in ids])
        self.alphas = c.scheduler.alphas_cumprod.float()
        self.prediction = c.scheduler.config.prediction_type
        self.sf = c.vae.config.scaling_factor
        self.drop, self.unpadded = drop, unpadded
        self.generator = torch.Generator().manual_seed(seed)

    def loss(self, unet: torch.nn.Module, batch: int) -> torch.Tensor:
        g, nf, no = self.generator, len(faces.FACE_PROMPTS), len(faces.OTHER_PROMPTS)
        idx = torch.randint(len(self.mean), (batch,), generator=g)
        face = self.is_face[idx]
        which = torch.where(face, 1 + torch.randint(nf, (batch,), generator=g),
                            1 + nf + torch.randint(no, (batch,), generator=g))
        which = torch.where(torch.rand(batch, generator=g) < self.drop, torch.zeros_like(which), which)
        z0 = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g)) * self.sf
        t = torch.randint(len(self.alphas), (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = self.alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = self.ctx[which]
        if torch.rand((), generator=g) < self.unpadded:
            cond = cond[:, : int(self.lengths[which].max())]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        target = noise if self.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0
        return ((pred - target) ** 2).mean()


def train_unet(out: Path, steps: int, batch: int, lr: float, ema_decay: float, drop: float, seed: int,
               final_lr: float = 0.05) -> dict:
    c = fresh_components()
    load_state(c.vae, out / "work" / "vae.safetensors")
    objective = PlainObjective(c, drop, seed)
    unet = c.unet.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warmup = max(steps // 20, 1)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            cosine = final_lr + (1.0 - final_lr) * 0.5 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * cosine
        loss = objective.loss(unet, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1.0 - d)
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            logger.info("unet step %d/%d loss %.4f (mean of last 100 %.4f) %.1f s", step, steps, losses[-1],
                        sum(losses[-100:]) / len(losses[-100:]), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    unet.load_state_dict(ema)
    unet.eval().requires_grad_(False)
    round_fp16(unet)
    save_atomic(out / "work" / "unet.safetensors", state(unet), {"stage": "unet"})
    return {"steps": steps, "batch": batch, "lr": lr, "final_lr_fraction": final_lr, "ema_decay": ema_decay,
            "prompt_drop": drop, "unpadded_fraction": objective.unpadded, "seed": seed,
            "seconds": seconds, "loss": losses, "prompts_face": list(faces.FACE_PROMPTS),
            "prompts_other": list(faces.OTHER_PROMPTS)}


# -- stage 3: PromptNet pre-training (our training code) ----------------------------------------------------

def base_pipeline(out: Path):
    """The pipeline after stages 1-2, with a PromptNet initialised from its UNet (official init)."""
    c = fresh_components()
    load_state(c.vae, out / "work" / "vae.safetensors")
    load_state(c.unet, out / "work" / "unet.safetensors")
    preset = base_preset()
    pipe = ProFusionPipeline.from_components(c, resolution=preset.resolution, preset=PRESET)
    pipe.promptnet = promptnet_from_pipeline_unet(pipe, seed=WEIGHTS_SEED)
    return pipe


def train_promptnet(out: Path, steps: int, batch: int, lr: float, seed: int) -> dict:
    pipe = base_pipeline(out)
    train_images = faces.images(faces.TRAIN_FACES)
    mirrored = [im.transpose(0) for im in train_images]  # Image.FLIP_LEFT_RIGHT
    subjects = [f"face{i}" for i in faces.TRAIN_FACES]
    dataset = SubjectImageDataset(train_images + mirrored, pipe.resolution, subjects=subjects + subjects)
    config = TrainConfig(mode="pretrain", batch_size=batch, learning_rate=lr, seed=seed)
    result = pretrain(pipe, dataset, out / "work" / "promptnet", steps, config, overwrite=True,
                      checkpoint_every=max(steps // 4, 1), progress=False)
    return {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "seconds": result.train.seconds,
            "loss": list(result.train.losses), "config": config.to_dict()}


# -- stage 4: ship ---------------------------------------------------------------------------------------

def ship(out: Path, target: Path = SHIP_PATH) -> dict:
    pipe = ProFusionPipeline.from_pretrained(out / "work" / "promptnet" / "model")
    tensors = {}
    for name, net in pipe.networks().items():
        for k, v in net.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().to(torch.float16) if v.dtype.is_floating_point else v.detach()
    target.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(target, tensors, {"preset": PRESET, "trained_by": "benchmarks/toy/train_toy_faces.py",
                                  "data": "skimage.data.lfw_subset() faces 0-89 and non-faces 100-199"})
    return {"path": str(target.name), "bytes": target.stat().st_size, "tensors": len(tensors),
            "params": {n: sum(p.numel() for p in net.parameters()) for n, net in pipe.networks().items()}}


# -- stage 5: report ------------------------------------------------------------------------------------

def smooth(values, window: int = 25):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(out: Path, data: dict) -> Path:
    import matplotlib  # deferred: matplotlib is only needed for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("vae", "unet", "promptnet") if s in data]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2))
    axes = [axes] if len(stages) == 1 else list(axes)
    for ax, s in zip(axes, stages):
        loss = data[s]["loss"]
        ax.plot(loss, color="0.8", lw=0.6, label="per step")
        ax.plot(smooth(loss), color="C0", lw=1.2, label="moving mean (25)")
        ax.set_yscale("log")
        ax.set_title(f"{s}: {data[s]['steps']} steps, {data[s]['seconds'] / 60:.1f} min")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out: Path) -> dict:
    data = json.loads((out / "training.json").read_text())
    plot_losses(out, data)
    return identity_figures(out, faces_used=range(4))


# -- main -----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--promptnet-steps", type=int, default=2000)
    p.add_argument("--promptnet-batch", type=int, default=8)
    p.add_argument("--unet-ema", type=float, default=0.999, help="EMA decay of the UNet's weights")
    p.add_argument("--promptnet-lr", type=float, default=2e-4)
    p.add_argument("--ship-to", type=Path, default=SHIP_PATH)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    out = args.out
    (out / "work").mkdir(parents=True, exist_ok=True)
    for s in stages:
        t0 = time.perf_counter()
        load = os.getloadavg()
        if s == "vae":
            info = train_vae(out, args.vae_steps, args.vae_batch, lr=1e-3, kl_weight=1e-4, seed=1)
        elif s == "unet":
            info = train_unet(out, args.unet_steps, args.unet_batch, lr=1e-3, ema_decay=args.unet_ema, drop=0.1,
                              seed=2)
        elif s == "promptnet":
            info = train_promptnet(out, args.promptnet_steps, args.promptnet_batch, lr=args.promptnet_lr, seed=3)
        elif s == "ship":
            info = ship(out, args.ship_to)
        else:
            info = report(out)
        info["wall_seconds"] = time.perf_counter() - t0
        info["machine"] = _machine()
        info["load_average_at_start"] = load
        record(out, s, info)
        logger.info("stage %s done in %.1f s", s, info["wall_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
