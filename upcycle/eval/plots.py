"""PNG plots of training curves and head usage (matplotlib, Agg backend, imported on first use)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from upcycle.errors import UpcycleError


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise UpcycleError("plots need matplotlib: pip install 'matplotlib>=3.7'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: Path) -> Path:
    """Write ``fig`` to ``out_png`` atomically (a temporary file in the same folder, then a rename)."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()
        import matplotlib.pyplot as plt

        plt.close(fig)
    return out_png


def _read_metrics(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UpcycleError(f"cannot read metrics {path} ({e}): give the metrics.jsonl of a run") from e
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UpcycleError(
                    f"{path}:{number} is not valid JSON ({e.msg}): write one JSON object per line"
                ) from e
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]


def plot_loss_curve(metrics_jsonl: Path, out_png: Path) -> Path:
    """Train loss vs step, validation loss points (``val_loss``) and aux loss on a second axis (``aux_loss``) if
    present."""
    records = _read_metrics(metrics_jsonl)
    series = {
        key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        for key in ("loss", "val_loss", "aux_loss")
    }
    if not series["loss"] and not series["val_loss"]:
        raise UpcycleError(
            f"{metrics_jsonl} has no records with 'step' and 'loss' or 'val_loss': give the metrics of a run"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if series["loss"]:
        ax.plot(*zip(*series["loss"]), color="tab:blue", linewidth=1.2, label="train loss")
    if series["val_loss"]:
        ax.plot(*zip(*series["val_loss"]), "o-", color="tab:orange", markersize=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if series["aux_loss"]:
        aux = ax.twinx()
        aux.plot(
            *zip(*series["aux_loss"]), color="tab:green", linewidth=0.8, alpha=0.7, label="aux (load-balance) loss"
        )
        aux.set_ylabel("aux loss")
        more = aux.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(Path(metrics_jsonl).parent.name or "training")
    return _save(fig, out_png)


def plot_head_usage(usage, out_png: Path, title: str = "") -> Path:
    """Heat map of head usage ([layers][heads] list or tensor of fractions 0..1): layers on y, heads on x."""
    import numpy as np

    data = np.asarray(usage.tolist() if hasattr(usage, "tolist") else usage, dtype=float)
    if data.ndim != 2 or data.size == 0:
        raise UpcycleError(
            f"head usage must be a non-empty [layers][heads] table, got shape {data.shape}: dense models have none"
        )
    plt = _pyplot()
    layers, heads = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * heads + 2), max(3.0, 0.25 * layers + 1.5)))
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, heads, max(1, heads // 16)))
    ax.set_yticks(range(0, layers, max(1, layers // 16)))
    ax.set_title(title or f"head usage (mean {data.mean():.3f})")
    return _save(fig, out_png)
