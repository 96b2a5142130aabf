"""The released ProFusion layout, written here from the tiny preset the way the official code's save path
writes it (``train.py``: ``StableDiffusionPromptNetPipeline.from_pretrained(...)`` + ``save_pretrained``,
diffusers 0.15.0.dev0, transformers 4.25), in both serialisations (``.bin`` via ``torch.save`` and the
safetensors variant), loaded back tensor for tensor and sample for sample; the official PromptNet config rules
(``region_kernel_size`` = the final conv's kernel, head kernels from ``max(2 ** (n - 1), 8)``); typed one-line
errors for every kind of bad folder; no ERROR log line for a folder that loads; ``profusion-rt convert``."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from profusion_rt.cli import main
from profusion_rt.core.errors import ModelLoadError
from profusion_rt.models.promptnet import PromptNet, PromptNetConfig
from profusion_rt.models.tokenizer import BOS_TOKEN, EOS_TOKEN, build_vocab_and_merges
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.core.presets import get_preset

PROMPT = "a portrait of {S*} in a garden"
STEPS = 3

# SD2-base's scheduler/scheduler_config.json, which the release carries unchanged.
PNDM_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
               "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
               "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
FEATURE_EXTRACTOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor",
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
MODEL_INDEX = {"_class_name": "StableDiffusionPromptNetPipeline", "_diffusers_version": "0.15.0.dev0",
               "feature_extractor": ["transformers", "CLIPImageProcessor"], "openclip": ["transformers", "CLIPModel"],
               "promptnet": ["diffusers", "PromptNetModel"], "requires_safety_checker": False,
               "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}
_VAE_OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


# -- the writer (independent of the loader: shapes follow the official class's rules, stated here) -------
def official_promptnet_config(pn_config: PromptNetConfig, region_kernel_size: int) -> dict:
    """promptnet/config.json as the official ConfigMixin writes it: every PromptNetModel.__init__ argument
    (release values), plus keys inherited from the SD2 UNet config that train.py built it from. No vision
    width (the official class hard-codes 1280; the weights say 64 here)."""
    unet = get_preset("tiny").unet
    return {
        "_class_name": "PromptNetModel", "_diffusers_version": "0.15.0.dev0",
        "act_fn": "silu", "attention_head_dim": list(pn_config.attention_head_dim),
        "block_out_channels": list(pn_config.block_out_channels), "center_input_sample": False,
        "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": pn_config.cross_attention_dim, "down_block_types": list(pn_config.down_block_types),
        "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": 4, "layers_per_block": pn_config.layers_per_block, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
        "projection_class_embeddings_input_dim": None, "prompt_channel": pn_config.prompt_channel,
        "region_kernel_size": region_kernel_size, "region_proj_channel": pn_config.region_proj_channel,
        "res_block_out_channels": list(pn_config.block_out_channels), "resnet_time_scale_shift": "default",
        "sample_size": 32, "time_cond_proj_dim": None, "time_embedding_type": "positional",
        "timestep_post_act": None, "up_block_types": list(unet["up_block_types"]), "upcast_attention": False,
        "use_clip_vision_embeds": True, "use_linear_projection": True, "use_res": True, "with_noise": True,
    }


def residual_heads(cfg: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The official unused heads: a (conv 1x1 with bias, conv 1x1 without) pair per UNet skip feature, in the
    official order (conv_in's output, then per block ``layers_per_block`` resnets and the downsampler of every
    non-final block), plus the mid pair; channels block_out -> res_block_out."""
    out_ch, res_ch = cfg["block_out_channels"], cfg["res_block_out_channels"]
    pairs = [(out_ch[0], res_ch[0])]
    for i in range(len(out_ch)):
        pairs += [(out_ch[i], res_ch[i])] * (cfg["layers_per_block"] + (i < len(out_ch) - 1))
    state = {}
    for i, (c, r) in enumerate(pairs):
        state[f"residual_projections.{i}.weight"] = torch.randn(r, c, 1, 1, generator=generator)
        state[f"residual_projections.{i}.bias"] = torch.randn(r, generator=generator)
        state[f"residual_projections_2.{i}.weight"] = torch.randn(r, r, 1, 1, generator=generator)
    c, r = out_ch[-1], res_ch[-1]
    state["mid_residual_projection.weight"] = torch.randn(r, c, 1, 1, generator=generator)
    state["mid_residual_projection.bias"] = torch.randn(r, generator=generator)
    state["mid_residual_projection_2.weight"] = torch.randn(r, r, 1, 1, generator=generator)
    return state


