"""The computations notebooks 02-04 walk through, each one tested function, so a notebook cell is a call and a
figure: a fine-tune that calibrates RNGWP as it goes (02), the memory model against measurement (03), NAA's
merge-and-restart and the bytes each aggregator sends (04). Figures are `Figure` objects, outside pyplot."""
from __future__ import annotations

import pandas as pd
import torch
from matplotlib.figure import Figure

from .adapters import adapter_names, read_adapter
from .aggregation import communication, merge, naa, read_all
from .costs import client_memory, measure_client_memory
from .importance import rngwp_scores


def calibrated_fine_tune(model, batches: list[dict], steps: int, calibrate_every: int, lr: float
                         ) -> tuple[list[dict[str, float]], list[float]]:
    """LoRA fine-tuning of `model` for `steps` steps with AdamW, scoring every matrix by RNGWP before every
    `calibrate_every`-th step. Calibrations use batches from the end of `batches` and training the others, so no
    batch is both. Returns the calibrations (one dict per calibration) and the training losses."""
    calibrations = -(-steps // calibrate_every)
    if len(batches) <= calibrations:
        raise ValueError(f"batches: {len(batches)} is too few; {steps} steps calibrating every {calibrate_every} "
                         f"need more than {calibrations} (one batch per calibration, the rest for training)")
    train = batches[:len(batches) - calibrations]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history, losses = [], []
    model.train()
    for step in range(steps):
        if step % calibrate_every == 0:
            history.append(rngwp_scores(model, batches[-1 - len(history)]))
        opt.zero_grad()
        loss = model(**train[step % len(train)]).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return history, losses


def score_trajectories(history: list[dict[str, float]], top: int = 8) -> pd.DataFrame:
    """Each of the `top` matrices of the last calibration: its RNGWP at every calibration over its first one."""
    traj = pd.DataFrame(history)
    names = traj.iloc[-1].sort_values(ascending=False).index[:top]
    return (traj[names] / traj.iloc[0][names]).rename_axis("calibration")


def plot_score_trajectories(traj: pd.DataFrame):
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for name in traj.columns:
        ax.plot(traj.index, traj[name], marker="o", label=name.replace("model.layers.", "L"))
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set(xlabel="calibration", ylabel="RNGWP / first calibration",
           title=f"How the {len(traj.columns)} top matrices' scores move during fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def predicted_vs_measured(model, split_points: list[int], batch: dict, ranks: dict[str, int]) -> pd.DataFrame:
    """ARMSC's predicted client memory against the bytes measured on a real forward, backward and Adam step, per
    split point (`model` carries adapters of `ranks`)."""
    b, t = batch["input_ids"].shape
    rows = []
    for s in split_points:
        measured = sum(measure_client_memory(model, s, batch).values())
        predicted = client_memory(model.config, s, ranks, b, t)
        rows.append({"split_point": s, "predicted_MiB": predicted / 2**20, "measured_MiB": measured / 2**20,
                     "relative_error": predicted / measured - 1})
    return pd.DataFrame(rows)


def plot_predicted_vs_measured(check: pd.DataFrame):
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(check["measured_MiB"], check["predicted_MiB"], "o")
    for _, r in check.iterrows():
        ax.annotate(f"s={int(r['split_point'])}", (r["measured_MiB"], r["predicted_MiB"]), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    lim = [0, check[["measured_MiB", "predicted_MiB"]].max().max() * 1.1]
    ax.plot(lim, lim, "k--", lw=1, label="equal")
    ax.set(xlabel="measured MiB", ylabel="predicted MiB", title="Memory model against measurement")
    ax.legend()
    fig.tight_layout()
    return fig


def merge_and_restart(model, batch: dict, optimizer=None) -> dict:
    """NAA's last step on one model: fold each adapter's product into its frozen weight and restart the adapter
    at its rank. Returns how far the output moved, whether every rank is unchanged and every B is zero again."""
    names = adapter_names(model)
    with torch.no_grad():
        before = model(**batch).logits
    ranks = {n: read_adapter(model, n).rank for n in names}
    for name in names:
        merge([model], name, naa(read_all([model], name), [1.0]), adapters=[model],
              optimizers=[optimizer] if optimizer is not None else [])
    with torch.no_grad():
        after = model(**batch).logits
    return {"max_output_change": (after - before).abs().max().item(),
            "ranks_unchanged": ranks == {n: read_adapter(model, n).rank for n in names},
            "every_B_zero": all(bool(read_adapter(model, n).B.abs().sum() == 0) for n in names)}


def bytes_per_aggregator(ranks: list[int], d_in: int, d_out: int, aggregators=("naa", "fedavg", "hetlora", "flexlora"),
                         fedavg_rank: int | None = None) -> pd.DataFrame:
    """KiB up and down, summed over the clients, for one d_out x d_in matrix and one aggregation, all adapters on
    the devices. FedAvg needs one rank for everyone: `fedavg_rank` (None: the clients' median rank)."""
    fedavg_rank = fedavg_rank or sorted(ranks)[len(ranks) // 2]
    rows = []
    for agg in aggregators:
        used = [fedavg_rank] * len(ranks) if agg == "fedavg" else list(ranks)
        comm = communication(agg, used, d_in, d_out, [True] * len(used))
        rows.append({"aggregator": agg, "ranks": used, "up_KiB": sum(c["up"] for c in comm) / 2**10,
                     "down_KiB": sum(c["down"] for c in comm) / 2**10})
    return pd.DataFrame(rows)


def plot_bytes_per_aggregator(table: pd.DataFrame, shape: str = ""):
    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.subplots()
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], table["up_KiB"], 0.4, label="up")
    ax.bar([i + 0.2 for i in x], table["down_KiB"], 0.4, label="down")
    ax.set_xticks(list(x), table["aggregator"])
    ax.set(ylabel="KiB (all clients)", title=f"Bytes per aggregation{', ' + shape if shape else ''}")
    ax.legend()
    fig.tight_layout()
    return fig
