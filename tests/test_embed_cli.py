"""`tipslab embed` as a user runs it: a progress bar on long work, texts from standard input,
`tipslab --version`, and a help text for every option."""

import io
import sys

import numpy as np
import pytest
from test_api_embed import _run_embed, checkpoint, image_dir  # noqa: F401 (fixtures)

from tipslab.errors import TipslabError


def test_progress_bar_and_texts_from_standard_input(checkpoint, image_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(sys, "stdin", io.StringIO("a red square\n\n  a dog  \n"))
    out = tmp_path / "emb.npz"
    assert _run_embed([str(checkpoint), "--images", str(image_dir), "--texts-file", "-", "--batch-size", "1",
                       "--out", str(out)]) == 0
    assert np.load(out)["texts"].tolist() == ["a red square", "a dog"]
    err = capsys.readouterr().err
    assert "embed images" in err and "2/2" in err
    assert _run_embed([str(checkpoint), "--images", str(image_dir), "--quiet", "--out", str(out)]) == 0
    assert "embed images" not in capsys.readouterr().err
    with pytest.raises(TipslabError, match="--batch-size: expected a positive integer, got 0"):
        _run_embed([str(checkpoint), "--texts", "x", "--batch-size", "0", "--out", str(out)])


def test_version_and_every_option_has_help(capsys):
    from tipslab import __version__
    from tipslab.platform.cli import build_parser, main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tipslab {__version__}"
    parser = build_parser()
    missing = []
    for name, command in parser._subparsers._group_actions[0].choices.items():  # argparse has no public walk
        for action in command._actions:
            if action.help is None and action.dest != "help":
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without a help text: {missing}"
