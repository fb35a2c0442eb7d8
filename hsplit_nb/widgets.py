"""Interactive views for the notebooks. Each view is a plain function (tested on its own) that a few
ipywidgets controls call; the widgets only collect values and show the function's result.

JupyterLab 4.6 with ipykernel 7 may deliver widget messages on a thread of their own, so a panel never
touches pyplot's global state or the kernel's output capture: figures are `matplotlib.figure.Figure`
objects drawn to PNG, the Output widget's contents are set directly, and updates run under a lock.
"""
from __future__ import annotations

import base64
import io
import math
import threading

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import pandas as pd
import torch

from .architectures import architecture, num_blocks
from .adapters import LoraFactors, candidate_matrices
from .aggregation import communication, fedavg, naa, zero_pad_average
from .importance import ImportanceTracker
from .costs import ClientSpec, client_memory, smashed_bytes
from .planner import DEFAULT_RANK_LEVELS, plan

# ---- plain functions ------------------------------------------------------------------------------

def _figure(figsize, ncols: int = 1):
    """A figure outside pyplot (no global state, safe on any thread) and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def split_costs(config, batch_size: int = 8, seq_len: int = 64, ranks=None, dtype=torch.float32) -> pd.DataFrame:
    """Per split point: bytes crossing the cut per step and predicted client memory (by part)."""
    ranks = ranks if ranks is not None else dict(architecture(config).default_ranks)
    rows = []
    for s in range(1, num_blocks(config)):
        mem = client_memory(config, s, ranks, batch_size, seq_len, dtype, breakdown=True)
        rows.append({"split_point": s, "smashed_up_MiB": smashed_bytes(config, batch_size, seq_len, dtype) / 2**20,
                     "grad_down_MiB": smashed_bytes(config, batch_size, seq_len, dtype) / 2**20,
                     **{f"{k}_MiB": v / 2**20 for k, v in mem.items()},
                     "client_memory_MiB": sum(mem.values()) / 2**20})
    return pd.DataFrame(rows)


def plot_split_costs(df: pd.DataFrame, highlight: int | None = None):
    fig, ax = _figure((8, 4))
    bottom = pd.Series(0.0, index=df.index)
    for part in ("weights_MiB", "activations_MiB", "adapters_MiB", "smashed_MiB"):
        ax.bar(df["split_point"], df[part], bottom=bottom, label=part.replace("_MiB", ""))
        bottom += df[part]
    if highlight is not None:
        ax.axvline(highlight, color="k", ls="--", lw=1, label=f"split point {highlight}")
    ax.set(xlabel="split point s (blocks on the client)", ylabel="predicted client memory (MiB)",
           title=f"Client memory by split point; {df['smashed_up_MiB'].iloc[0]:.2f} MiB up and down per step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def importance_grid(scores: dict[str, float], config) -> pd.DataFrame:
    """RNGWP scores as a layer x matrix-kind table."""
    rows = {}
    for m in candidate_matrices(config):
        rows.setdefault(m.layer, {})[m.kind] = scores[m.name]
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("layer")


def plot_importance_grid(grid: pd.DataFrame, title: str = "RNGWP importance"):
    fig, ax = _figure((6, max(3, 0.22 * len(grid))))
    im = ax.imshow(grid.values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30)
    ax.set_yticks(range(len(grid)), grid.index)
    ax.set(xlabel="matrix", ylabel="layer", title=title)
    fig.colorbar(im, ax=ax, label="|W * dL/dW| summed / (d_in + d_out)")
    fig.tight_layout()
    return fig


def replay_importance(history: list[dict[str, float]], beta_max: float = 0.9, delta: float = 0.1,
                      configure_at: int = 0) -> pd.DataFrame:
    """Replay recorded RNGWP calibrations through a tracker with other settings: beta, fluctuation, the
    shift of g since the configuration made at calibration `configure_at`, and whether the trigger fires
    (a reconfiguration then records the new state, as the federation does)."""
    tracker = ImportanceTracker(list(history[0]), beta_max, delta)
    rows = []
    for t, scores in enumerate(history):
        rec = tracker.update(scores)
        fires = False
        shift = None
        if t == configure_at:
            tracker.configured()
        elif t > configure_at:
            shift = tracker.shift()
            fires = bool(tracker.trigger())
            if fires:
                tracker.configured()
        rows.append({"calibration": t, "beta": rec["beta"], "fluctuation": rec["fluctuation"], "shift": shift,
                     "fires": fires})
    return pd.DataFrame(rows)


def plot_replay(frame: pd.DataFrame, delta: float):
    fig, (a, b) = _figure((10, 3.5), 2)
    a.plot(frame["calibration"], frame["beta"], marker="o", label="beta_t")
    a.plot(frame["calibration"], frame["fluctuation"], marker="s", label="fluctuation Delta_t")
    a.set(xlabel="calibration t", title="Smoothing coefficient")
    a.legend()
    b.plot(frame["calibration"], frame["shift"], marker="o", label="||g - g_config||_1")
    b.axhline(delta, color="r", ls="--", label=f"delta = {delta:.3g}")
    fired = frame[frame["fires"]]
    b.scatter(fired["calibration"], fired["shift"], color="r", zorder=3, s=60, label="trigger fires")
    b.set(xlabel="calibration t", title="Reconfiguration trigger")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def planner_table(config, budgets: list[float], rank_levels=DEFAULT_RANK_LEVELS, batch_size: int = 8,
                  seq_len: int = 64, importance=None, dtype=torch.float32) -> pd.DataFrame:
    """ARMSC's plan for clients with these budgets (bytes): split points, ranks, predicted memory."""
    clients = [ClientSpec(f"client{k}", b) for k, b in enumerate(budgets)]
    return plan(config, clients, importance, batch_size, seq_len, tuple(rank_levels), dtype).frame()


