"""Packaging: the wheel's only top-level package is ``profusion_rt``; the folders export/ and benchmarks/
install as ``profusion_rt.export`` and ``profusion_rt.benchmarks``; an installed (non-editable) copy runs
the demo from another working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
#: source folder of each installed name prefix (pyproject's package-dir)
ROOTS = {"profusion_rt": "profusion_rt", "profusion_rt.export": "export", "profusion_rt.benchmarks": "benchmarks"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _folder_packages() -> set[str]:
    found = set()
    for prefix, folder in ROOTS.items():
        base = REPO / folder
        for init in base.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(base)
            found.add(".".join([prefix, *rel.parts]))
    return found


def test_package_list_matches_folders():
    setup = _pyproject()["tool"]["setuptools"]
    assert setup["package-dir"] == ROOTS
    assert set(setup["packages"]) == _folder_packages()
    assert len(setup["packages"]) == len(set(setup["packages"]))


def test_every_source_folder_is_a_package():
    """A folder of .py files without __init__.py would silently be left out of the wheel."""
    missing = []
    for folder in ROOTS.values():
        for py in (REPO / folder).rglob("*.py"):
            if "__pycache__" in py.parts:
                continue
            if not (py.parent / "__init__.py").exists():
                missing.append(str(py.relative_to(REPO)))
    assert not missing, missing


def test_no_search_path_edits():
    """Nothing in the package edits sys.path or PYTHONPATH: it runs the same installed or editable."""
    offenders = []
    for folder in ROOTS.values():
        for py in (REPO / folder).rglob("*.py"):
            text = py.read_text()
            if "sys.path.insert" in text or "sys.path.append" in text or '"PYTHONPATH"' in text:
                offenders.append(str(py.relative_to(REPO)))
    assert not offenders, offenders


@pytest.mark.slow
def test_wheel_installs_one_top_level_package_and_runs_the_demo(tmp_path):
    """``pip wheel --no-deps .``: top_level.txt holds only profusion_rt; the installed copy (not the
    checkout) runs ``profusion-rt demo --backends eager,onnxruntime`` from an unrelated folder."""
    pytest.importorskip("onnxruntime")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "No matching distribution" in build.stderr + build.stdout:
        pytest.skip("cannot reach a package index for the build backend")
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("profusion_rt-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        top = [n for n in zf.namelist() if n.endswith(".dist-info/top_level.txt")]
        names = zf.namelist()
        if top:
            assert zf.read(top[0]).decode().split() == ["profusion_rt"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"profusion_rt"}
    assert "profusion_rt/export/cache.py" in names and "profusion_rt/benchmarks/worker.py" in names
    assert "profusion_rt/data/bpe_simple_vocab_16e6.txt.gz" in names
    assert "profusion_rt/data/toy-faces/toy-faces.safetensors" in names  # the toy-faces preset's weights

    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import profusion_rt.benchmarks.worker as w; print(w.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    demo = subprocess.run([sys.executable, "-m", "profusion_rt", "demo", "--backends", "eager,onnxruntime",
                           "--steps", "3", "--repeats", "1", "--threads", "1", "--out", "demo-out"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = work / "demo-out"
    assert any(out.glob("*.png")), sorted(p.name for p in out.iterdir())
    assert (out / "toy_faces_grid.png").is_file(), sorted(p.name for p in out.iterdir())  # learned images
    assert not (REPO / "demo-out").exists()
