"""``profusion-rt pretrain`` / ``customize`` / ``apply-delta`` on the tiny preset: loadable outputs, one-line
errors with exit status 2 for bad input, and nothing on disk damaged."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from profusion_rt.cli import main
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.training import load_delta


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
    return folder


def test_pretrain_and_customize_write_loadable_outputs(tiny_pipe, photos, tmp_path, capsys):
    out = tmp_path / "pretrain"
    assert main(["pretrain", "--model", "tiny", "--data", str(photos), "--steps", "2", "--batch-size", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert f"wrote model {out / 'model'}" in capsys.readouterr().out
    assert (out / "checkpoints" / "step-0000002.safetensors").is_file()
    pretrained = ProFusionPipeline.from_pretrained(out / "model")
    assert _states_equal(pretrained.unet, tiny_pipe.unet) and not _states_equal(pretrained.promptnet, tiny_pipe.promptnet)

    out = tmp_path / "customize"
    assert main(["customize", "--model", "tiny", "--image", str(photos / "chelsea.png"), "--steps", "2",
                 "--batch-size", "1", "--num-augmentations", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "loss=" in captured.err  # the progress bar shows the loss
    assert "wrote delta" in captured.out
    customized = ProFusionPipeline.from_pretrained(out / "model")
    assert not _states_equal(customized.unet, tiny_pipe.unet)
    assert _states_equal(customized.vae, tiny_pipe.vae)

    merged = tmp_path / "merged"
    assert main(["apply-delta", "--model", "tiny", "--delta", str(out / "subject.delta.safetensors"),
                 "--out", str(merged)]) == 0
    rebuilt = ProFusionPipeline.from_pretrained(merged)
    assert _states_equal(rebuilt.unet, customized.unet) and _states_equal(rebuilt.promptnet, customized.promptnet)

    # a delta made on the seed-0 tiny weights does not fit the seed-1 ones
    capsys.readouterr()
    wrong = tmp_path / "wrong"
    assert main(["apply-delta", "--model", "tiny", "--weights-seed", "1", "--delta",
                 str(out / "subject.delta.safetensors"), "--out", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the delta was made for another base model") and "\n" not in err
    assert not wrong.exists()
    assert len(load_delta(out / "subject.delta.safetensors").tensors) == 258


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_bad_input_gets_one_line_and_damages_nothing(photos, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["pretrain", "--data", str(empty), "--out", str(tmp_path / "o1")], "holds no images")
    _fails(capsys, ["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], "does not exist")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "photo.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _fails(capsys, ["pretrain", "--data", str(bad), "--out", str(tmp_path / "o1")], "photo.jpg")
    _fails(capsys, ["customize", "--image", str(bad / "photo.jpg"), "--out", str(tmp_path / "o1")], "photo.jpg")
    assert not (tmp_path / "o1").exists()

    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    _fails(capsys, ["customize", "--image", str(photos / "chelsea.png"), "--out", str(blocker)], "not a folder")
    _fails(capsys, ["customize", "--image", str(photos / "chelsea.png"), "--out", str(blocker / "sub")],
           "cannot write")
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("precious")
    _fails(capsys, ["customize", "--image", str(photos / "chelsea.png"), "--out", str(used)], "not empty")
    _fails(capsys, ["customize", "--image", str(photos / "chelsea.png"), "--out", str(tmp_path / "o2"),
                    "--resume", str(tmp_path / "none.safetensors")], "does not exist")
    _fails(capsys, ["customize", "--image", str(photos / "chelsea.png"), "--out", str(tmp_path / "o2"),
                    "--lr", "-1"], "learning_rate")
    _fails(capsys, ["customize", "--image", str(photos / "chelsea.png"), "--out", str(tmp_path / "o2"),
                    "--precision", "fp16"], "CUDA")
    _fails(capsys, ["apply-delta", "--delta", str(blocker), "--out", str(tmp_path / "o3")], "cannot read")
    assert blocker.read_text() == "keep me" and (used / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"]
