"""FP and W8A8 forecasting MSE / MAE of a STanHop-Net checkpoint on the whole test split (the papers' numbers),
next to the naive last-value forecast, on the normalised scale:

    python -m model.stanhop.test_split --checkpoint runs/stanhop_tiny/checkpoints/step_400 [--quant w8a8] [--json]
        [--max-windows N]

The model, W8A8 copy and calibration are launcher.evaluate's (outliers/report.py); only the examples differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common.errors import ProjectError


def evaluate_test_split(checkpoint: Path, quant: bool, max_windows: int | None = None) -> dict[str, Any]:
    from launcher.config import load_config
    from launcher.hf_checkpoint import check_shapes, expected_shapes, locate, read_weights
    from model.family import family_of
    from outliers.ptq import calibrate, quantize_w8a8
    from outliers.report import EvalSettings, block_batches, calibration_blocks, model_from_state, perplexity

    from model.stanhop.spec import StanhopSpec, naive_last_value

    config_path, folder = locate(checkpoint)
    cfg = load_config(config_path)
    spec = family_of(cfg.model)
    if not isinstance(spec, StanhopSpec):
        raise ProjectError(f"{folder} is a model.family={cfg.model.family} checkpoint, not stanhop")
    _, state = read_weights(checkpoint)
    check_shapes(state, expected_shapes(cfg), str(folder))
    model = model_from_state(cfg, state)
    settings = EvalSettings.from_config(cfg, quant=quant)
    examples = spec.test_examples(cfg, max_windows)
    result: dict[str, Any] = {"checkpoint": str(folder), "test_windows": len(examples),
                              **{f"test_{k}": v for k, v in perplexity(model, examples, settings.micro_batch_size).items()
                                 if k != "loss"},
                              **{k.replace("naive_last", "test_naive_last"): v
                                 for k, v in naive_last_value(examples).items()}}
    if settings.ptq is not None:
        qmodel = quantize_w8a8(model, settings.ptq)
        calibrate(qmodel, block_batches(calibration_blocks(cfg), settings.calibration_batch_size, spec))
        result.update({f"w8a8_test_{k}": v for k, v in perplexity(qmodel, examples, settings.micro_batch_size).items()
                       if k != "loss"})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step folder, checkpoints/ or the run directory")
    parser.add_argument("--quant", choices=("none", "w8a8"), default="none")
    parser.add_argument("--max-windows", type=int, default=None, help="evenly spaced test windows (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = evaluate_test_split(Path(args.checkpoint), args.quant == "w8a8", args.max_windows)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
