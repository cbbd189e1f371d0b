"""Evaluate a checkpoint: the family's FP metrics, outlier statistics per module, and (--quant w8a8) the W8A8 metrics.

Works for every model family with the family's metrics (model/family.py): OPT next-token perplexity, BERT MLM
perplexity over the positions the fixed evaluation masks of data.mlm_eval_seed select, ViT top-1, STanHop-Net
MSE and MAE.

    python -m launcher.evaluate --checkpoint runs/opt_tiny/checkpoints/step_300 [--quant w8a8] [--json]

--checkpoint takes a step directory, a checkpoints directory (follows `latest`), a run directory, a
weights-only checkpoint (launcher.import_hf, launcher.consolidate) or a published model's Hugging Face / timm
folder (imported on the fly by launcher.import_hf with the family's recipe, or --recipe); every layout is read through
launcher.hf_checkpoint. The model is rebuilt from the run's config.yaml and evaluated exactly as during
training (outliers/report.py, same validation and calibration blocks), so when the step directory holds the
in-training result (outliers.json) the numbers are compared and must be identical.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from launcher.config import RunConfig, load_config
from launcher.hf_checkpoint import check_shapes, expected_shapes, locate, read_weights
from common.cli import ArgumentParser, run_command
from common.errors import ProjectError
from model.family import family_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="step directory, checkpoints directory, run directory or weights-only checkpoint")
    parser.add_argument("--quant", choices=("none", "w8a8"), default="none",
                        help="also evaluate W8A8 post-training quantization (default: FP only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the run's config, e.g. --set eval.max_blocks=null")
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="which split to evaluate; test: families with a test split (e.g. stanhop), keys "
                             "test_<metric> / w8a8_test_<metric>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--recipe", default=None,
                        help="for a Hugging Face / timm folder: the data/eval recipe of its import (launcher.import_hf "
                             "--config; default: the family's)")
    return parser.parse_args(argv)


def is_published_folder(path: Path) -> bool:
    """A Hugging Face / timm model folder (config.json) rather than one of this project's checkpoints."""
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def import_published(folder: Path, out: Path, recipe: str | None) -> Path:
    """launcher.import_hf of `folder` into `out` (its notes, e.g. a new MLM head, printed), for evaluation."""
    from launcher.import_hf import import_model, parse_args as import_args

    args = import_args(["--model", str(folder), "--out", str(out), "--force"] + (["--config", recipe] if recipe else []))
    _, _, notes = import_model(args)
    for note in notes:
        print(note, file=sys.stderr)
    return out


def evaluate_checkpoint(checkpoint: Path, quant: bool, overrides: list[str] | tuple[str, ...] = (),
                        device: str = "cpu", split: str = "validation") -> dict[str, Any]:
    """The result dict (as outliers.json holds it) plus checkpoint, step and the comparison with the
    in-training result when there is one (`in_training`: "identical", a list of differences, or None).
    split="test": the family's test split instead (FamilySpec.test_examples), its metrics named test_<m>."""
    from outliers.report import (RESULT_FILE, EvalSettings, calibration_blocks, differences, evaluate_model,
                                 model_from_state, validation_examples)

    # Any checkpoint layout (single rank, TP/PP manifests, ZeRO-3, weights-only) -> the full state dict.
    config_path, folder = locate(checkpoint)
    cfg: RunConfig = load_config(config_path, overrides)
    _, state = read_weights(checkpoint)
    check_shapes(state, expected_shapes(cfg), str(folder))
    model = model_from_state(cfg, state, device)
    if split == "test":
        val = family_of(cfg.model).test_examples(cfg)
        if val is None:
            raise ProjectError(f"model.family {cfg.model.family} has no test split (--split validation)")
    else:
        val = validation_examples(cfg)  # the family's examples (BERT: fixed MLM masks)
    calib = calibration_blocks(cfg) if quant else None
    evaluation = evaluate_model(model, val, calib, EvalSettings.from_config(cfg, quant=quant))
    step = int(folder.name.split("_", 1)[1]) if folder.name.split("_", 1)[-1].isdigit() else None
    result = {"checkpoint": str(folder), "step": step, **evaluation.to_dict()}
    if split == "test":  # val_<m> -> test_<m>, w8a8_val_<m> -> w8a8_test_<m>
        result = {re.sub(r"^(w8a8_)?val_", r"\1test_", key): value for key, value in result.items()}
        result["test_examples"] = len(val)
    recorded = folder / RESULT_FILE
    comparison: Any = None
    if recorded.is_file() and not overrides and split == "validation":
        diffs = differences(result, json.loads(recorded.read_text()))
        comparison = "identical" if not diffs else diffs
    result["in_training"] = comparison
    return result


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.evaluate", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from launcher.distributed import check_device

    check_device("--device", args.device)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint)
        if is_published_folder(checkpoint):
            checkpoint = import_published(checkpoint, Path(tmp) / checkpoint.name, args.recipe)
        result = evaluate_checkpoint(checkpoint, args.quant == "w8a8", args.overrides, args.device, args.split)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from outliers.report import RESULT_FILE, format_table

    print(f"== {result['checkpoint']} ==")
    print(format_table(result))
    comparison = result["in_training"]
    if comparison == "identical":
        print(f"in-training evaluation ({RESULT_FILE}): identical")
    elif comparison:
        print(f"in-training evaluation ({RESULT_FILE}) differs:\n  " + "\n  ".join(comparison))
    return 0


if __name__ == "__main__":
    sys.exit(main())
