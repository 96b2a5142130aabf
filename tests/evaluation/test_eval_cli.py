"""``profusion-rt eval`` on the command line: bad input is one line and exit 2 with nothing written; the
folder mode scores identical and perturbed images; a backend broken on purpose is flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from profusion_rt.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, astronaut):
    """reference.png, folders ``same`` (two images), ``copy`` (the same two), ``noisy`` (perturbed copies),
    ``one`` (one image), ``mixed`` (an image and a text file)."""
    root = tmp_path_factory.mktemp("eval-files")
    photo = Image.fromarray(astronaut).resize((64, 64))
    photo.save(root / "reference.png")
    rng = np.random.default_rng(0)
    images = [photo, photo.rotate(90)]
    for name in ("same", "copy", "noisy", "one", "mixed"):
        (root / name).mkdir()
    for i, im in enumerate(images):
        im.save(root / "same" / f"{i}.png")
        im.save(root / "copy" / f"{i}.png")
        noisy = np.clip(np.asarray(im, dtype=np.float64) + rng.normal(0, 30, (64, 64, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(root / "noisy" / f"{i}.png")
    photo.save(root / "one" / "0.png")
    photo.save(root / "mixed" / "0.png")
    (root / "mixed" / "notes.txt").write_text("not an image")
    return root


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    ([], "--reference is required"),
    (["--reference", "{root}/missing.png"], "missing.png"),
    (["--reference", "{root}/reference.png", "--images", "{root}/mixed"], "not an image (e.g. notes.txt)"),
    (["--reference", "{root}/reference.png", "--images", "{root}/same", "--images", "{root}/one"],
     "differ in count"),
    (["--reference", "{root}/reference.png", "--images", "{root}/same", "--prompt", "a", "--prompt", "b",
      "--prompt", "c"], "3 prompts for 2 images"),
    (["--reference", "{root}/reference.png", "--images", "{root}/nowhere"], "does not exist"),
    (["--reference", "{root}/reference.png", "--backends", "eager,tensorflow"], "unknown backend 'tensorflow'"),
    (["--reference", "{root}/reference.png", "--images", "{root}/same", "--backends", "torch"], "one or the other"),
    (["--reference", "{root}/reference.png", "--dino", "{root}/no-dino"], "DINO model folder"),
    (["--reference", "{root}/reference.png", "--face-model", "{root}/no-face.onnx"], "face-embedding model"),
    (["--reference", "{root}/reference.png", "--seeds", "1,x"], "--seeds"),
    (["--reference", "{root}/reference.png", "--prompts", "{root}/no-prompts.txt"], "cannot read --prompts"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(files, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = ["eval", "--out", str(out), "--no-progress", *[a.format(root=files) for a in args]]
    assert main(argv) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_missing_optional_model_is_a_clear_line_not_a_traceback(files, tmp_path, capsys):
    (tmp_path / "dino").mkdir()
    (tmp_path / "dino" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["eval", "--reference", str(files / "reference.png"), "--images", str(files / "same"),
                 "--dino", str(tmp_path / "dino"), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert "model_type 'bert' is not dinov2 or vit" in line and "Traceback" not in line


def test_folder_mode_identical_and_perturbed(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--reference", str(files / "reference.png"), "--images", f"eager={files / 'same'}",
               "--images", f"copy={files / 'copy'}", "--images", f"noisy={files / 'noisy'}",
               "--prompt", "a photo of a {S*}", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    summary = {s["set"]: s for s in data["summary"]}
    assert summary["eager"]["status"] == "reference"
    assert summary["copy"]["status"] == "ok"
    assert summary["copy"]["psnr_db_min"] is None  # infinite PSNR, written as null (see notes)
    assert any("infinite PSNR" in n for n in data["notes"])
    assert summary["copy"]["clip_i_pair_min"] == pytest.approx(1.0, abs=1e-6)
    assert summary["copy"]["ssim_min"] == pytest.approx(1.0)
    assert summary["noisy"]["status"].startswith("FLAGGED")
    assert summary["noisy"]["psnr_db_min"] < 30 and summary["noisy"]["clip_i_pair_min"] < 1.0 - 1e-6
    assert summary["noisy"]["ssim_min"] < 0.95
    assert data["weights"] == "random (preset tiny)" and "meaningless" in data["quality_note"]
    md = (out / "eval.md").read_text()
    assert "| copy | ok | inf |" in md and "| noisy | FLAGGED" in md
    assert Image.open(out / "grid.png").size == (4 * 160, 16 + 2 * 160)
    assert "fidelity FLAGGED for: noisy" in capsys.readouterr().out


def test_backend_broken_on_purpose_is_flagged(files, tmp_path, monkeypatch):
    """torch's stage engine adds noise to every stage output: the fidelity table flags it (the same run
    without the noise is ok: test_healthy_backend_is_ok)."""
    import torch

    from profusion_rt.runtime.torch_engine import TorchEngine

    run = TorchEngine.run

    def broken(self, feeds, outputs):
        run(self, feeds, outputs)
        out = outputs[self.output_name]
        out.add_(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out) * 0.5)

    monkeypatch.setattr(TorchEngine, "run", broken)
    out = tmp_path / "out"
    rc = main(["eval", "--reference", str(files / "reference.png"), "--backends", "torch", "--steps", "2",
               "--seeds", "0", "--prompt", "a {S*}", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    torch_row = next(s for s in data["summary"] if s["set"] == "torch")
    assert torch_row["status"].startswith("FLAGGED"), torch_row
    assert torch_row["latent_max_rel"] > 0.1
    assert (out / "images" / "eager" / "000-p0-s0.png").is_file()
    assert Image.open(out / "images" / "torch" / "000-p0-s0.png").text["weights"] == "random (preset tiny)"


def test_healthy_backend_is_ok(files, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--reference", str(files / "reference.png"), "--backends", "torch", "--steps", "2",
                 "--prompt", "a {S*}", "--out", str(out), "--no-progress"]) == 0
    torch_row = next(s for s in json.loads((out / "eval.json").read_text())["summary"] if s["set"] == "torch")
    assert torch_row["status"] == "ok" and torch_row["latent_max_rel"] < 1e-4 and torch_row["psnr_db_min"] > 60


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("profusion-rt ")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for option in ("--reference", "--images", "--backends", "--clip", "--dino", "--face-model", "--psnr-min"):
        assert option in text


def test_generate_help_shows_every_default(capsys):
    import re

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    blocks = [" ".join(b.split()) for b in re.split(r"\n(?=  -)", options)[1:]]
    assert len(blocks) > 20
    for block in blocks:
        if block.startswith(("-h", "--prompt ")):  # help, and the one required option
            continue
        assert "default" in block, block
    assert "--steps STEPS DDIM steps (default: 50)" in blocks
    assert "--guidance-scale GUIDANCE_SCALE classifier-free guidance scale w (default: 7.0)" in blocks
