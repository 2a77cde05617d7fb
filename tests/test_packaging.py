"""The card's root `platform/` folder must not shadow Python's standard `platform` module."""

import subprocess
import sys
from pathlib import Path

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
    for command in ("train", "index", "search", "embed"):
        assert command in out.stdout
