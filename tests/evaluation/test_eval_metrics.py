"""Metrics of ``profusion-rt eval``: identical images give CLIP-I 1 and infinite PSNR, a perturbed image
lowers both; CLIP-T with projections; DINO and face-embedding models; fidelity status; report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from profusion_rt.evaluation import fidelity, metrics, report


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    return Image.fromarray(astronaut).resize((128, 128))


def perturbed(image: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def test_identical_images_psnr_inf_ssim_1_clip_i_1(tiny_pipe, photo):
    clip = metrics.ClipEmbedder.from_pipeline(tiny_pipe)
    assert math.isinf(metrics.psnr(photo, photo.copy()))
    assert metrics.ssim(photo, photo.copy()) == pytest.approx(1.0)
    a, b = clip.image_embeddings([photo, photo.copy()])
    assert metrics.cosine(a, b) == pytest.approx(1.0, abs=1e-6)


def test_perturbed_image_lowers_psnr_ssim_and_clip_i(tiny_pipe, photo):
    clip = metrics.ClipEmbedder.from_pipeline(tiny_pipe)
    light, heavy = perturbed(photo, 4), perturbed(photo, 40)
    p_light, p_heavy = metrics.psnr(light, photo), metrics.psnr(heavy, photo)
    assert math.isfinite(p_light) and p_heavy < p_light < 60
    assert 20 * math.log10(255 / 4) - 1 < p_light < 20 * math.log10(255 / 4) + 1  # PSNR of N(0, 4) noise
    assert metrics.ssim(heavy, photo) < metrics.ssim(light, photo) < 1.0
    ref, e_light, e_heavy = clip.image_embeddings([photo, light, heavy])
    assert metrics.cosine(e_heavy, ref) < 1.0 - 1e-6 and metrics.cosine(e_light, ref) < 1.0 - 1e-9
    inverted = Image.fromarray(255 - np.asarray(photo))
    assert metrics.cosine(clip.image_embeddings([inverted])[0], ref) < metrics.cosine(e_light, ref)


def test_without_projections_clip_t_is_none_with_a_note(tiny_pipe):
    clip = metrics.ClipEmbedder.from_pipeline(tiny_pipe)
    assert not clip.projected and clip.text_embeddings(["a photo of a person"]) is None
    assert "CLIP-T is not available" in clip.note


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, tiny_pipe):
    """A tiny transformers CLIPModel folder (random weights, the tiny preset's tower sizes)."""
    from transformers import CLIPConfig, CLIPModel

    from profusion_rt.core.presets import get_preset

    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=preset.text_encoder, vision_config=preset.image_encoder,
                                 projection_dim=32))
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return folder


def test_clip_t_with_projections_matches_transformers(clip_folder, tiny_pipe, photo):
    from transformers import CLIPModel

    clip = metrics.ClipEmbedder.from_folder(clip_folder, tiny_pipe.tokenizer)
    assert clip.projected
    texts = ["a photo of a person", "an oil painting of a dog"]
    ours = clip.text_embeddings(texts)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    ids = tiny_pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert ours.shape == (2, 32) and clip.image_embeddings([photo]).shape == (1, 32)
    assert metrics.cosine(ours[0], ours[1]) < 0.9999


def test_missing_clip_folder_is_a_clear_error(tmp_path):
    from profusion_rt.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no config.json"):
        metrics.ClipEmbedder.from_folder(tmp_path)


def test_dino_folder(tmp_path, photo):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(tmp_path)
    dino = metrics.DinoEmbedder(tmp_path)
    a, b, c = dino.image_embeddings([photo, photo.copy(), perturbed(photo, 60)])
    assert metrics.cosine(a, b) == pytest.approx(1.0, abs=1e-6) and metrics.cosine(a, c) < 1.0 - 1e-6


def _onnx_model(path, input_shape, elem=None):
    """A one-node model: the per-channel spatial mean of the input (a stand-in face embedder)."""
    import onnx
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if elem is None else elem
    axes = [len(input_shape) - 1] if len(input_shape) != 4 else [2, 3] if input_shape[1] == 3 else [1, 2]
    node = helper.make_node("ReduceMean", ["x", "axes"], ["emb"], keepdims=0)
    axes_init = helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)
    graph = helper.make_graph([node], "face", [helper.make_tensor_value_info("x", elem, input_shape)],
                              [helper.make_tensor_value_info("emb", elem, None)], initializer=[axes_init])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_face_model_embeds_and_skips_unfeedable_inputs(tmp_path, photo):
    pytest.importorskip("onnxruntime")
    good = metrics.FaceEmbedder(_onnx_model(tmp_path / "nchw.onnx", [1, 3, 16, 16]))
    a, b = good.embed(photo), good.embed(Image.fromarray(255 - np.asarray(photo)))
    assert a.vector is not None and a.vector.shape == (3,)
    same, _ = metrics.face_similarity(a, good.embed(photo.copy()))
    other, _ = metrics.face_similarity(a, b)
    assert same == pytest.approx(1.0) and other < same
    nhwc = metrics.FaceEmbedder(_onnx_model(tmp_path / "nhwc.onnx", [1, 16, 16, 3]))
    assert nhwc.embed(photo).vector.shape == (3,)
    flat = metrics.FaceEmbedder(_onnx_model(tmp_path / "flat.onnx", [1, 10]))
    skipped = flat.embed(photo)
    assert skipped.vector is None and "expected 4 axes" in skipped.reason
    assert metrics.face_similarity(skipped, a) == (None, skipped.reason)


def test_latent_relative_error():
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert metrics.latent_relative_error(ref.clone(), ref) == (0.0, 0.0)
    mx, mean = metrics.latent_relative_error(ref + torch.tensor([0.0, 0.0, 0.4]), ref)
    assert mx == pytest.approx(0.1) and mean == pytest.approx((0.4 / 3) / (7 / 3))


def test_fidelity_status_thresholds():
    ok = [{"psnr_db": math.inf, "ssim": 1.0}, {"psnr_db": 45.0, "ssim": 0.99}]
    assert fidelity.fidelity_status(ok) == "ok"
    assert fidelity.fidelity_status(ok + [{"psnr_db": 22.0, "ssim": 0.99}]).startswith("FLAGGED: PSNR 22.0")
    assert fidelity.fidelity_status(ok + [{"psnr_db": 35.0, "ssim": 0.9}]).startswith("FLAGGED: SSIM")
    assert fidelity.fidelity_status(ok, psnr_min=50).startswith("FLAGGED")


def test_report_writes_inf_as_null_and_markdown_inf(tmp_path, photo):
    sets = [fidelity.ImageSet("a", [photo], [None]), fidelity.ImageSet("b", [photo], [None])]
    items = [fidelity.Item(0, "a {S*}", 0, "000")]
    summary = [{"set": "a", "images": 1, "status": "reference"},
               {"set": "b", "images": 1, "status": "ok", "psnr_db_min": math.inf, "ssim_min": 1.0}]
    result = {"machine": "test", "conditions": "", "reference_set": "a", "summary": summary,
              "thresholds": {"psnr_min": 30.0, "ssim_min": 0.95}, "quality_note": "n", "notes": [report.INF_NOTE],
              "fidelity": [{"set": "b", "psnr_db": math.inf}]}
    report.write_outputs(tmp_path, result, report.grid(photo, sets, items), {"images/b/000.png": b"x"})
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["fidelity"][0]["psnr_db"] is None and data["summary"][1]["psnr_db_min"] is None
    assert "| b | ok | inf |" in (tmp_path / "eval.md").read_text()
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 160, 16 + 160)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
