"""The ProFusion training step and loop, shared by pre-training and customization (docs/training.md).

One step draws, from the run's seeded CPU generator and in a fixed order, the targets and their references,
the VAE posterior noise, timesteps and noise, so a run is reproducible from its seed and resumes exactly;
:func:`diffusion_loss` is the official ε-MSE (v-MSE for v models) with S* inserted into the unpadded
6-token prompt "a photo of {S*}" (:func:`training_prompt_ids`). Trainable: PromptNet (``mode="pretrain"``),
or PromptNet plus every UNet attention ``to_q``/``to_k``/``to_v`` (``mode="customize"``); AdamW, gradient
clipping, autocast and the EMA warm-up as the official code. The step in detail and the defaults against the
official values: docs/training.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from profusion_rt.core.dtypes import PRECISION_DTYPES
from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.models import text as textenc
from profusion_rt.models.tokenizer import tokenize_prompt, unpadded_length
from profusion_rt.models.vision import image_tokens
from profusion_rt.training.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from profusion_rt.training.data import PairSampler, SubjectImageDataset, derive_seed
from profusion_rt.models.delta import delta_parameters, fingerprint_tensors
from profusion_rt.training.errors import CheckpointError

logger = logging.getLogger(__name__)

MODES = ("pretrain", "customize")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: Which gradients ``max_grad_norm`` clips: PromptNet's (the official pre-training) or every trainable one.
CLIP_SCOPES = ("promptnet", "trainable")
DEFAULT_PROMPT = "a photo of {S*}"
#: The official pre-training length (README: ``--max_train_steps=80000 --train_batch_size=8`` per GPU).
OFFICIAL_PRETRAIN_STEPS = 80_000
#: Encodings of a dataset are cached in memory when they need at most this many bytes.
ENCODING_CACHE_LIMIT_BYTES = 1024 * 2**20


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (defaults: the paper's pre-training; :meth:`customization` for the other)."""

    mode: str = "pretrain"
    batch_size: int = 8
    learning_rate: float = 2e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    clip_scope: str = "promptnet"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    seed: int = 0
    prompt: str = DEFAULT_PROMPT

    @classmethod
    def customization(cls, **overrides: Any) -> "TrainConfig":
        """Single-image customization defaults (the official notebook): batch 4, no gradient clipping (100
        iterations is the default run length)."""
        return cls(**{"mode": "customize", "batch_size": 4, "max_grad_norm": None, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"unknown training settings {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {v!r}")

        def number(name: str, low: float, high: float, low_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v > high or v < low or (low_open and v == low):
                bound = "(" if low_open else "["
                raise InvalidParameterError(f"{name} must be in {bound}{low}, {high}], got {v!r}")

        if self.mode not in MODES:
            raise InvalidParameterError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.clip_scope not in CLIP_SCOPES:
            raise InvalidParameterError(f"clip_scope must be one of {', '.join(CLIP_SCOPES)}, got {self.clip_scope!r}")
        if self.precision not in PRECISIONS:
            raise InvalidParameterError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        positive_int("batch_size")
        number("learning_rate", 0.0, 1.0, low_open=True)
        number("adam_beta1", 0.0, 1.0)
        number("adam_beta2", 0.0, 1.0)
        number("adam_epsilon", 0.0, 1.0, low_open=True)
        number("weight_decay", 0.0, 1.0)
        if self.max_grad_norm is not None:
            number("max_grad_norm", 0.0, math.inf, low_open=True)
        if self.ema_decay is not None:
            number("ema_decay", 0.0, 1.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidParameterError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    interrupted: bool = False
    checkpoint: Path | None = None
    seconds: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)


def check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidParameterError(f"steps must be an integer >= 1, got {steps!r}")


def trainable_parameters(pipe, mode: str) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by delta key: PromptNet ("pretrain"), plus the UNet's attention q/k/v ("customize")."""
    params = delta_parameters(pipe)
    if mode == "pretrain":
        params = {k: p for k, p in params.items() if k.startswith("promptnet.")}
    return params


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: fp16 autocast on CUDA (as the official runs), fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise InvalidParameterError("fp16 mixed precision needs a CUDA device; use fp32 or bf16")
    return precision


def _checkpointed_call(module: torch.nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def set_gradient_checkpointing(pipe, enabled: bool = True) -> None:
    """Recompute activations in backward: the UNet through diffusers, PromptNet's diffusers blocks likewise."""
    if enabled:
        pipe.unet.enable_gradient_checkpointing()
    else:
        pipe.unet.disable_gradient_checkpointing()
    for module in pipe.promptnet.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = _checkpointed_call
            module.gradient_checkpointing = enabled


def training_prompt_ids(tokenizer, prompt: str = DEFAULT_PROMPT) -> tuple[torch.Tensor, int]:
    """The training prompt's token ids, **unpadded** (start token .. end token), and the placeholder's index.

    As the official code: ``"a photo of {S*}"`` gives 6 ids, <start> a photo of <S*> <end>, with S* at
    index 4 (the id there is a stand-in: that embedding row is replaced by S*)."""
    ids, index = tokenize_prompt(tokenizer, prompt, require_placeholder=True)
    return ids[: unpadded_length(tokenizer, ids)].clone(), int(index)


def diffusion_loss(pipe, latents: torch.Tensor, ref_latents: torch.Tensor, ref_tokens: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                   placeholder_index: int, autocast: Callable[[], Any] | None = None) -> torch.Tensor:
    """The ProFusion training loss of one batch (docs/training.md), every random input given.

    ``latents``: scaled VAE latents z of the targets (B, 4, h, w); ``ref_latents``: z_ref of the references;
    ``ref_tokens``: their CLIP image tokens (B, T, V); ``noise``: eps (like ``latents``); ``timesteps``: t
    (B,) int64; ``prompt_embeds``: token + position embeddings of the training prompt (1, L, D)
    (:func:`training_prompt_ids`, ``text_encoder.embeddings``); ``placeholder_index``: the S* row.

    x_t = sqrt(a_t) z + sqrt(1 - a_t) eps; S* = PromptNet(z_ref, t, tokens, x_t); C = final LN of the text
    encoder's penultimate layer on the embeddings with row ``placeholder_index`` replaced by S*; the loss is
    mean_b mean_{c,h,w} (UNet(x_t, t, C) - eps)^2 in float32 (a v-prediction model's target is
    v = sqrt(a_t) eps - sqrt(1 - a_t) z, as train.py). ``autocast()``: a context for the forward passes
    (mixed precision), none by default.
    """
    b = latents.shape[0]
    a = pipe.scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps.long()]
    a = a.view(-1, 1, 1, 1)
    x_t = (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)
    mask = torch.zeros(1, prompt_embeds.shape[1], device=prompt_embeds.device, dtype=prompt_embeds.dtype)
    mask[0, int(placeholder_index)] = 1.0
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    with ctx:
        s_star = pipe.promptnet(ref_latents, timesteps, ref_tokens, x_t)
        cond = textenc.encode_with_placeholder(pipe.text_encoder, prompt_embeds.expand(b, -1, -1),
                                               mask.expand(b, -1), s_star, 1.0, pipe.text_skip_layers)
        pred = pipe.unet(x_t, timesteps, encoder_hidden_states=cond).sample
    prediction = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if prediction == "epsilon":
        target = noise.float()
    elif prediction == "v_prediction":  # as train.py: v = sqrt(a) eps - sqrt(1 - a) z
        target = a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()
    else:
        raise InvalidParameterError(f"cannot train a model with prediction type {prediction!r}")
    return ((pred.float() - target) ** 2).mean(dim=(1, 2, 3)).mean()


def ema_decay_at(update: int, decay: float) -> float:
    """Decay of the ``update``-th EMA update (1-based), as diffusers' ``EMAModel`` of the official code:
    0 for the first, then min(decay, (1 + k) / (10 + k)) with k = update - 1."""
    k = int(update) - 1
    return 0.0 if k <= 0 else min(float(decay), (1 + k) / (10 + k))


@dataclass
class _Encoded:
    mean: torch.Tensor  # VAE posterior mean (B, 4, h, w), unscaled
    std: torch.Tensor
    tokens: torch.Tensor  # CLIP image tokens (B, T, width)


class _ImageEncoder:
    """Frozen VAE posterior moments and CLIP tokens of dataset images, cached when the set is small."""

    def __init__(self, pipe, dataset: SubjectImageDataset, autocast: Callable[[], Any], chunk: int = 8):
        self.pipe, self.dataset, self.autocast, self.chunk = pipe, dataset, autocast, chunk
        side = dataset.resolution // pipe.vae_scale_factor
        cfg = pipe.image_encoder.config
        tokens = (int(cfg.image_size) // int(cfg.patch_size)) ** 2 + 1
        per_image = 4 * (2 * 4 * side * side + tokens * int(cfg.hidden_size))
        self.cache: dict[int, _Encoded] | None = None
        if len(dataset) * per_image <= ENCODING_CACHE_LIMIT_BYTES:
            self.cache = {}
            indices = list(range(len(dataset)))
            for start in range(0, len(indices), chunk):
                part = indices[start:start + chunk]
                enc = self._encode(part)
                for j, i in enumerate(part):
                    self.cache[i] = _Encoded(enc.mean[j], enc.std[j], enc.tokens[j])

    @torch.no_grad()
    def _encode(self, indices: list[int]) -> _Encoded:
        pipe = self.pipe
        pixels = self.dataset.pixels(indices).to(pipe.device)
        with self.autocast():
            dist = pipe.vae.encode(pixels.to(pipe.vae.dtype) * 2.0 - 1.0).latent_dist
            tokens = image_tokens(pipe.image_encoder, pixels)
        return _Encoded(dist.mean.float(), dist.std.float(), tokens.float())

    def __call__(self, indices: list[int]) -> _Encoded:
        if self.cache is None:
            return self._encode(indices)
        items = [self.cache[i] for i in indices]
        return _Encoded(*(torch.stack([getattr(e, f) for e in items]) for f in ("mean", "std", "tokens")))


class _InterruptFlag:
    """While active (main thread only), the first Ctrl-C asks the loop to stop after the current step and
    save; a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt: finishing the current step and saving a checkpoint (Ctrl-C again aborts)")

    def __enter__(self) -> "_InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Trains ``pipe`` in place on ``dataset``. Build it, optionally :meth:`load_checkpoint`, then :meth:`run`.

    ``data_fingerprint`` identifies the training data in checkpoints (default: ``dataset.fingerprint()``).
    """

    def __init__(self, pipe, dataset: SubjectImageDataset, config: TrainConfig, data_fingerprint: str | None = None):
        config.validate()
        if dataset.resolution != pipe.resolution:
            raise InvalidParameterError(
                f"dataset resolution {dataset.resolution} differs from the model's {pipe.resolution}"
            )
        self.pipe, self.dataset, self.config = pipe, dataset, config
        self.device = pipe.device
        self.precision = resolve_precision(config.precision, self.device)
        self.params = trainable_parameters(pipe, config.mode)
        wrong = [k for k, p in self.params.items() if p.dtype != torch.float32]
        if wrong:
            raise InvalidParameterError(
                f"training needs float32 weights ({wrong[0]} is {self.params[wrong[0]].dtype}); load the model "
                "in fp32 and choose mixed precision with precision='fp16'/'bf16'"
            )
        ids, index = training_prompt_ids(pipe.tokenizer, config.prompt)
        self.base_fingerprint = fingerprint_tensors(self.params)
        self.data_fingerprint = data_fingerprint or dataset.fingerprint()

        for net in pipe.networks().values():
            net.eval().requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        if config.gradient_checkpointing:
            set_gradient_checkpointing(pipe, True)

        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = (
            {k: p.detach().clone() for k, p in self.params.items()} if config.ema_decay is not None else None
        )
        self.generator = torch.Generator().manual_seed(derive_seed(config.seed, "train"))
        self.sampler = PairSampler(dataset, config.seed, exclude_self=config.mode == "pretrain")
        self.step = 0
        self.losses: list[float] = []

        with torch.no_grad():
            self.prompt_embeds = textenc.token_embeddings(pipe.text_encoder, ids[None].to(self.device))
        self.placeholder_index = index
        clip = pipe.promptnet.parameters() if config.clip_scope == "promptnet" or config.mode == "pretrain" \
            else self.params.values()
        self.clip_params = [p for p in clip if id(p) in {id(q) for q in self.params.values()}]
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(torch.float32)
        self.encoder = _ImageEncoder(pipe, dataset, self._autocast)
        logger.info("trainer: %s, %d trainable tensors (%.2f M params), precision %s, %s encodings",
                    config.mode, len(self.params), sum(p.numel() for p in self.params.values()) / 1e6,
                    self.precision, "cached" if self.encoder.cache is not None else "on-the-fly")

    # -- one step ----------------------------------------------------------------------------------------
    def _autocast(self):
        dtype = PRECISION_DTYPES[self.precision] if self.precision in ("fp16", "bf16") else None
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

    def draw_batch(self) -> dict[str, torch.Tensor]:
        """Every random draw of one step (see the module docstring), on the CPU."""
        g, b = self.generator, self.config.batch_size
        targets, references = self.sampler.next(b, g)
        tgt, ref = self.encoder(targets), self.encoder(references)
        shape = tuple(tgt.mean.shape)
        posterior_tgt = torch.randn(shape, generator=g)
        posterior_ref = torch.randn(shape, generator=g)
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=g)
        noise = torch.randn(shape, generator=g)
        sf = self.pipe.vae.config.scaling_factor
        dev = self.device
        z0 = (tgt.mean + tgt.std * posterior_tgt.to(dev)) * sf
        z_ref = (ref.mean + ref.std * posterior_ref.to(dev)) * sf
        return {"latents": z0, "t": t.to(dev), "noise": noise.to(dev), "z_ref": z_ref, "tokens": ref.tokens}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:func:`diffusion_loss` of a batch from :meth:`draw_batch`."""
        return diffusion_loss(self.pipe, batch["latents"], batch["z_ref"], batch["tokens"], batch["noise"],
                              batch["t"], self.prompt_embeds, self.placeholder_index, self._autocast)

    def train_step(self) -> float:
        loss = self.loss(self.draw_batch())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.clip_params, self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        if self.ema is not None:
            decay = ema_decay_at(self.step, self.config.ema_decay)  # this is update number self.step
            with torch.no_grad():
                for k, p in self.params.items():
                    self.ema[k].lerp_(p.detach(), 1.0 - decay)
        value = float(loss.detach())
        if not math.isfinite(value):
            logger.warning("step %d: loss is %s", self.step, value)
        self.losses.append(value)
        return value

    def finalize(self) -> None:
        """End of training: copy the EMA weights (if any) into the model, freeze it again, and turn gradient
        checkpointing off."""
        if self.config.gradient_checkpointing:
            set_gradient_checkpointing(self.pipe, False)
        with torch.no_grad():
            if self.ema is not None:
                for k, p in self.params.items():
                    p.copy_(self.ema[k])
            for p in self.params.values():
                p.requires_grad_(False)
                p.grad = None

    # -- loop --------------------------------------------------------------------------------------------
    def run(self, total_steps: int, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
            keep_checkpoints: int = 2, final_checkpoint: bool = False, progress: bool = True,
            callback: Callable[["Trainer", float], None] | None = None) -> TrainResult:
        """Train until ``self.step == total_steps`` (an absolute step count, so a resumed run gives the same
        total). Checkpoints go to ``checkpoint_dir`` every ``checkpoint_every`` steps (0: never), at the end
        when ``final_checkpoint``, and on Ctrl-C, which ends the run after the current step; the newest
        ``keep_checkpoints`` that this run wrote are kept. ``callback(trainer, loss)`` runs after each step."""
        from tqdm.auto import tqdm

        check_steps(total_steps)
        if total_steps < self.step:
            raise InvalidParameterError(f"steps ({total_steps}) is below the resumed step {self.step}")
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        written: list[Path] = []

        def save() -> Path | None:
            if folder is None:
                return None
            path = self.save_checkpoint(folder / checkpoint_name(self.step))
            if path not in written:
                written.append(path)
            while len(written) > max(int(keep_checkpoints), 1):
                old = written.pop(0)
                old.unlink(missing_ok=True)
            return path

        start, first_step = time.perf_counter(), self.step
        last: Path | None = None
        bar = tqdm(total=total_steps, initial=self.step, desc=self.config.mode, unit="step", disable=not progress,
                   dynamic_ncols=True)
        with _InterruptFlag() as interrupt, bar:
            while self.step < total_steps and not interrupt.requested:
                loss = self.train_step()
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update(1)
                if callback is not None:
                    callback(self, loss)
                if checkpoint_every and self.step % checkpoint_every == 0 and self.step < total_steps:
                    last = save()
            interrupted = interrupt.requested and self.step < total_steps
        if interrupted or final_checkpoint:
            last = save() if (last is None or last.name != checkpoint_name(self.step)) else last
        seconds = time.perf_counter() - start
        logger.info("%s: steps %d-%d in %.1f s%s", self.config.mode, first_step, self.step, seconds,
                    " (interrupted)" if interrupted else "")
        return TrainResult(self.step, list(self.losses), interrupted, last, seconds, written)

    # -- checkpoints -------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        names = list(self.params)
        opt_state = self.optimizer.state_dict()["state"]
        for i, k in enumerate(names):
            tensors[f"param.{k}"] = self.params[k].detach()
            for field_name in ("exp_avg", "exp_avg_sq", "step"):
                if i in opt_state:
                    tensors[f"optim.{field_name}.{k}"] = opt_state[i][field_name]
            if self.ema is not None:
                tensors[f"ema.{k}"] = self.ema[k]
        tensors["rng.generator"] = self.generator.get_state()
        tensors["log.losses"] = torch.tensor(self.losses, dtype=torch.float64)
        state = {
            "step": self.step,
            "config": self.config.to_dict(),
            "sampler": self.sampler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "base_fingerprint": self.base_fingerprint,
            "data_fingerprint": self.data_fingerprint,
        }
        return tensors, state

    def save_checkpoint(self, path: str | Path) -> Path:
        tensors, state = self.state()
        return save_checkpoint(path, tensors, state)

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore a checkpoint of the same run (same config, base weights and data); returns its step."""
        tensors, state = load_checkpoint(path)
        where = str(path)
        config = TrainConfig.from_dict(state.get("config", {}))
        if config != self.config:
            mine, theirs = self.config.to_dict(), config.to_dict()
            diff = [f"{k}={theirs[k]!r} (now {mine[k]!r})" for k in mine if mine[k] != theirs[k]]
            raise CheckpointError(f"checkpoint {where} was made with other settings: {', '.join(diff)}")
        if state.get("base_fingerprint") != self.base_fingerprint:
            raise CheckpointError(f"checkpoint {where} was made on another base model (weights differ)")
        if state.get("data_fingerprint") != self.data_fingerprint:
            raise CheckpointError(f"checkpoint {where} was made on other training images")
        missing = [k for k in self.params if f"param.{k}" not in tensors]
        if missing:
            raise CheckpointError(f"checkpoint {where} lacks {len(missing)} trainable tensors (e.g. {missing[0]})")
        with torch.no_grad():
            for k, p in self.params.items():
                if tuple(tensors[f"param.{k}"].shape) != tuple(p.shape):
                    raise CheckpointError(f"checkpoint {where}: {k} has shape {tuple(tensors[f'param.{k}'].shape)}, "
                                          f"the model {tuple(p.shape)}")
                p.copy_(tensors[f"param.{k}"])
        opt = self.optimizer.state_dict()
        opt["state"] = {
            i: {f: tensors[f"optim.{f}.{k}"] for f in ("step", "exp_avg", "exp_avg_sq")}
            for i, k in enumerate(self.params) if f"optim.step.{k}" in tensors
        }
        self.optimizer.load_state_dict(opt)
        if self.ema is not None:
            for k in self.params:
                self.ema[k].copy_(tensors[f"ema.{k}"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(tensors["rng.generator"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in tensors["log.losses"].tolist()]
        logger.info("resumed from %s at step %d", where, self.step)
        return self.step
