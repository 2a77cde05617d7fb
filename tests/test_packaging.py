"""The card's root `platform/` folder must not shadow Python's standard `platform` module."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_and_torch_import_from_repository_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, torch; print(platform.system(), platform.__file__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert str(ROOT / "platform") not in out.stdout


def test_platform_folder_has_no_init():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_tipslab_subpackages_resolve_to_the_card_folders():
    import tipslab.datamodules
    import tipslab.modules
    import tipslab.platform.config
    import tipslab.retrieval

    assert Path(tipslab.platform.config.__file__).parent == ROOT / "platform"
    assert Path(tipslab.modules.__file__).parent == ROOT / "modules"


def test_console_script_help_lists_subcommands():
    exe = Path(sys.executable).parent / "tipslab"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("train", "index", "search", "serve", "embed"):
        assert command in out.stdout


@pytest.mark.slow
def test_plain_pip_install_carries_every_folder_and_the_experiments(tmp_path):
    """`pip install .` (no editable finder, no checkout on the path) finds everything."""
    import shutil

    source, target = tmp_path / "src", tmp_path / "site"
    # Build from a copy so setuptools' build/ folder does not land in the checkout.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert not (target / "tipslab" / "platform" / "__init__.py").exists()
    for page in ("index.html", "app.js", "style.css"):  # the search page of `tipslab serve`
        assert (target / "tipslab" / "retrieval" / "page" / page).is_file(), page
    probe = (
        "import tipslab, tipslab.platform.config as c, tipslab.retrieval.search, tipslab.datamodules.scenes;"
        "print(c.__file__); print(c.load_config('tipsv2_tiny').model.vision.size)"
    )
    env = {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(target) in out.stdout and out.stdout.strip().endswith("tiny")