def openclip_model(pipe) -> CLIPModel:
    """The CLIPModel whose towers are the pipeline's encoders; projections and logit scale seeded."""
    te, ie = pipe.text_encoder, pipe.image_encoder
    config = CLIPConfig(text_config=te.config.to_dict(), vision_config=ie.config.to_dict(),
                        projection_dim=te.config.hidden_size)
    torch.manual_seed(5)
    clip = CLIPModel(config)
    clip.text_model.load_state_dict(te.state_dict())
    clip.vision_model.load_state_dict(ie.state_dict())
    return clip


def _save(state: dict[str, torch.Tensor], folder, stem: str, safe: bool) -> None:
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if safe:
        save_file(state, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / f"{stem}.bin")


def _diffusers_folder(net, folder, state: dict[str, torch.Tensor], safe: bool) -> None:
    folder.mkdir(parents=True)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(net.config).items()
              if not k.startswith("_")}
    config.update(_class_name=type(net).__name__, _diffusers_version="0.15.0.dev0")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _save(state, folder, "diffusion_pytorch_model", safe)


def write_tokenizer(folder) -> None:
    """tokenizer/ as transformers 4.25 saved SD2-base's slow CLIPTokenizer: vocab.json, merges.txt and the
    two JSON configs (no tokenizer.json)."""
    folder.mkdir(parents=True)
    vocab, merges = build_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": "!", "unk_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
         "name_or_path": "stabilityai/stable-diffusion-2-base", "tokenizer_class": "CLIPTokenizer"}))


