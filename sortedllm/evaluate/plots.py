"""PNG plots from a results dict: each task's headline metric per exit (one line per model), similarity heatmaps
(exit x generated position) and the tournament matrix. Uses matplotlib's object API (no pyplot global state, no
display needed)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .base import headline

HEATMAPS = (("kl", "KL(last || exit), nats", "magma_r"), ("cosine", "cosine similarity to the last layer", "viridis"),
            ("top1", "top-1 agreement with the last layer", "viridis"))


def _scalar_tasks(results: dict) -> list[str]:
    return [t for t in results["tasks"] if headline(results, t)[0]]


def per_exit(results: dict, task: str, path: Path) -> Path | None:
    metric, higher = headline(results, task)
    per_model = results["tasks"][task]
    fig = Figure(figsize=(6, 3.6), constrained_layout=True)
    ax = fig.add_subplot()
    plotted = False
    for name, by_exit in per_model.items():
        pts = sorted((int(k), v.get(metric)) for k, v in by_exit.items() if isinstance(v.get(metric), (int, float)))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_label(results, name))
            plotted = True
    if not plotted:
        return None
    ax.set_xlabel("exit (layers used)")
    ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(f"{task}: {metric} per exit")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


def similarity(results: dict, path: Path, which: str, shared_scale: bool = False) -> Path | None:
    """`shared_scale`: one colour range for every panel, so models can be compared by colour."""
    metric, title, cmap = next(h for h in HEATMAPS if h[0] == which)
    per_model = results["tasks"].get("similarity", {})
    if not per_model:
        return None
    vmin, vmax = (0 if metric != "cosine" else None), (1 if metric != "kl" else None)
    if shared_scale:
        seen = [v for by_exit in per_model.values() for e in by_exit.values() for v in e[f"{metric}_by_position"]
                if v is not None]
        vmin = min(seen, default=0) if vmin is None else vmin
        vmax = max(seen, default=1) if vmax is None else vmax
    fig = Figure(figsize=(4.2 * len(per_model) + 1, 3.8), constrained_layout=True)
    axes = fig.subplots(1, len(per_model), squeeze=False)[0]
    for ax, (name, by_exit) in zip(axes, per_model.items()):
        exits = sorted(by_exit, key=int)
        grid = [[v if v is not None else float("nan") for v in by_exit[k][f"{metric}_by_position"]] for k in exits]
        im = ax.imshow(grid, aspect="auto", cmap=cmap, origin="lower", vmin=vmin, vmax=vmax)
        ax.set_yticks(range(len(exits)), exits)
        n_pos = len(grid[0]) if grid else 0
        ax.set_xticks(range(0, n_pos, max(1, n_pos // 10)))
        ax.set_xlabel("generated position")
        ax.set_ylabel("exit")
        ax.set_title(_label(results, name))
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def tournament(results: dict, path: Path) -> Path | None:
    """One panel per opponent model (or the single model's exits x exits): cell = (W-L)/n from the row's side,
    annotated W/L/T."""
    detail = results.get("details", {}).get("tournament")
    if not detail or not detail.get("matches"):
        return None
    panels: dict[tuple[str, str], dict] = {}
    for m in detail["matches"]:
        (ra, ka), (rb, kb) = m["a"], m["b"]
        cell = panels.setdefault((ra, rb), {})
        cell[(ka, kb)] = (m["wins"], m["losses"], m["ties"], m["score"])
        if ra == rb:  # one model: fill the mirror cell too
            cell[(kb, ka)] = (m["losses"], m["wins"], m["ties"], -m["score"])
    fig = Figure(figsize=(5.2 * len(panels) + 0.5, 4.8), constrained_layout=True)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, ((ra, rb), cells) in zip(axes, panels.items()):
        rows = sorted({a for a, _ in cells})
        cols = sorted({b for _, b in cells})
        grid = [[cells[(a, b)][3] if (a, b) in cells else float("nan") for b in cols] for a in rows]
        im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, origin="lower")
        for i, a in enumerate(rows):
            for j, b in enumerate(cols):
                if (a, b) in cells:
                    w, l_, t, _ = cells[(a, b)]
                    ax.text(j, i, f"{w:g}/{l_:g}/{t:g}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylabel(f"{_label(results, ra)} exit")
        ax.set_xlabel(f"{_label(results, rb)} exit")
        fig.colorbar(im, ax=ax, label="(W - L) / n for the row")
    fig.suptitle(f"tournament, judge {detail['judge']['name']} (cells: wins/losses/ties of the row)")
    fig.savefig(path, dpi=110)
    return path


def speedup(results: dict, path: Path) -> Path | None:
    """Agreement task: predicted self-speculative speedup vs draft length, one line per draft exit, one panel per
    model."""
    per_model = {n: {k: v for k, v in by_exit.items() if v.get("speedup_by_draft_length")}
                 for n, by_exit in results["tasks"].get("agreement", {}).items()}
    per_model = {n: by_exit for n, by_exit in per_model.items() if by_exit}
    if not per_model:
        return None
    fig = Figure(figsize=(4.6 * len(per_model) + 0.5, 3.8), constrained_layout=True)
    axes = fig.subplots(1, len(per_model), squeeze=False, sharey=True)[0]
    for ax, (name, by_exit) in zip(axes, per_model.items()):
        for k in sorted(by_exit, key=int):
            ys = by_exit[k]["speedup_by_draft_length"]
            ax.plot(range(1, len(ys) + 1), [y if y is not None else float("nan") for y in ys], marker=".",
                    label=f"exit {k}")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("draft length g")
        ax.set_title(_label(results, name))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("predicted speedup vs plain greedy")
    fig.suptitle("self-speculation: (accepted(g) + 1) x t_full / round cost")
    fig.savefig(path, dpi=110)
    return path


def _label(results: dict, name: str) -> str:
    info = results.get("models", {}).get(name, {})
    mode = info.get("mode")
    return f"{name} ({mode})" if mode and mode != name else name


def write_all(results: dict, folder: Path) -> dict[str, str]:
    """Every plot that applies; returns {plot name: file name}."""
    folder = Path(folder)
    made = {}
    for task in _scalar_tasks(results):
        safe = task.replace(":", "_").replace("/", "_")
        if per_exit(results, task, folder / f"{safe}.png"):
            made[task] = f"{safe}.png"
    if "tournament" in results["tasks"] and tournament(results, folder / "tournament_matrix.png"):
        made["tournament_matrix"] = "tournament_matrix.png"
    if "agreement" in results["tasks"] and speedup(results, folder / "agreement_speedup.png"):
        made["agreement_speedup"] = "agreement_speedup.png"
    if "similarity" in results["tasks"]:
        for which, *_ in HEATMAPS:
            if similarity(results, folder / f"similarity_{which}.png", which):
                made[f"similarity_{which}"] = f"similarity_{which}.png"
    return made
