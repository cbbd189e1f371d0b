"""The markdown tables of a `benchmarks.gpu_check` report (report.json -> report.md).

    python -m benchmarks.gpu_report DIR/report.json     # print the tables of a report again
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from common.cli import ArgumentParser, run_command
from common.errors import ProjectError


def _num(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _status_table(report: dict[str, Any]) -> list[str]:
    rows = [[name, s.get("title", ""), s["status"], f"{s.get('wall_s', 0):.1f}", f"{s.get('budget_s', 0):.0f}",
             (s.get("error") or "").replace("|", "/")] for name, s in report["sections"].items()]
    return _table(["section", "what", "status", "wall s", "budget s", "error"], rows)


def _env(section: dict[str, Any]) -> list[str]:
    r = section["results"]
    if not r:
        return []
    keys = ["gpu", "capability", "gpu_memory_gib", "driver", "torch", "torch_cuda", "cudnn", "triton", "deepspeed",
            "megatron-core", "transformers", "python", "datasheet_bf16_tflops", "auto_backend_softmax1"]
    return _table(["what", "value"], [[k, _num(r.get(k), ".4g")] for k in keys if k in r])


def _kernels(section: dict[str, Any]) -> list[str]:
    r = section["results"]
    if "passed" not in r:
        return []
    lines = [f"{r['mode']}: {r['passed']} passed, {len(r['failed'])} failed, {len(r['skipped'])} skipped."]
    lines += [f"- failed: `{f}`" for f in r["failed"][:20]]
    lines += [f"- skipped: {s}" for s in r["skipped"][:10]]
    return lines


def _attention(section: dict[str, Any]) -> list[str]:
    r = section["results"]
    if not r.get("rows"):
        return []
    rows = []
    for row in r["rows"]:
        measured = "time_ms" in row
        rows.append([str(row["head_dim"]), str(row["seq"]), f"{row['batch']} x {row['heads']}", row["method"],
                     _num(row.get("time_ms"), ".3f") if measured else row.get("skipped", "-"),
                     f"{row['ratio']:.2f}x" if measured else "-", _num(row.get("tflops"), ".3g"),
                     _num(row.get("peak_mib"), ".4g")])
    lines = [f"bf16, causal, fwd+bwd, {r['tokens_per_batch']} tokens per batch, width {r['width']}, median of "
             f"{r['reps']} interleaved reps; TFLOP/s: {r['flops']}.", ""]
    lines += _table(["d", "T", "batch x heads", "method", "ms", "vs flash SDPA", "TFLOP/s", "peak MiB"], rows)
    if r.get("memory_exponent"):
        lines += ["", "Memory growth per sequence between consecutive T (1 = linear, 2 = quadratic): " + "; ".join(
            f"{k}: {', '.join(_num(x, '.2f') for x in v)}" for k, v in r["memory_exponent"].items() if v)]
    if r.get("target"):
        lines += ["", "Target (measured, not asserted): " + "; ".join(r["target"])]
    return lines


def _training(section: dict[str, Any]) -> list[str]:
    r = section["results"]
    if not r.get("rows"):
        return []
    rows = []
    for row in r["rows"]:
        mfu = row["mfu"] if isinstance(row["mfu"], str) else "-" if row["mfu"] is None else f"{row['mfu'] * 100:.1f}%"
        rows.append([row["case"], str(row["seq"]), str(row["batch"]), row["model"], _num(row["tokens_per_s"], ",.0f"),
                     f"{row['ratio_to_transformers']:.2f}x", _num(row["model_tflops"], ".3g"), mfu,
                     _num(row["peak_gib"], ".2f"), f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}"])
    lines = [f"bf16, {r['optimizer']}; {r['warmup']} warm-up + {r['steps']} timed steps (median); MFU: {r['mfu']} "
             f"({_num(r['datasheet_bf16_tflops'], '.0f')} TFLOP/s).", ""]
    return lines + _table(["model", "T", "batch", "implementation", "tokens/s", "vs transformers", "TFLOP/s", "MFU",
                           "peak GiB", "loss first -> last"], rows)


def _outliers(section: dict[str, Any]) -> list[str]:
    r = section["results"]
    if "val_blocks" not in r:
        return []
    row = [r["config"], _num(r.get("parameters_m"), ".3g") + "M", f"{r['val_blocks']} + {r['calibration_blocks']}",
           str(r["seq"]), _num(r.get("eval_s"), ".2f"), _num(r.get("val_ppl"), ".4g"), _num(r.get("w8a8_val_ppl"), ".4g"),
           _num(r.get("avg_kurtosis"), ".3g"), _num(r.get("max_inf_norm"), ".3g")]
    return ["Freshly initialised weights (the time and the CUDA path are the point, not the values).", ""] + _table(
        ["config", "params", "val + calibration blocks", "T", "eval s", "FP ppl", "W8A8 ppl", "avg kurtosis",
         "max inf norm"], [row])


def _resume(section: dict[str, Any]) -> list[str]:
    r = section["results"]
    if "max_diff_after" not in r:
        return []
    split, steps = r["split_at"], r["steps"]
    row = [r["config"], f"{split} + {steps - split} vs {steps}", _num(r["max_diff_before"], ".3g"),
           _num(r["max_diff_after"], ".3g"), "yes" if r["bit_identical"] else "no", _num(r["tolerance"], ".3g")]
    return _table(["config", "steps", f"max abs loss diff, steps 1-{split}", f"same, steps {split + 1}-{steps}",
                   "bit-identical", "tolerance"], [row])


DETAILS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "env": _env, "kernels": _kernels, "attention": _attention, "training": _training, "outliers": _outliers,
    "resume": _resume}


def format_markdown(report: dict[str, Any]) -> str:
    env = report["sections"].get("env", {}).get("results", {})
    where = "CPU, --quick (toy sizes)" if report["quick"] else env.get("gpu", "GPU")
    lines = [f"# GPU check, {report['started']}: {where}", "",
             f"{'all sections passed' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])}; "
             f"{report['wall_s']:.0f} s of the {report['deadline_s']:.0f} s deadline.", ""]
    lines += _status_table(report)
    for name, section in report["sections"].items():
        detail = DETAILS.get(name, lambda s: [])(section)
        if detail:
            lines += ["", f"## {section.get('title', name)}", ""] + detail
    return "\n".join(lines)


def summary_lines(report: dict[str, Any], json_path: Path, md_path: Path) -> list[str]:
    verdict = "all passed" if report["ok"] else f"FAILED: {', '.join(report['failed'])}"
    return ["", f"gpu_check: {verdict} ({report['wall_s']:.0f} s)", f"report: {md_path}", f"        {json_path}"]


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.gpu_report", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.splitlines()[0])
    parser.add_argument("report", help="a gpu_check report.json")
    path = Path(parser.parse_args(argv).report)
    if not path.is_file():
        raise ProjectError(f"report file not found: {path}")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProjectError(f"{path} is not a JSON report: {error}") from None
    if not isinstance(report, dict) or "sections" not in report:
        raise ProjectError(f"{path} is not a gpu_check report (no 'sections')")
    print(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
