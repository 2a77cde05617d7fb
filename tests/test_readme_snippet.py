"""The README's Python snippet for search runs as written (on a tiny model and index of its own)."""

import re
from pathlib import Path

from test_search import save_tiny

from tipslab.retrieval.index_dir import build_index

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_search_snippet_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    snippet = next(b for b in blocks if "tipslab.search(" in b)
    model = save_tiny(tmp_path / "runs" / "tipsv2_tiny" / "latest" / "model")  
    build_index(model, "scenes:val:2", tmp_path / "runs" / "index", progress=False)
    monkeypatch.chdir(tmp_path)  # the snippet's relative paths, as after `make demo`
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert tuple(scope["probs"].shape) == (1, 2) and scope["probs"].grad_fn is None
    assert not scope["text"].requires_grad and not scope["image"].cls1.requires_grad
    assert abs(float(scope["probs"].sum()) - 1.0) < 1e-5
    # A VisionOutput given as is stands for its CLS1.
    assert scope["model"].encoder.similarity(scope["image"], scope["text"]).tolist() == scope["probs"].tolist()
    hits = scope["hits"]
    assert {"image", "box", "score", "confidence", "heatmap"} <= set(hits.columns) and hits.height <= 5


def test_readme_index_and_search_commands_work_after_the_demo(tmp_path, monkeypatch, capsys):
    import shlex

    from tipslab.platform.cli import main

    section = README.read_text(encoding="utf-8").split("## Index and search", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.startswith(".venv/bin/tipslab")]
    assert [c[1] for c in commands] == ["index", "search", "serve"]
    model = save_tiny(tmp_path / "runs" / "tipsv2_tiny" / "latest" / "model")  
    build_index(model, "scenes:val:2", tmp_path / "runs" / "index", progress=False)  # what `make demo` left
    monkeypatch.chdir(tmp_path)
    for command in commands[:2]:  # serve runs until stopped: tests/test_serve.py starts it
        assert main(command[1:] + (["--quiet"] if command[1] == "index" else [])) == 0, command
    assert "64 images" in capsys.readouterr().out
