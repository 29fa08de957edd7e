"""Results of one task of a ``mesa-vllm eval`` run: JSON, a Markdown table and PNG plots.

``results`` is the dict the CLI builds per task::

    {"task": "passkey" | "needle" | "ppl",
     "meta": {"train_len": int | None, "lengths": [int], "samples": int, "seed": int,
              "text": {...} | None (ppl), "timings": [...], ...},
     "methods": [{"name": str, "error": str | None, "points": [point], ...}]}

with points as made by ``harness.aggregate`` (accuracy in [0, 1] or None; ppl > 0 or None).
The ppl table shows the tail perplexity, then one over the whole text (``ppl_all``).
Plots follow the paper: accuracy vs length (Figure 3), perplexity vs length (Figure 4),
needle depth x length heat map per method (Figure 10).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Results = dict[str, Any]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
_STYLES = ["-", "--", "-.", ":"]


def _clean(x: Any) -> Any:
    """NaN/inf -> None recursively, so the JSON is standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(results: Results, path: str | Path) -> Path:
    """Write ``results`` as indented standard JSON (no NaN)."""
    path = Path(path)
    path.write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
    return path


def _metric(task: str) -> str:
    return "ppl" if task == "ppl" else "accuracy"


def fmt(value: float | None, task: str) -> str:
    """Cell text: accuracy with 2 decimals, perplexity with 2 decimals (3 significant if huge)."""
    if value is None:
        return "-"
    if task != "ppl" or value < 1e5:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def by_length(
    method: dict[str, Any], task: str, metric: str | None = None
) -> dict[int, float | None]:
    """{length: metric}; for needle the mean accuracy over depths (None if no depth scored).

    ``metric`` names another point key (e.g. ``ppl_all``); default: the task's own."""
    acc: dict[int, list[float]] = {}
    seen: set[int] = set()
    for p in method.get("points", []):
        seen.add(p["length"])
        v = p.get(metric or _metric(task))
        if v is not None:
            acc.setdefault(p["length"], []).append(v)
    return {n: (sum(acc[n]) / len(acc[n]) if n in acc else None) for n in sorted(seen)}


def _lengths(results: Results) -> list[int]:
    ls = {p["length"] for m in results["methods"] for p in m.get("points", [])}
    return sorted(ls | set(results.get("meta", {}).get("lengths", [])))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def markdown(results: Results) -> str:
    """A Markdown report: one row per length, one column per method, notes on errors/skips."""
    task, meta = results["task"], results.get("meta", {})
    methods = results["methods"]
    tail = meta.get("ppl_tail")
    title = {
        "passkey": "Passkey accuracy",
        "needle": "Needle accuracy (mean over depths)",
        "ppl": f"Perplexity (last {tail or '25% of the'} tokens of each text)",
    }[task]
    lines = [f"## {title}", ""]
    info = [f"{k}: {meta[k]}" for k in ("model", "train_len", "samples", "seed") if k in meta]
    if task == "ppl" and "text" in meta:
        info.append(f"text: {_text_label(meta['text'])}")
    if info:
        lines += ["; ".join(info), ""]
    lines += _metric_table(results, None)
    if task == "ppl" and meta.get("ppl_shared_end") and len(_lengths(results)) > 1:
        first = _lengths(results)[0]
        lines += [
            "",
            f"### Tail perplexity relative to {first} tokens (text i of every length "
            "ends at the same token: the same tokens scored, after more context)",
            "",
        ]
        lines += _metric_table(results, None, relative=True)
    if task == "ppl" and any("ppl_all" in p for m in methods for p in m.get("points", [])):
        lines += ["", "### Perplexity over the whole text (ppl_all)", ""]
        lines += _metric_table(results, "ppl_all")
    if task == "needle":
        for m in methods:
            lines += ["", f"### Needle accuracy, {m['name']} (rows: depth, columns: length)", ""]
            lines += _needle_grid(m, _lengths(results))
    notes = _notes(methods)
    if notes:
        lines += ["", "Notes:", *[f"- {s}" for s in notes]]
    return "\n".join(lines) + "\n"


def _text_label(text: dict[str, Any] | None) -> str:
    if not text:
        return "synthetic passkey filler"
    prov = text.get("provenance") or {}
    label = Path(text.get("path", "?")).name
    if prov.get("package"):
        label += f" ({prov['package']} {prov.get('version') or '?'})"
    return label


def _metric_table(results: Results, metric: str | None, relative: bool = False) -> list[str]:
    """One row per length, one column per method; ``relative``: each value over the same
    method's value at the shortest length."""
    task, methods, lengths = results["task"], results["methods"], _lengths(results)
    cols = {m["name"]: by_length(m, task, metric) for m in methods}
    rows = []
    for n in lengths:
        row = [str(n)]
        for m in methods:
            v = cols[m["name"]].get(n)
            if m.get("error"):
                row.append("error")
            elif relative:
                base = cols[m["name"]].get(lengths[0])
                row.append(f"{v / base:.3f}x" if base and v is not None else "-")
            else:
                row.append(fmt(v, task))
        rows.append(row)
    return _table(["length", *[m["name"] for m in methods]], rows)


def _needle_grid(method: dict[str, Any], lengths: list[int]) -> list[str]:
    cell = {(p["length"], p["depth"]): p.get("accuracy") for p in method.get("points", [])}
    depths = sorted({d for (_, d) in cell if d is not None})
    rows = [[f"{d:g}", *[fmt(cell.get((n, d)), "needle") for n in lengths]] for d in depths]
    return _table(["depth", *[str(n) for n in lengths]], rows)