def plot_plan(frame: pd.DataFrame):
    fig, ax = _figure((8, 3.8))
    x = range(len(frame))
    ax.bar([i - 0.2 for i in x], frame["budget_GB"], width=0.4, label="budget")
    ax.bar([i + 0.2 for i in x], frame["memory_GB"], width=0.4, label="predicted memory")
    for i, (s, r) in enumerate(zip(frame["split_point"], frame["device_rank_total"])):
        ax.annotate(f"s={s}\nrank {r}", (i + 0.2, frame["memory_GB"].iloc[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), frame["client"])
    ax.set(ylabel="GB", title="ARMSC: predicted client memory against budget")
    ax.legend()
    fig.tight_layout()
    return fig


def aggregation_errors(ranks: list[int], weights: list[float], d_out: int = 64, d_in: int = 64,
                       seed: int = 0) -> pd.DataFrame:
    """Each aggregator's error against the exact weighted sum of the clients' deltas, and its bytes.

    FedAvg needs equal ranks; with mixed ranks it is reported as not applicable."""
    g = torch.Generator().manual_seed(seed)
    adapters = [LoraFactors(torch.randn(r, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in),
                            torch.randn(d_out, r, generator=g, dtype=torch.float64), 2.0) if r else None
                for r in ranks]
    present = [(f, w) for f, w in zip(adapters, weights) if f is not None and w > 0]
    if not present:
        raise ValueError("no client has both a rank above 0 and a weight above 0: nothing to aggregate")
    total = sum(w for _, w in present)
    exact = sum(w / total * f.delta() for f, w in present)
    rows = []
    stacked = naa(adapters, weights)
    rows.append(("NAA (stack)", stacked.delta()))
    padded = zero_pad_average(adapters, weights)
    rows.append(("zero-pad + average", padded[1] @ padded[0]))
    if len({f.rank for f, _ in present}) == 1:
        A, B = fedavg(adapters, weights).factors[next(i for i, f in enumerate(adapters) if f is not None)]
        rows.append(("FedAvg (A, B apart)", 2.0 * B @ A))
    else:
        rows.append(("FedAvg (A, B apart)", None))
    out = []
    for name, delta in rows:
        key = {"NAA (stack)": "naa", "zero-pad + average": "zeropad", "FedAvg (A, B apart)": "fedavg"}[name]
        comm = communication(key, [f.rank if f is not None else 0 for f in adapters], d_in, d_out,
                             [True] * len(adapters)) if delta is not None else []
        if delta is None:
            out.append({"aggregator": name, "relative_error": float("nan"), "bytes_up": float("nan"),
                        "bytes_down": float("nan"), "note": NOT_FEDAVG})
            continue
        out.append({"aggregator": name, "relative_error": float((delta - exact).norm() / exact.norm()),
                    "bytes_up": sum(c["up"] for c in comm), "bytes_down": sum(c["down"] for c in comm), "note": ""})
    return pd.DataFrame(out)


NOT_FEDAVG = "does not apply: FedAvg averages A and B entry by entry, which needs every client at one rank"


def plot_aggregation_errors(frame: pd.DataFrame, case: str = ""):
    """Each aggregator's error and bytes; `case` (e.g. "ranks 2, 4, 8") names the setting in the titles."""
    fig, (a, b) = _figure((10, 3.5), 2)
    err = frame["relative_error"].fillna(0)
    a.bar(frame["aggregator"], err, color=["tab:green", "tab:orange", "tab:red"][: len(frame)])
    for i, v in enumerate(frame["relative_error"]):
        a.annotate("n/a (mixed ranks)" if math.isnan(v) else f"{v:.2e}", (i, err.iloc[i]), ha="center",
                   va="bottom", fontsize=8)
    suffix = f" ({case})" if case else ""
    a.set(ylabel="||aggregate - exact|| / ||exact||", title="Error against the exact weighted sum" + suffix)
    frame.set_index("aggregator")[["bytes_up", "bytes_down"]].div(2**10).plot.bar(ax=b, rot=0)
    b.set(ylabel="KiB (all clients, one matrix)", title="Bytes per aggregation" + suffix, xlabel="")
    for ax in (a, b):
        for label in ax.get_xticklabels():
            label.set_fontsize(8)
    fig.tight_layout()
    return fig


# ---- widgets --------------------------------------------------------------------------------------

def on_grid(value: float, lo: float, step: float) -> float:
    """The value a slider's front end snaps to (lo + step * round((value - lo) / step), in doubles as in
    JavaScript), so that showing a slider never sends a 'change' back (0.9 would come back 0.9000000000000001)."""
    return lo + step * round((value - lo) / step)


def _bundle(item) -> dict:
    """One output of an Output widget, as a Jupyter message would carry it."""
    if isinstance(item, str):
        return {"output_type": "stream", "name": "stdout", "text": item + "\n"}
    if isinstance(item, Figure):
        buf = io.BytesIO()
        item.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        data = {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(item)}
        return {"output_type": "display_data", "data": data, "metadata": {}}
    if isinstance(item, pd.DataFrame):
        data = {"text/html": item.to_html(), "text/plain": item.to_string()}
        return {"output_type": "display_data", "data": data, "metadata": {}}
    return {"output_type": "display_data", "data": {"text/plain": repr(item)}, "metadata": {}}


class Panel:
    """Controls, an output area, and `result`: the last value of the function the controls drive.

    `render(result)` returns what to show (text, DataFrames, figures); the Output widget's contents are replaced
    in one assignment under a lock, whatever thread delivers the change."""

    def __init__(self, controls: dict, compute, render):
        import ipywidgets as w

        self.controls, self.compute, self.render = controls, compute, render
        self.out = w.Output()
        self.result, self.shown, self._computed_for = None, [], None
        self._lock = threading.Lock()
        for control in controls.values():
            control.observe(self.update, names="value")
        self.widget = w.VBox([w.HBox(list(controls.values()), layout=w.Layout(flex_flow="row wrap")), self.out])
        self.update()

    def values(self) -> dict:
        return {k: c.value for k, c in self.controls.items()}

    def update(self, change=None) -> None:
        with self._lock:
            values = self.values()
            if values == self._computed_for:
                return
            self.result = self.compute(**values)
            self.shown = list(self.render(self.result))
            self.out.outputs = tuple(_bundle(item) for item in self.shown)
            self._computed_for = values

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def _views_or_message(result, views) -> list:
    """The views of a result, or the message when the computation answered with one."""
    return [result] if isinstance(result, str) else list(views(result))


def split_panel(config, batch_size: int = 8, seq_len: int = 64) -> Panel:
    """Move the split point; see memory per split point and the bytes crossing the cut."""
    import ipywidgets as w

    table = split_costs(config, batch_size, seq_len)
    controls = {"split_point": w.IntSlider(value=min(6, num_blocks(config) - 1), min=1, max=num_blocks(config) - 1,
                                           description="split point")}

    def compute(split_point):
        return {"row": table[table["split_point"] == split_point].iloc[0], "table": table, "split_point": split_point}

    def render(res):
        r = res["row"]
        return [f"split point {res['split_point']}: client holds the embeddings and blocks 0-{res['split_point'] - 1}; "
                f"{r['smashed_up_MiB']:.2f} MiB up and {r['grad_down_MiB']:.2f} MiB down per step; "
                f"predicted client memory {r['client_memory_MiB']:.1f} MiB", plot_split_costs(table, res["split_point"])]

    return Panel(controls, compute, render)


def iwi_panel(history: list[dict[str, float]]) -> Panel:
    """Replay recorded calibrations with other beta_max and delta."""
    import ipywidgets as w

    controls = {"beta_max": w.FloatSlider(value=on_grid(0.9, 0.0, 0.01), min=0.0, max=0.99, step=0.01,
                                          description="beta_max"),
                "delta": w.FloatLogSlider(value=10 ** on_grid(-1.0, -3.0, 0.1), base=10, min=-3, max=0, step=0.1,
                                          description="delta", readout_format=".3g")}

    def compute(beta_max, delta):
        frame = replay_importance(history, beta_max, delta)
        frame.attrs["delta"] = delta
        return frame

    def render(frame):
        return [frame.round(4), plot_replay(frame, frame.attrs["delta"])]

    return Panel(controls, compute, render)


def planner_panel(config, n_clients: int = 5, budgets=None, batch_size: int = 8, seq_len: int = 64,
                  max_budget: float = 2e9) -> Panel:
    """Sliders for each client's budget (bytes in, shown in MB when the largest is under 1 GB so they never read
    0.00, else in GB), the rank levels, batch and sequence length."""
    import ipywidgets as w

    budgets = budgets or [max_budget * (0.2 + 0.15 * k) for k in range(n_clients)]
    unit, name = (1e6, "MB") if max_budget < 1e9 else (1e9, "GB")
    top, step = max_budget / unit, max_budget / unit / 100
    controls = {f"b{k}": w.FloatSlider(value=on_grid(b / unit, step, step), min=step, max=top, step=step,
                                       readout_format=".3g", description=f"client{k} {name}")
                for k, b in enumerate(budgets)}
    controls["rank_levels"] = w.SelectMultiple(options=[2, 4, 8, 16, 32, 64], value=(2, 4, 8, 16),
                                               description="ranks")
    controls["batch_size"] = w.IntSlider(value=batch_size, min=1, max=32, description="batch")
    controls["seq_len"] = w.IntSlider(value=seq_len, min=16, max=512, step=16, description="seq len")

    def compute(rank_levels, batch_size, seq_len, **budgets):
        try:
            return planner_table(config, [budgets[f"b{k}"] * unit for k in range(len(budgets))], (0, *rank_levels),
                                 batch_size, seq_len)
        except ValueError as exc:
            return str(exc)

    def render(res):
        return _views_or_message(res, lambda frame: (frame.round(3), plot_plan(frame)))

    return Panel(controls, compute, render)


def naa_panel(n_clients: int = 3) -> Panel:
    """Set each client's rank and data weight; compare NAA with zero-padding and FedAvg."""
    import ipywidgets as w

    controls = {}
    for k in range(n_clients):
        controls[f"r{k}"] = w.Dropdown(options=[0, 2, 4, 8, 16], value=[2, 4, 8, 16][k % 4], description=f"rank c{k}")
        controls[f"w{k}"] = w.IntSlider(value=100 * (k + 1), min=0, max=1000, step=10, description=f"n c{k}")

    def compute(**v):
        try:
            return aggregation_errors([v[f"r{k}"] for k in range(n_clients)], [v[f"w{k}"] for k in range(n_clients)])
        except ValueError as exc:
            return str(exc)

    def render(res):
        ranks = ", ".join(str(controls[f"r{k}"].value) for k in range(n_clients))
        return _views_or_message(res, lambda frame: (frame, plot_aggregation_errors(frame, f"ranks {ranks}")))

    return Panel(controls, compute, render)


def plot_regime_point(rows: pd.DataFrame, n_blocks: int):
    """Both methods' split points at one point of the regime map: each client's device blocks and the server's."""
    fig, axes = _figure((11, 2.8), ncols=2)
    for ax, (_, row) in zip(axes, rows.iterrows()):
        splits = [int(s) for s in row["splits"].split("/")]
        k = len(splits)
        ax.barh(range(k), splits, color="tab:blue", alpha=0.8, label="device")
        ax.barh(range(k), [n_blocks - s for s in splits], left=splits, color="tab:orange", alpha=0.4, label="server")
        ax.set_yticks(range(k), [f"c{i}" for i in range(k)])
        ax.invert_yaxis()
        ax.set(xlim=(0, n_blocks), xlabel="blocks", title=f"{row['method']}: splits {row['splits']}, "
               f"round {row['round_s']:.2f} s")
    axes[0].legend(fontsize=8, loc="lower right")
    return fig


def regime_panel(table: pd.DataFrame, n_blocks: int) -> Panel:
    """Sliders over a regime map (`regime.regime_map`): both methods' plans and round times at the chosen point."""
    import ipywidgets as w

    def slider(col, near, label):
        opts = sorted(table[col].unique().tolist())
        value = min(opts, key=lambda v: abs(math.log(v / near)))
        return w.SelectionSlider(options=opts, value=value, description=label)

    controls = {"budgets": w.Dropdown(options=sorted(table["budgets"].unique()), description="budgets"),
                "server_ratio": slider("server_ratio", 5, "server x"), "bandwidth": slider("bandwidth", 1e8, "links"),
                "local_steps": slider("local_steps", 10, "steps/round")}

    def compute(**point):
        return table[(table[list(point)] == pd.Series(point)).all(axis=1)]

    def render(rows):
        ratio = rows["round_vs_splitlora"].iloc[0]
        return [f"HSplitLoRA's round takes {ratio:.2f} of SplitLoRA's ({'faster' if ratio < 1 else 'slower'}); the "
                f"server runs at {rows['server_flops'].iloc[0]:.3g} FLOP/s", rows.drop(columns=["budgets"]).round(3),
                plot_regime_point(rows, n_blocks)]

    return Panel(controls, compute, render)
