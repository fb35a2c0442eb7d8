"""Figures of an experiment's results DataFrame (one row per method and round)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd


# One colour per method, the same in every figure of the package (tab10 wrapped: two methods shared blue).
METHOD_COLORS = {
    "hsplitlora": "#1f77b4", "splitlora": "#ff7f0e", "hetlora": "#2ca02c", "hetlora-strict": "#98df8a",
    "cenlora": "#d62728", "ft": "#9467bd", "hsplitlora-no-iwi": "#8c564b", "hsplitlora-no-armsc": "#e377c2",
    "hsplitlora-no-naa": "#7f7f7f", "hsplitlora-split-1": "#bcbd22", "hsplitlora-per-client-server": "#17becf",
    "flora": "#ffbb78", "flexlora": "#c5b0d5",
}


def method_color(name: str) -> str:
    """The method's colour (black for a name outside the method table)."""
    return METHOD_COLORS.get(name, "#000000")


def _by_method(df: pd.DataFrame):
    for name, part in df.groupby("method", sort=False):
        yield name, part.sort_values("round")


def _log_ppl_axis(ax) -> None:
    """A log-scale PPL axis labelled with plain numbers (4, 5, 6 rather than 6 x 10^0)."""
    from matplotlib.ticker import ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _plot_ppl(df: pd.DataFrame, x: str, xlabel: str, title: str, ax=None):
    from matplotlib.ticker import MaxNLocator

    ax = ax or plt.subplots(figsize=(7, 4.5))[1]
    for name, part in _by_method(df):
        ax.plot(part[x], part["val_ppl"], marker="o", ms=3, label=name, color=method_color(name))
    ax.set(xlabel=xlabel, ylabel="validation perplexity (reference tokens, log scale)", title=title)
    _log_ppl_axis(ax)
    if x == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax.figure


def plot_ppl_rounds(df: pd.DataFrame, ax=None):
    """Validation perplexity against communication rounds, one line per method."""
    return _plot_ppl(df, "round", "round", "Perplexity per round", ax)


def plot_ppl_time(df: pd.DataFrame, ax=None):
    """Validation perplexity against simulated time (latency model plus counted transfers)."""
    return _plot_ppl(df, "sim_time_s", "simulated time (s)", "Perplexity against simulated time", ax)


def plot_bytes(df: pd.DataFrame, ax=None):
    """Mean bytes up and down per training round, per method (round 0, before training, left out)."""
    ax = ax or plt.subplots(figsize=(7, 4.5))[1]
    trained = df[df["round"] > 0]
    mean = trained.groupby("method", sort=False)[["bytes_up", "bytes_down"]].mean() / 2**20
    mean.plot.bar(ax=ax, rot=30)
    ax.set(xlabel="", ylabel="MiB per round (all clients)", title="Communication per round")
    ax.grid(alpha=0.3, axis="y")
    for label in ax.get_xticklabels():
        label.set_ha("right")
    ax.figure.tight_layout()
    return ax.figure


FIGURES = {"ppl_rounds.png": plot_ppl_rounds, "ppl_time.png": plot_ppl_time, "bytes_per_round.png": plot_bytes}