def _notes(methods: list[dict[str, Any]]) -> list[str]:
    notes = []
    for m in methods:
        if m.get("error"):
            notes.append(f"{m['name']}: not evaluated: {m['error'].splitlines()[0]}")
        for p in m.get("points", []):
            where = f"{m['name']} @ {p['length']}" + (
                f" depth {p['depth']:g}" if p.get("depth") is not None else ""
            )
            if p.get("skipped"):
                notes.append(f"{where}: {p['skipped']}/{p['n']} skipped (prompt > max_model_len)")
            if p.get("errors"):
                notes.append(
                    f"{where}: {p['errors']}/{p['n']} request errors"
                    + (f" (first: {p['first_error']})" if p.get("first_error") else "")
                )
    return notes


def plot(results: Results, out_dir: str | Path) -> list[Path]:
    """Write the task's PNGs to ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    task = results["task"]
    paths = [_line_plot(results, out_dir / f"{task}.png")]
    if task == "needle":
        paths.append(_heatmaps(results, out_dir / "needle_heatmap.png"))
    return paths


def _line_plot(results: Results, path: Path) -> Path:
    import matplotlib.pyplot as plt

    task, meta = results["task"], results.get("meta", {})
    lengths = _lengths(results)
    many = len(results["methods"]) > 5  # legend beside the axes, 20 distinct colours
    fig, ax = plt.subplots(figsize=(9.2 if many else 7, 4.2), dpi=120)
    colours = plt.get_cmap("tab20").colors if len(results["methods"]) > 10 else None
    for i, m in enumerate(results["methods"]):
        vals = by_length(m, task)
        xs = sorted(vals)
        ys = [math.nan if vals[n] is None else vals[n] for n in xs]
        if xs and not m.get("error"):  # distinct markers/sizes keep overlapping lines visible
            ax.plot(
                xs,
                ys,
                marker=_MARKERS[i % len(_MARKERS)],
                ms=max(3.5, 10 - 1.8 * i),
                ls=_STYLES[i % len(_STYLES)],
                lw=1.6,
                label=m["name"],
                **({"color": colours[(2 * i) % 20 + (2 * i) // 20]} if colours else {}),
            )
    if lengths and min(lengths) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.minorticks_off()
    if meta.get("train_len"):
        ax.axvline(meta["train_len"], color="gray", ls="--", lw=1, label="train length")
    if task == "ppl":
        finite = [v for m in results["methods"] for v in by_length(m, task).values() if v]
        if finite and max(finite) > 10 * min(finite):
            ax.set_yscale("log")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title("Perplexity vs input length")
    else:
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("accuracy")
        ax.set_title(
            f"{'Passkey' if task == 'passkey' else 'Needle (mean over depths)'} "
            "accuracy vs input length"
        )
    ax.set_xlabel("input length (tokens)")
    ax.grid(True, alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _heatmaps(results: Results, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in results["methods"] if not m.get("error")] or results["methods"]
    lengths = _lengths(results)
    depths = sorted(
        {p["depth"] for m in methods for p in m.get("points", []) if p.get("depth") is not None}
    ) or [0.0]
    fig, axes = plt.subplots(
        1,
        len(methods),
        squeeze=False,
        dpi=120,
        figsize=(1.0 + 0.55 * len(lengths) * len(methods) + 1.2, 3.6),
    )
    im = None
    for ax, m in zip(axes[0], methods, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for p in m.get("points", []):
            if p.get("accuracy") is not None and p["depth"] in depths and p["length"] in lengths:
                grid[depths.index(p["depth"]), lengths.index(p["length"])] = p["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(m["name"], fontsize=9)
        ax.set_xlabel("length", fontsize=8)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="accuracy")
    fig.suptitle("Needle in a haystack: accuracy by depth and length", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def write_all(results: Results, out_dir: str | Path) -> dict[str, Path]:
    """results.json, table.md and the PNGs under ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(results, out / "results.json")}
    table = out / "table.md"
    table.write_text(markdown(results))
    paths["table"] = table
    for p in plot(results, out):
        paths[p.stem] = p
    return paths


PARTIAL_DIR = "partial"


def write_partial(results: Results, entry: dict[str, Any], out_dir: str | Path) -> Path:
    """Save one method's finished entry of a task at once (``out_dir/partial/<name>.json``),
    so a run that is killed before it writes its tables keeps what it measured."""
    path = Path(out_dir) / PARTIAL_DIR / f"{entry['name'].replace('/', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot = {"task": results["task"], "meta": results["meta"], "methods": [entry]}
    tmp = path.with_suffix(".tmp")
    write_json(snapshot, tmp)
    tmp.replace(path)
    return path


def rebuild(out_dir: str | Path) -> dict[str, Path]:
    """Tables, JSON and plots of a task directory from its ``partial/`` snapshots (the
    methods in the order they finished); for a run that was stopped before writing them."""
    files = sorted((Path(out_dir) / PARTIAL_DIR).glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no {PARTIAL_DIR}/*.json under {out_dir}")
    snaps = [json.loads(f.read_text()) for f in files]
    results = {"task": snaps[0]["task"], "meta": snaps[0]["meta"], "methods": []}
    for snap in snaps:
        results["methods"].extend(snap["methods"])
    return write_all(results, out_dir)
