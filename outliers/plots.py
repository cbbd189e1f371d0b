"""Pictures of an evaluation: the per-layer kurtosis / inf-norm heatmap, and TensorBoard logging."""

from __future__ import annotations

from typing import Any

import torch

from outliers.stats import layer_of

ROW_LABELS = {"attn_out_proj": "attn out_proj", "attn_layer_norm": "attn LN", "ffn_out": "FFN out",
              "ffn_layer_norm": "FFN LN", "ffn_residual": "FFN LN input",
              "layer_out": "layer output"}


def per_layer_kinds(modules: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The kinds of one layer's hooked activations (the heatmap's rows), in the family's table order."""
    kinds = dict.fromkeys(stats["kind"] for name, stats in modules.items() if layer_of(name) is not None)
    if not kinds:
        raise ValueError("no per-layer modules in the evaluation result")
    return tuple(kinds)


def per_layer_grid(modules: dict[str, dict[str, Any]], key: str) -> list[list[float]]:
    """[kind][layer] values of `key` for the per-layer modules (OPT's final LayerNorm is left out)."""
    kinds = list(per_layer_kinds(modules))
    located = {name: layer_of(name) for name in modules}
    layers = 1 + max(where for where in located.values() if where is not None)
    grid = [[float("nan")] * layers for _ in kinds]
    for name, stats in modules.items():
        where = located[name]
        if where is not None:
            grid[kinds.index(stats["kind"])][where] = stats[key]
    return grid


def tensorboard_tag(name: str) -> str:
    """A statistics name as a TensorBoard tag (TensorBoard would rewrite the ':' of `...LayerNorm:input`)."""
    return name.replace(":", "_")


def per_layer_figure(result: dict[str, Any]):  # noqa: ANN201 - a matplotlib Figure
    """Two heatmaps (kurtosis, inf norm): rows = hooked module kinds, columns = layers, log colour scale
    (OPT: 5 rows and the final LayerNorm in the title; BERT: FFN out, its LayerNorm's input and output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    modules = result["modules"]
    # A fixed layout: constrained_layout's solver doubles the render time, paid at every evaluation.
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16, top=0.9, wspace=0.45)
    for ax, (key, title) in zip(axes, (("kurtosis", "kurtosis (avg over sequences)"),
                                      ("inf_norm", "inf norm (avg over sequences)"))):
        grid = torch.tensor(per_layer_grid(modules, key))
        positive = grid[grid > 0]
        norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.numel() else None
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", norm=norm)
        for row in range(grid.shape[0]):
            for col in range(grid.shape[1]):
                value = float(grid[row, col])
                light = float(image.norm(value)) > 0.6 if value > 0 else False
                ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white")
        kinds = per_layer_kinds(modules)
        ax.set_yticks(range(len(kinds)), [ROW_LABELS.get(k, k) for k in kinds])
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("layer")
        final = modules.get("decoder.final_layer_norm", {}).get(key)
        ax.set_title(f"{title}; final LN {final:.3g}" if final is not None else title, fontsize=9)
        fig.colorbar(image, ax=ax)
    return fig


def log_sinks(writer: Any, layers: list[dict[str, Any]], step: int) -> None:
    """Attention-sink scalars per layer (head means; outliers/sinks.py) and the BOS mass of every head."""
    for layer in layers:
        j = layer["layer"]
        for key in ("bos_mass_mean", "sink_head_share", "residual_norm_ratio", "value_norm_ratio", "nothing_mass",
                    "gate_mean"):
            value = layer.get(key)
            if isinstance(value, list):
                value = sum(value) / len(value) if value else None
            if value is not None:
                writer.add_scalar(f"sinks_{key}/layer_{j}", value, step)
        for head, mass in enumerate(layer.get("bos_mass") or []):
            writer.add_scalar(f"sinks_bos_mass_per_head/layer_{j}_head_{head}", mass, step)


def log_backcopy(writer: Any, result: dict[str, Any], step: int) -> None:
    """The bigram_backcopy task's sink scalars (outliers/backcopy.py): the headline and, per layer and head,
    the BOS / nothing mass and the gate split by trigger and non-trigger queries, and the norms."""
    from outliers.backcopy import BACKCOPY_KEYS

    for key in BACKCOPY_KEYS:
        if result.get(key) is not None and key not in ("sink_layer", "sink_head"):
            writer.add_scalar(f"backcopy/{key}", result[key], step)
    for layer in result.get("backcopy") or []:
        j = layer["layer"]
        for key, value in layer.items():
            if isinstance(value, list):
                for head, v in enumerate(value):
                    writer.add_scalar(f"backcopy_{key}/layer_{j}_head_{head}", v, step)
            elif isinstance(value, float):
                writer.add_scalar(f"backcopy_{key}/layer_{j}", value, step)


def log_tensorboard(writer: Any, result: dict[str, Any], worst_activations: torch.Tensor | None, step: int) -> None:
    """Scalars per module, a histogram of the worst module's activations and the per-layer image."""
    import matplotlib.pyplot as plt

    for name, stats in result["modules"].items():
        writer.add_scalar(f"outliers_kurtosis/{tensorboard_tag(name)}", stats["kurtosis"], step)
        writer.add_scalar(f"outliers_inf_norm/{tensorboard_tag(name)}", stats["inf_norm"], step)
    log_sinks(writer, result.get("sinks") or [], step)
    log_backcopy(writer, result, step)
    if worst_activations is not None:
        # One fixed tag: which module it was at each step is in metrics.jsonl (worst_module).
        writer.add_histogram("outliers/worst_module_activations", worst_activations.flatten(), step)
    fig = per_layer_figure(result)
    writer.add_figure("outliers/per_layer", fig, step)
    plt.close(fig)
    writer.flush()


def outlier_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The per-module outlier statistics of an evaluation (outliers/report.py) as table columns and rows."""
    columns = ["module", "kind", "layer", "kurtosis", "inf_norm", "kurtosis_rest", "inf_norm_rest"]
    rows = [[name, stats["kind"], layer_of(name), stats["kurtosis"], stats["inf_norm"], stats.get("kurtosis_rest"),
             stats.get("inf_norm_rest")] for name, stats in result["modules"].items()]
    return columns, rows
