"""Figures of an experiment's results DataFrame (one row per method and round)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd


def _by_method(df: pd.DataFrame):
    for name, part in df.groupby("method", sort=False):
        yield name, part.sort_values("round")


def plot_ppl_rounds(df: pd.DataFrame, ax=None):
    """Validation perplexity against communication rounds, one line per method."""
    ax = ax or plt.subplots(figsize=(7, 4.5))[1]
    for name, part in _by_method(df):
        ax.plot(part["round"], part["val_ppl"], marker="o", ms=3, label=name)
    ax.set(xlabel="round", ylabel="validation perplexity (reference tokens)", title="Perplexity per round")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax.figure


def plot_ppl_time(df: pd.DataFrame, ax=None):
    """Validation perplexity against simulated time (latency model plus counted transfers)."""
    ax = ax or plt.subplots(figsize=(7, 4.5))[1]
    for name, part in _by_method(df):
        ax.plot(part["sim_time_s"], part["val_ppl"], marker="o", ms=3, label=name)
    ax.set(xlabel="simulated time (s)", ylabel="validation perplexity (reference tokens)",
           title="Perplexity against simulated time")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax.figure


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
