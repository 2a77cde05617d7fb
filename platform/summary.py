"""What a person sees at the end of a run: where each output is and the command that opens it."""

from __future__ import annotations

import shlex


def print_train_summary(result) -> None:
    first = f"{result.first_loss:.4f}" if result.first_loss is not None else "n/a"
    last = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    db = result.tracking_uri
    print()
    print("training finished")
    print(f"  loss (mean of first / last steps): {first} -> {last}")
    ev = result.evaluation or {}
    if "eval/pointing_acc_dense" in ev:
        print(
            f"  patch-text pointing (scenes val): dense {ev['eval/pointing_acc_dense']:.3f}, "
            f"final {ev['eval/pointing_acc_final']:.3f}, chance {ev['eval/pointing_chance']:.3f} "
            f"(best patch on any object: dense {ev['eval/pointing_any_object_dense']:.3f}; "
            f"scores relative to the vocabulary: dense {ev.get('eval/pointing_calibrated_dense', float('nan')):.3f})"
        )
    if (result.run_dir / "eval" / "eval.md").is_file() and any(k.count("/") == 4 for k in ev):
        print(f"  evaluation     : {result.run_dir / 'eval' / 'eval.md'}  (and its pictures; tipslab eval MODEL)")
    print(f"  MLflow run     : {result.experiment_name} / {result.run_id}")
    print(f"                   open: make mlflow-ui  (or: mlflow ui --backend-store-uri {shlex.quote(db)})")
    print(f"  run folder     : {result.run_dir}")
    print(f"  checkpoints    : {result.checkpoint_dir}  (continue: checkpoint.resume={result.run_dir.name})")
    print(f"  model          : {result.model_dir}")
    print(f"                   index with it: tipslab index {result.model_dir} scenes:val --out <dir>")
