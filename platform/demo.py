"""`make demo`: the whole product end to end on the built-in default, on CPU, in minutes.

Train the tiny experiment on the scenes dataset (tracked in MLflow), index the scenes validation
split with the trained model, search it for a phrase, evaluate the model on every suite of
`tipslab eval` (table and pictures), and say where everything is.
Every step goes through the same `tipslab` commands a user types.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tipslab.errors import TipslabError


def run_demo(runs: Path, query: str, steps: int | None, k: int) -> int:
    from tipslab.platform.cli import main as tipslab
    from tipslab.platform.config import load_config
    from tipslab.platform.summary import print_train_summary
    from tipslab.platform.train import train

    runs = runs.resolve()
    # Evaluated every 50 steps as well as at the end, so the curves picture shows the numbers move.
    overrides = [f"run_dir={runs / 'tipsv2_tiny'}", "eval.every_n_steps=50"]
    if steps is not None:
        overrides.append(f"trainer.max_steps={steps}")
    started = time.perf_counter()

    print("== 1/4 train (tipsv2_tiny on the built-in scenes, CPU)")
    result = train(load_config("tipsv2_tiny", overrides))
    print_train_summary(result)

    index_dir = runs / "index"
    print("\n== 2/4 index the scenes validation split")
    code = tipslab(["index", str(result.model_dir), "scenes:val", "--out", str(index_dir), "--overwrite"])
    if code:
        return code

    print(f"\n== 3/4 search: {query!r}")
    pictures = index_dir / "search" / "demo"
    # The best k whatever their confidence: a model trained for minutes rarely clears search's
    # default 0.5, and the demo is there to show the pictures (each hit prints its confidence).
    code = tipslab(["search", str(index_dir), query, "--k", str(k), "--out", str(pictures), "--threshold", "0"])
    if code:
        return code

    # The run's own end-of-training evaluation (platform/eval_callback.py) is what `tipslab eval
    # MODEL` computes (same code, same seed): show it rather than compute it twice.
    eval_dir = result.run_dir / "eval"
    print("\n== 4/4 evaluation of the run: zero-shot segmentation, retrieval, classification, k-NN, "
          "region search (scenes val, values and chance in %)")
    table = eval_dir / "eval.md"
    if not table.is_file():
        return tipslab(["eval", str(result.model_dir), "--out", str(eval_dir)])
    print(table.read_text(), end="")
    for picture in sorted(eval_dir.glob("*.png")):
        print(f"picture : {picture}")

    db = result.tracking_uri
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    print(f"  MLflow run : {result.experiment_name} / {result.run_id} in {db}")
    print("               open: make mlflow-ui   then http://127.0.0.1:5000")
    print(f"  checkpoint : {result.model_dir}  (Lightning checkpoints: {result.checkpoint_dir})")
    print(f"               open: python -c \"import tipslab; m = tipslab.load_model('{result.model_dir}')\"")
    print(f"  index      : {index_dir}")
    print(f"               open: .venv/bin/tipslab search {index_dir} \"a blue square\"")
    print(f"               or:   .venv/bin/tipslab serve {index_dir}   then http://127.0.0.1:8000")
    print(f"  pictures   : {pictures}")
    print(f"               open: xdg-open {pictures / 'hits.png'}")
    print(f"  evaluation : {eval_dir / 'eval.md'}  (pictures: pca, zeroshot_seg, query_heatmaps, curves .png)")
    print(f"               again: .venv/bin/tipslab eval {result.model_dir} --suite zeroshot_seg,regions")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where runs, MLflow and the index go")
    parser.add_argument("--query", default="a red circle")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps")
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        return run_demo(args.runs, args.query, args.steps, args.k)
    except TipslabError as err:
        print(f"tipslab demo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