def write_official_layout(pipe, root, safe: bool, region_kernel_size: int = 4) -> dict[str, dict]:
    """Write the layout; returns every tensor written, per component file."""
    written: dict[str, dict] = {}
    (root / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (root / "feature_extractor").mkdir()
    (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(FEATURE_EXTRACTOR))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(PNDM_CONFIG))
    write_tokenizer(root / "tokenizer")

    written["unet"] = dict(pipe.unet.state_dict())
    _diffusers_folder(pipe.unet, root / "unet", written["unet"], safe)
    vae_state = {}
    for key, value in pipe.vae.state_dict().items():
        for new, old in _VAE_OLD_NAMES.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        vae_state[key] = value
    assert any(".query." in k for k in vae_state) and any(".proj_attn." in k for k in vae_state)
    written["vae"] = vae_state
    _diffusers_folder(pipe.vae, root / "vae", vae_state, safe)

    pn_cfg = official_promptnet_config(pipe.promptnet.config, region_kernel_size)
    pn_state = dict(pipe.promptnet.state_dict())
    pn_state.update(residual_heads(pn_cfg, torch.Generator().manual_seed(11)))
    written["promptnet"] = pn_state
    (root / "promptnet").mkdir()
    (root / "promptnet" / "config.json").write_text(json.dumps(pn_cfg, indent=2))
    _save(pn_state, root / "promptnet", "diffusion_pytorch_model", safe)

    clip = openclip_model(pipe)
    clip_state = dict(clip.state_dict())
    # transformers 4.25 kept the position ids as persistent buffers
    clip_state["text_model.embeddings.position_ids"] = torch.arange(
        clip.config.text_config.max_position_embeddings)[None]
    n_pos = (clip.config.vision_config.image_size // clip.config.vision_config.patch_size) ** 2 + 1
    clip_state["vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    written["openclip"] = clip_state
    (root / "openclip").mkdir()
    clip_config = json.loads(clip.config.to_json_string())
    clip_config.update(architectures=["CLIPModel"], transformers_version="4.25.1")
    (root / "openclip" / "config.json").write_text(json.dumps(clip_config, indent=2))
    if safe:
        _save(clip_state, root / "openclip", "model", safe)
    else:
        _save(clip_state, root / "openclip", "pytorch_model", safe)
    return written


# -- fixtures ---------------------------------------------------------------------------------------------
def _latents(pipe, astronaut):
    pipe.progress_bar = False
    return pipe(reference_image=astronaut, prompt=PROMPT, num_inference_steps=STEPS, seed=4,
                output_type="latent").latents


@pytest.fixture(scope="module")
def source_latents(tiny_pipe, astronaut):
    return _latents(tiny_pipe, astronaut)


@pytest.fixture(scope="module", params=["bin", "safetensors"])
def official(request, tiny_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"official-{request.param}")
    written = write_official_layout(tiny_pipe, root, safe=request.param == "safetensors")
    return root, written


@pytest.fixture(scope="module")
def official_bin(tiny_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("official-bin-errors")
    write_official_layout(tiny_pipe, root, safe=False)
    return root


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def log_records():
    """Every log record of our code and of the libraries (diffusers and transformers do not propagate to
    the root logger, so their loggers get the handler directly)."""
    handler = _Records()
    names = ["", "diffusers", "transformers", "huggingface_hub", "profusion_rt"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


# -- loading the official layout ------------------------------------------------------------------------
def _tower_tensor(model_state: dict, key: str):
    """A CLIPModel file key (``text_model.x``) in a standalone tower's state dict (``x`` on transformers 5,
    ``text_model.x`` on 4.x)."""
    short = key.split(".", 1)[1]
    return model_state.get(short, model_state.get(key))


def test_official_layout_loads_every_tensor(tiny_pipe, official, log_records):
    root, written = official
    loaded = ProFusionPipeline.from_pretrained(root)
    errors = [r for r in log_records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    warnings = [r for r in log_records if r.levelno >= logging.WARNING and r.name.startswith("diffusers")]
    assert not warnings, [r.getMessage() for r in warnings]

    nets = {name: net.state_dict() for name, net in loaded.networks().items()}
    checked = dropped = 0
    for key, value in written["unet"].items():
        assert torch.equal(nets["unet"][key], value), key
        checked += 1
    vae_new = {v: k for k, v in _VAE_OLD_NAMES.items()}
    for key, value in written["vae"].items():
        for old, new in vae_new.items():
            key = key.replace(f".{old}.", f".{new}.") if ".attentions." in key else key
        assert torch.equal(nets["vae"][key], value), key
        checked += 1
    for key, value in written["promptnet"].items():
        if "residual" in key:
            assert key not in nets["promptnet"]
            dropped += 1
            continue
        assert torch.equal(nets["promptnet"][key], value), key
        checked += 1
    heads = loaded.clip_projections.state_dict()
    for key, value in written["openclip"].items():
        if key in heads:  # CLIP's projections: kept for evaluation
            assert torch.equal(heads[key], value), key
            checked += 1
            continue
        tower = {"text_model": "text_encoder", "vision_model": "image_encoder"}.get(key.split(".")[0])
        if tower is None or key.endswith("position_ids"):
            dropped += 1  # logit scale, the old position-id buffers
            continue
        assert torch.equal(_tower_tensor(nets[tower], key), value), key
        checked += 1
    # every loaded tensor came from the files
    assert checked == sum(len(s) for s in nets.values()) + len(heads) and len(heads) == 2
    # 8 residual pairs at tiny size (conv_in, 2 + 2 + 2 + 1 in the blocks, the mid pair: 3 tensors each),
    # CLIP's logit scale, the two position-id buffers
    assert dropped == 3 * 9 + 1 + 2

    assert type(loaded.scheduler).__name__ == "DDIMScheduler"  # PNDM config, DDIM sampler
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(tiny_pipe.scheduler.config)
    assert loaded.text_skip_layers == 1 and loaded.resolution == tiny_pipe.resolution
    ids = lambda tok: tok("a photo of holder, oil painting").input_ids  # noqa: E731
    assert ids(loaded.tokenizer) == ids(tiny_pipe.tokenizer)
    assert loaded.tokenizer.pad_token_id == tiny_pipe.tokenizer.pad_token_id == 0


def test_official_layout_samples_like_the_source(official, astronaut, source_latents):
    root, _ = official
    loaded = ProFusionPipeline.from_pretrained(root)
    assert torch.equal(_latents(loaded, astronaut), source_latents)


def test_official_config_is_read_the_official_way(official_bin):
    """region_kernel_size 4 is the final conv's kernel; the heads start at max(2**3, 8) = 8."""
    loaded = ProFusionPipeline.from_pretrained(official_bin)
    pn = loaded.promptnet
    kernels = [pn.first_prompt_projection.kernel_size[0]]
    kernels += [c.kernel_size[0] for c in pn.down_prompt_projections]
    kernels += [pn.mid_prompt_projection.kernel_size[0], pn.region_prompt_output.kernel_size[0]]
    assert kernels == [8, 4, 2, 1, 1, 1, 4]
    assert pn.vision_embedding.in_features == 64  # from the weights, not the official class's 1280


def test_generate_cli_on_official_folder(official_bin, tmp_path, astronaut, capsys):
    from PIL import Image

    image = tmp_path / "ref.png"
    Image.fromarray(astronaut).save(image)
    out = tmp_path / "out.png"
    rc = main(["generate", "--model", str(official_bin), "--image", str(image), "--prompt", "a {S*} smiling",
               "--steps", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (256, 256)


# -- the official kernel rules at other values ------------------------------------------------------------
def _kernels(net: PromptNet) -> list[int]:
    return ([net.first_prompt_projection.kernel_size[0]] + [c.kernel_size[0] for c in net.down_prompt_projections]
            + [net.mid_prompt_projection.kernel_size[0], net.region_prompt_output.kernel_size[0]])


def _official_sd2(region_kernel_size: int, down_blocks: int = 4) -> dict:
    types = ["CrossAttnDownBlock2D"] * (down_blocks - 1) + ["DownBlock2D"]
    return {"block_out_channels": ([320, 640, 1280, 1280] + [1280] * 4)[:down_blocks],
            "attention_head_dim": ([5, 10, 20, 20] + [20] * 4)[:down_blocks], "down_block_types": types,
            "use_linear_projection": True, "use_clip_vision_embeds": True, "with_noise": True, "use_res": True,
            "sample_size": 64, "region_kernel_size": region_kernel_size,
            "res_block_out_channels": [320, 640, 1280, 1280]}


def test_region_kernel_size_4_at_sd2_size():
    """A checkpoint trained with --region_kernel_size 4: only the final conv changes (kernel 4, 2x2 tokens);
    reading 4 as the first head's kernel (the old rule) would change 3 other shapes."""
    with torch.device("meta"):
        net = PromptNet(PromptNetConfig.from_dict(_official_sd2(4)))
        release = PromptNet(PromptNetConfig.from_dict(_official_sd2(8)))
        old_rule = PromptNet(PromptNetConfig(region_kernel_size=4))
    assert _kernels(net) == [8, 4, 2, 1, 1, 1, 4] and _kernels(release) == [8, 4, 2, 1, 1, 1, 8]
    assert tuple(net.region_prompt_output.weight.shape) == (1024, 768, 4, 4)
    assert tuple(net.first_prompt_projection.weight.shape) == (128, 320, 8, 8)
    assert net.vision_embedding.in_features == 1280  # no weights given: the official class's width
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert len(shapes) == 318
    assert sum(shapes[k] != v.shape for k, v in release.state_dict().items()) == 1
    assert sorted(k for k, v in old_rule.state_dict().items() if shapes[k] != v.shape) == [
        "down_prompt_projections.0.weight", "down_prompt_projections.1.weight", "first_prompt_projection.weight"]
    with torch.device("meta"):
        z = torch.empty(1, 4, 64, 64)
        assert tuple(net(z, 1, torch.empty(1, 257, 1280), z).shape) == (1, 4, 1024)


@pytest.mark.parametrize("blocks, expected", [(2, [8, 4, 4, 4, 3]), (5, [16, 8, 4, 2, 1, 1, 1, 3])])
def test_head_kernel_rule_other_depths(blocks, expected):
    """max(2 ** (n - 1), 8), halved after each non-final block; the final conv takes region_kernel_size."""
    cfg = PromptNetConfig.from_dict(_official_sd2(3, down_blocks=blocks))
    assert list(cfg.head_kernels()) == expected


def test_region_kernel_size_4_folder_loads(tiny_pipe, tmp_path):
    """An official promptnet folder with region_kernel_size 4 written at tiny size with independently shaped
    random weights (region_prompt_output 64 x 6*32 x 4 x 4, first head 8 x 8) loads tensor for tensor."""
    from profusion_rt.models.loading import load_promptnet

    cfg = official_promptnet_config(tiny_pipe.promptnet.config, 4)
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) for k, v in tiny_pipe.promptnet.state_dict().items()}
    assert tuple(state["region_prompt_output.weight"].shape) == (64, 6 * 32, 4, 4)
    assert tuple(state["first_prompt_projection.weight"].shape) == (32, 32, 8, 8)
    state.update(residual_heads(cfg, g))
    folder = tmp_path / "promptnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    dropped: list[str] = []
    net = load_promptnet(folder, dropped)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert dropped and dropped[0].startswith("promptnet: 27 residual-head tensors")


# -- typed errors -----------------------------------------------------------------------------------------
def _edit_bin(file, edit):
    state = torch.load(file, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, file)


def _shrink(key):
    def edit(state):
        state[key] = state[key][..., :1].contiguous()
    return edit


def _drop(key):
    def edit(state):
        del state[key]
    return edit


def _add(key):
    def edit(state):
        state[key] = torch.zeros(3)
    return edit


BAD_WEIGHTS = [
    ("unet", "unet/diffusion_pytorch_model.bin", _shrink("conv_in.weight"), "conv_in.weight"),
    ("unet", "unet/diffusion_pytorch_model.bin", _drop("conv_out.bias"), "conv_out.bias"),
    ("vae", "vae/diffusion_pytorch_model.bin", _add("decoder.extra.weight"), "decoder.extra.weight"),
    ("vae", "vae/diffusion_pytorch_model.bin", _drop("encoder.mid_block.attentions.0.query.weight"),
     "encoder.mid_block.attentions.0.to_q.weight"),
    ("promptnet", "promptnet/diffusion_pytorch_model.bin", _shrink("vision_embedding.bias"), "vision_embedding.bias"),
    ("promptnet", "promptnet/diffusion_pytorch_model.bin", _drop("region_prompt_output.bias"),
     "region_prompt_output.bias"),
    ("promptnet", "promptnet/diffusion_pytorch_model.bin", _add("extra_head.weight"), "extra_head.weight"),
    ("openclip", "openclip/pytorch_model.bin", _shrink("text_model.embeddings.token_embedding.weight"),
     "token_embedding.weight"),
    ("openclip", "openclip/pytorch_model.bin", _drop("vision_model.post_layernorm.bias"), "post_layernorm.bias"),
]


@pytest.mark.parametrize("component, file, edit, tensor", BAD_WEIGHTS,
                         ids=[f"{c}-{t}-{e.__qualname__.split('.')[0]}" for c, _, e, t in BAD_WEIGHTS])
def test_bad_weights_name_component_and_tensor(official_bin, tmp_path, component, file, edit, tensor):
    bad = tmp_path / "bad"
    shutil.copytree(official_bin, bad)
    _edit_bin(bad / file, edit)
    with pytest.raises(ModelLoadError) as info:
        ProFusionPipeline.from_pretrained(bad)
    message = str(info.value)
    assert "\n" not in message
    assert repr(component) in message and tensor in message, message


def _config_edit(file, **changes):
    def edit(root):
        cfg = json.loads((root / file).read_text())
        cfg.update(changes)
        (root / file).write_text(json.dumps(cfg))
    return edit


BAD_FOLDERS = [
    ("promptnet", _config_edit("promptnet/config.json", region_kernel_size=8), "region_prompt_output.weight"),
    ("promptnet", _config_edit("promptnet/config.json", mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
     "mid_block_type"),
    ("unet", _config_edit("unet/config.json", cross_attention_dim=32), "attn2.to_k.weight"),
    ("unet", lambda root: (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle"),
     "diffusion_pytorch_model.bin"),
    ("vae", lambda root: (root / "vae" / "diffusion_pytorch_model.bin").unlink(), "no weights file"),
    ("vae", lambda root: (root / "vae" / "config.json").unlink(), "config.json"),
    ("openclip", lambda root: (root / "openclip" / "pytorch_model.bin").write_bytes(b"\0" * 10),
     "pytorch_model.bin"),
    ("scheduler", lambda root: (root / "scheduler" / "scheduler_config.json").write_text("{"),
     "scheduler_config.json"),
    ("tokenizer", lambda root: shutil.rmtree(root / "tokenizer"), "tokenizer"),
]


@pytest.mark.parametrize("component, edit, needle", BAD_FOLDERS,
                         ids=[f"{c}-{n}" for c, _, n in BAD_FOLDERS])
def test_bad_folder_names_component(official_bin, tmp_path, component, edit, needle):
    bad = tmp_path / "bad"
    shutil.copytree(official_bin, bad)
    edit(bad)
    with pytest.raises(ModelLoadError) as info:
        ProFusionPipeline.from_pretrained(bad)
    message = str(info.value)
    assert "\n" not in message
    assert component in message and needle in message, message


def test_cli_bad_folder_one_line_exit_2(official_bin, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(official_bin, bad)
    _edit_bin(bad / "promptnet" / "diffusion_pytorch_model.bin", _shrink("first_prompt_projection.weight"))
    rc = main(["generate", "--model", str(bad), "--prompt", "a {S*}", "--steps", "1",
               "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err
    assert "'promptnet'" in err and "first_prompt_projection.weight" in err
    assert not (tmp_path / "o.png").exists()


# -- convert ----------------------------------------------------------------------------------------------
def test_convert_writes_our_layout(official_bin, tiny_pipe, tmp_path, capsys):
    out = tmp_path / "ours"
    assert main(["convert", "--model", str(official_bin), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "residual" in text and "verified" in text
    assert not any(out.rglob("*.bin"))
    assert json.loads((out / "model_index.json").read_text())["profusion_rt"]["text_skip_layers"] == 1
    converted = ProFusionPipeline.from_pretrained(out)
    for name, net in tiny_pipe.networks().items():
        mine = converted.networks()[name].state_dict()
        for k, v in net.state_dict().items():
            assert torch.equal(mine[k], v), (name, k)
    # CLIP's projection heads survive the conversion (evaluation reads them: CLIP-T, CLIP-I)
    source = ProFusionPipeline.from_pretrained(official_bin)
    assert (out / "clip_projections" / "model.safetensors").is_file()
    for k, v in source.clip_projections.state_dict().items():
        assert torch.equal(converted.clip_projections.state_dict()[k], v), k
    assert converted.text_projection is converted.clip_projections.text_projection
    assert "text_projection" not in text and "logit_scale" in text


def test_broken_clip_projections_are_a_load_error(official_bin, tmp_path):
    out = tmp_path / "ours"
    assert main(["convert", "--model", str(official_bin), "--out", str(out)]) == 0
    config = out / "clip_projections" / "config.json"
    config.write_text(config.read_text().replace('"projection_dim": ', '"projection_dim": 1'))
    with pytest.raises(ModelLoadError, match="clip_projections.*shape"):
        ProFusionPipeline.from_pretrained(out)


def test_convert_refuses_and_leaves_nothing(official_bin, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(official_bin, bad)
    shutil.rmtree(bad / "unet")
    out = tmp_path / "ours"
    assert main(["convert", "--model", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'unet'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no half-written folder