def save_figure(fig, out_dir, name: str) -> Path:
    """Write a figure as PNG (atomically) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def save_figures(df: pd.DataFrame, out_dir) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in FIGURES.items():
        fig = fn(df)
        fig.tight_layout()
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        tmp.replace(out / name)
        plt.close(fig)
        paths.append(out / name)
    return paths


def architecture_diagram(split_points: list[int], n_blocks: int, budgets=None):
    """HSplitLoRA in one picture: each client hosts the embeddings and blocks [0, s_k); the main server
    hosts the rest for every client; adapters on both sides; NAA merges them after each round."""
    from matplotlib.patches import Rectangle

    k = len(split_points)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.65 * k))
    for i, s in enumerate(split_points):
        y = k - 1 - i
        ax.add_patch(Rectangle((0, y + 0.15), s, 0.7, color="tab:blue", alpha=0.8))
        ax.add_patch(Rectangle((s, y + 0.15), n_blocks - s, 0.7, color="tab:orange", alpha=0.5))
        ax.text(s / 2, y + 0.5, f"0-{s - 1}" if s > 1 else "0", ha="center", va="center", fontsize=8, color="white")
        ax.text(s + (n_blocks - s) / 2, y + 0.5, f"{s}-{n_blocks - 1} + head", ha="center", va="center", fontsize=8)
        ax.plot([s, s], [y + 0.05, y + 0.95], color="k", lw=1.5)
    labels = [f"client {i}" + (f"\nbudget {budgets[i]}" if budgets is not None else "") for i in range(k)]
    ax.set_yticks([k - 1 - i + 0.5 for i in range(k)], labels, fontsize=9)
    ax.text(n_blocks * 1.03, k / 2, "NAA after each round:\nstack every client's adapters,\n"
            "merge into every copy,\nrestart the adapters", va="center", fontsize=8)
    ax.set_xticks(range(0, n_blocks + 1, max(1, n_blocks // 6)))
    ax.set(xlim=(0, n_blocks * 1.45), ylim=(0, k), xlabel="transformer blocks (black line: the client's split point)",
           title="Each client hosts the first blocks (blue); the main server runs the rest for it (orange)")
    for side in ("right", "top"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def plot_plans(plans: pd.DataFrame, n_blocks: int):
    """Each method's plan before training (`quickstart.initial_plans`): per client, the blocks on its device (the
    method's colour) and on the main server (grey), with the sum of its device ranks."""
    methods = list(dict.fromkeys(plans["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 0.9 + 0.45 * plans["client"].nunique()),
                             squeeze=False)
    for ax, name in zip(axes[0], methods):
        part = plans[plans["method"] == name].reset_index(drop=True)
        ax.barh(part.index, part["split_point"], color=method_color(name), label="device")
        ax.barh(part.index, n_blocks - part["split_point"], left=part["split_point"], color="0.85", label="main server")
        for i, row in part.iterrows():
            ax.text(row["split_point"] + 0.3, i, f"rank sum {row['device_rank_sum']}", va="center", fontsize=8)
        ax.set_yticks(part.index, [f"{c} ({b / 2**20:.0f} MiB)" for c, b in zip(part["client"], part["budget_bytes"])])
        ax.invert_yaxis()
        splits = "/".join(str(s) for s in part["split_point"])
        ax.set(xlim=(0, n_blocks), xlabel="blocks", title=f"{name}: split points {splits}")
    axes[0][0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def plot_client_trajectories(clients: pd.DataFrame):
    """Each client's split point and total rank per round (gaps: rounds it was away)."""
    from matplotlib.ticker import MaxNLocator

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, part in clients.groupby("client"):
        a.plot(part["round"], part["split_point"].where(part["present"]), marker="o", label=name)
        b.plot(part["round"], part["total_rank"].where(part["present"]), marker="o", label=name)
    a.set(xlabel="round", ylabel="split point", title="Split points (gap: away)")
    b.set(xlabel="round", ylabel="total rank", title="Total device + server rank")
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    b.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_trainable(table: pd.DataFrame, ax=None):
    """Trainable parameters on clients and on the server per method, in millions (absent bars mean none)."""
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    data = table.set_index("method")[["trainable_client_params", "trainable_server_params"]] / 1e6
    data.columns = ["on clients (summed)", "on the server"]
    data.plot.barh(ax=ax)
    ax.set(xlabel="trainable parameters (millions)", ylabel="", title="Trainable parameters")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def plot_wire_bytes(table: pd.DataFrame, ax=None):
    """Bytes counted on the wire next to the bytes the simulation accounted, per kind (one method's rows of
    `hsplit_nb.distributed.wire_vs_simulated`); equal bars are the point."""
    ax = ax or plt.subplots(figsize=(8, 4))[1]
    table = table[(table["wire"] > 0) | (table["simulated"] > 0)]
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], table["wire"] / 1e6, width=0.4, label="counted on the wire")
    ax.bar([i + 0.2 for i in x], table["simulated"] / 1e6, width=0.4, label="simulated accounting")
    ax.set_xticks(list(x), table["kind"], rotation=30, ha="right")
    ax.set(ylabel="MB (all clients, all rounds)", title="Bytes per kind: multi-process run vs simulation")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return ax.figure


# ---- a comparison over seeds ---------------------------------------------------------------------------------

def plot_curves_with_spread(curves: pd.DataFrame, setting: str, x: str = "round", methods=None, ax=None):
    """Validation PPL against rounds (or simulated time) in one setting: the mean over seeds, with a band from
    the lowest to the highest seed (one seed: a line alone)."""
    ax = ax or plt.subplots(figsize=(7, 4.5))[1]
    part = curves[curves["setting"] == setting]
    for name in methods or part["method"].unique():
        m = part[part["method"] == name]
        if m.empty:
            continue
        by = m.groupby("round")
        xs, ppl = by[x].mean(), by["val_ppl"]
        n = m["seed"].nunique()
        line, = ax.plot(xs, ppl.mean(), marker="o", ms=3, label=f"{name} ({n} seed{'s' if n > 1 else ''})",
                        color=method_color(name))
        if n > 1:
            ax.fill_between(xs, ppl.min(), ppl.max(), color=line.get_color(), alpha=0.15)
    _log_ppl_axis(ax)
    ax.set(xlabel="round" if x == "round" else "simulated time (s)", ylabel="validation PPL (log scale)",
           title=f"{setting}: mean over seeds, band = lowest to highest seed")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return ax.figure


def plot_summary_bars(summary: pd.DataFrame, column: str, ylabel: str, ax=None, log: bool = False):
    """One bar per method and setting: the mean over seeds, error bars one standard deviation. A time to target
    that no seed reached is drawn as no bar, with 'not reached' written in its place ('did not train' where the
    run's note says no client could train the method)."""
    ax = ax or plt.subplots(figsize=(10, 4.5))[1]
    mean = summary.pivot(index="method", columns="setting", values=f"{column}_mean")
    std = summary.pivot(index="method", columns="setting", values=f"{column}_std")
    order = list(dict.fromkeys(summary["method"]))
    ran = summary.pivot(index="method", columns="setting", values="seeds").reindex(order)
    notes = summary.pivot(index="method", columns="setting", values="note").reindex(order) \
        if "note" in summary else pd.DataFrame(index=ran.index, columns=ran.columns)  # no run has a note
    mean, std = mean.reindex(order), std.reindex(order).fillna(0)
    mean.plot.bar(ax=ax, yerr=std, rot=30, capsize=2, logy=log)
    width = 0.8 / max(1, mean.shape[1])
    for j, setting in enumerate(mean.columns):
        for i, (v, n, note) in enumerate(zip(mean[setting], ran[setting], notes[setting])):
            if pd.isna(v) and not pd.isna(n):
                said = "did not train" if isinstance(note, str) else "not reached"
                ax.text(i - 0.4 + width * (j + 0.5), ax.get_ylim()[0], said, rotation=90, fontsize=6,
                        ha="center", va="bottom")
    for label in ax.get_xticklabels():
        label.set_ha("right")
    ax.set(xlabel="", ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, title="setting")
    ax.figure.tight_layout()
    return ax.figure


# ---- the regime map ------------------------------------------------------------------------------------------

def plot_regime_map(df: pd.DataFrame, budgets: str | None = None):
    """Where ARMSC offloads and what it saves (rows of `regime.regime_map` for one budget set): per bandwidth, the
    mean split point HSplitLoRA's plan gives (top) and its round time over SplitLoRA's (bottom, below 1: faster),
    against the server's speed and the local steps per round."""
    budgets = budgets or df["budgets"].iloc[0]
    part = df[(df["budgets"] == budgets) & (df["method"] == "hsplitlora")]
    bws = sorted(part["bandwidth"].unique())
    fig, axes = plt.subplots(2, len(bws), figsize=(4.2 * len(bws), 6.4), squeeze=False)
    for j, bw in enumerate(bws):
        grid = part[part["bandwidth"] == bw]
        panels = (("mean_split", "viridis", "{:.1f}", {"vmin": 1}),
                  ("round_vs_splitlora", "RdBu_r", "{:.2f}", {"vmin": 0.6, "vmax": 1.4}))
        for i, (col, cmap, fmt, kw) in enumerate(panels):
            table = grid.pivot(index="server_ratio", columns="local_steps", values=col)
            ax = axes[i, j]
            im = ax.imshow(table.values, aspect="auto", cmap=cmap, origin="lower", **kw)
            for (r, c), v in pd.DataFrame(table.values).stack().items():
                dark = v < 6 if col == "mean_split" else v > 1.3
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7, color="w" if dark else "k")
            ax.set_xticks(range(table.shape[1]), table.columns)
            ax.set_yticks(range(table.shape[0]), [f"{x:g}x" for x in table.index])
            ax.set(xlabel="local steps per round", ylabel="server speed (x fastest client)",
                   title=f"{'mean split point' if i == 0 else 'round time / SplitLoRA'}, links {bw:.0e} B/s")
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"Regime map ({budgets}): where ARMSC offloads blocks, and what it saves per round")
    fig.tight_layout()
    return fig
