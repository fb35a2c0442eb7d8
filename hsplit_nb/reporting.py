"""Reporting a comparison: targets, time to target in log-PPL, means and spreads over seeds, the paper's claims.

Everything here works on tidy tables: `curves` (one row per setting, method, seed and evaluation) and `runs`
(one row per setting, method and seed). A target a run never reached is NaN ("not reached"), never
extrapolated; a claim "A beats B" holds only when the difference of the means exceeds the spread.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

TARGET_SHARES = (0.25, 0.5, 0.75)  # targets: the PPL that 25%, 50% and 75% of the core methods reach
KEYS = ["setting", "method", "seed"]
METRICS = ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]


def target_name(share: float) -> str:
    return f"t{round(share * 100)}"


def time_to(curve: pd.DataFrame, target: float, column: str = "sim_time_s") -> float:
    """The first `column` value at which val_ppl reaches `target`, interpolated in log-PPL between the two
    evaluations around it; NaN when the run never reached it (no extrapolation)."""
    curve = curve.sort_values("round")
    ppl, x = curve["val_ppl"].to_numpy(float), curve[column].to_numpy(float)
    hit = np.flatnonzero(ppl <= target)
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    if i == 0 or ppl[i - 1] == ppl[i]:
        return float(x[i])
    frac = (math.log(ppl[i - 1]) - math.log(target)) / (math.log(ppl[i - 1]) - math.log(ppl[i]))
    return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def targets(curves: pd.DataFrame, methods: list[str], shares=TARGET_SHARES) -> pd.DataFrame:
    """Per setting, the PPL targets that a share of `methods` reach: with the methods' best PPL (mean over seeds)
    sorted b_1 <= ... <= b_M, the target for share q is b_ceil(qM), which exactly ceil(qM) of them reach."""
    rows = []
    for setting, part in curves[curves["method"].isin(methods)].groupby("setting", sort=False):
        best = part.groupby(["method", "seed"])["val_ppl"].min().groupby("method").mean().sort_values()
        row = {"setting": setting, "methods": len(best)}
        for q in shares:
            row[target_name(q)] = float(best.iloc[max(1, math.ceil(q * len(best))) - 1])
        rows.append(row)
    return pd.DataFrame(rows)


def add_times_to_targets(runs: pd.DataFrame, curves: pd.DataFrame, goal: pd.DataFrame) -> pd.DataFrame:
    """Each run's simulated seconds and rounds to each of its setting's targets (NaN: not reached)."""
    names = [c for c in goal.columns if c.startswith("t") and c[1:].isdigit()]
    goal = goal.set_index("setting")
    out = runs.copy()
    for name in names:
        out[f"target_{name}"] = out["setting"].map(goal[name])
        secs, rounds = [], []
        for _, run in out.iterrows():
            curve = curves[(curves[KEYS] == run[KEYS].values).all(axis=1)]
            secs.append(time_to(curve, run[f"target_{name}"], "sim_time_s"))
            rounds.append(time_to(curve, run[f"target_{name}"], "round"))
        out[f"time_to_{name}_s"], out[f"rounds_to_{name}"] = secs, rounds
    return out


def summarize_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting and method: the number of seeds, and the mean and standard deviation (ddof 1; NaN for one
    seed) of every numeric column over the seeds. A time to target is averaged over the seeds that reached it,
    and `reached_<t>` counts them."""
    numeric = [c for c in runs.columns if c not in KEYS and pd.api.types.is_numeric_dtype(runs[c])]
    rows = []
    for (setting, method), part in runs.groupby(["setting", "method"], sort=False):
        row = {"setting": setting, "method": method, "seeds": len(part)}
        notes = part["note"].dropna().astype(str).tolist() if "note" in part else []
        if notes:  # e.g. no client fits: the method did not train in this setting
            row["note"] = notes[0]
        for c in numeric:
            vals = part[c].dropna()
            row[f"{c}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{c}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
            if c.startswith("time_to_"):
                row[f"reached_{c.removeprefix('time_to_').removesuffix('_s')}"] = f"{len(vals)}/{len(part)}"
        rows.append(row)
    return pd.DataFrame(rows)


def _reached(s: pd.DataFrame, a: str, b: str, column: str) -> str | None:
    """The verdict on a time to target when a side did not reach it in every seed (None: both always did).
    Reaching a target against never reaching it decides; a target reached in some seeds only does not."""
    key = f"reached_{column.removeprefix('time_to_').removesuffix('_s')}"
    if not column.startswith("time_to_") or key not in s:
        return None
    (ka, na), (kb, nb) = (map(int, str(s.loc[m, key]).split("/")) for m in (a, b))
    if ka == na and kb == nb:
        return None
    if ka == na and kb == 0:
        return f"holds ({b} never reached the target)"
    if ka == 0 and kb == nb:
        return f"reversed ({a} never reached the target)"
    if ka == 0 and kb == 0:
        return "neither reached the target"
    return f"undecided (target reached in {ka}/{na} against {kb}/{nb} seeds)"


def compare(summary: pd.DataFrame, setting: str, a: str, b: str, column: str, lower_is_better: bool = True) -> dict:
    """Does method `a` beat method `b` on `column` in `setting`? The verdict needs the difference of the means
    to exceed the spread, sqrt(std_a^2 + std_b^2) (with one seed on either side no spread is known)."""
    s = summary[summary["setting"] == setting].set_index("method")
    if a not in s.index or b not in s.index:
        return {"setting": setting, "a": a, "b": b, "column": column, "verdict": "not run"}
    if f"{column}_mean" not in s:
        return {"setting": setting, "a": a, "b": b, "column": column, "verdict": "not measured"}
    ma, mb = s.loc[a, f"{column}_mean"], s.loc[b, f"{column}_mean"]
    sa, sb = s.loc[a, f"{column}_std"], s.loc[b, f"{column}_std"]
    gain = (mb - ma) if lower_is_better else (ma - mb)
    spread = math.sqrt(sa ** 2 + sb ** 2) if not (np.isnan(sa) or np.isnan(sb)) else float("nan")
    reached = _reached(s, a, b, column)
    if reached is not None:
        verdict = reached
    elif np.isnan(ma) or np.isnan(mb):
        verdict = "not measured"
    elif np.isnan(spread):
        verdict = "better (one seed, no spread)" if gain > 0 else "not better (one seed, no spread)"
    elif gain > spread:
        verdict = "holds"
    elif -gain > spread:
        verdict = "reversed"
    else:
        verdict = "within the spread"
    return {"setting": setting, "a": a, "b": b, "column": column, "mean_a": ma, "mean_b": mb, "gain": gain,
            "ratio_b_to_a": mb / ma if ma else float("nan"), "spread": spread, "verdict": verdict}


def heterogeneity_cost(runs: pd.DataFrame, homogeneous: str, column: str = "final_ppl") -> pd.DataFrame:
    """What heterogeneity costs each method (the paper: about 0.38 PPL for HetLoRA, 0.1 for SplitLoRA): per
    method and setting, `column` minus the homogeneous setting's on the same seed, averaged over the seeds both
    ran (paired, so the seed-to-seed spread of either setting does not enter), with its standard deviation."""
    if column not in runs:
        return pd.DataFrame()
    base = runs[runs["setting"] == homogeneous].set_index(["method", "seed"])[column]
    rows = []
    for (setting, method), part in runs[runs["setting"] != homogeneous].groupby(["setting", "method"], sort=False):
        pairs = [(v, base[(method, seed)]) for seed, v in zip(part["seed"], part[column])
                 if (method, seed) in base.index and not (pd.isna(v) or pd.isna(base[(method, seed)]))]
        if not pairs:
            continue
        cost = np.array([v - b for v, b in pairs])
        rows.append({"setting": setting, "method": method, "seeds": len(pairs),
                     f"{column}_homogeneous": float(np.mean([b for _, b in pairs])),
                     column: float(np.mean([v for v, _ in pairs])), "cost": float(cost.mean()),
                     "cost_std": float(cost.std(ddof=1)) if len(cost) > 1 else float("nan")})
    return pd.DataFrame(rows)


# (claim, a, b, column, lower is better): the paper's claims, each as comparisons of two methods
CLAIMS = [
    ("lower PPL than SplitLoRA", "hsplitlora", "splitlora", "final_ppl", True),
    ("lower PPL than HetLoRA", "hsplitlora", "hetlora", "final_ppl", True),
    *[(f"converges faster than {label} (to {target_name(q)})", "hsplitlora", b, f"time_to_{target_name(q)}_s", True)
      for label, b in (("SplitLoRA", "splitlora"), ("HetLoRA", "hetlora"), ("CenLoRA", "cenlora"), ("FT", "ft"))
      for q in TARGET_SHARES],  # every target: the loose t75 decides most, the tight t25 only the best methods
    ("fewer trainable parameters per client than HetLoRA", "hsplitlora", "hetlora", "trainable_per_client", True),
    ("fewer trainable parameters per client than FT", "hsplitlora", "ft", "trainable_per_client", True),
    ("IWI helps", "hsplitlora", "hsplitlora-no-iwi", "final_ppl", True),
    ("ARMSC helps", "hsplitlora", "hsplitlora-no-armsc", "final_ppl", True),
    ("NAA helps", "hsplitlora", "hsplitlora-no-naa", "final_ppl", True),
    ("the shared main server helps", "hsplitlora", "hsplitlora-per-client-server", "final_ppl", True),
    # the split choice itself: HSplitLoRA against its control with every client at split point 1
    ("the split choice helps (lower PPL)", "hsplitlora", "hsplitlora-split-1", "final_ppl", True),
    *[(f"the split choice helps (faster to {target_name(q)})", "hsplitlora", "hsplitlora-split-1",
       f"time_to_{target_name(q)}_s", True) for q in TARGET_SHARES],
]


def claims(summary: pd.DataFrame) -> pd.DataFrame:
    """Every claim of the paper in every setting of the summary, with the means, the gain, the spread and the
    verdict (holds / within the spread / reversed / not run)."""
    rows = [{"claim": text, **compare(summary, setting, a, b, col, low)}
            for setting in summary["setting"].unique() for text, a, b, col, low in CLAIMS]
    return pd.DataFrame(rows)


def _fmt(column: str, v: float) -> str:
    if column.startswith("trainable"):
        return f"{v / 1e6:.3g}M"
    return f"{v:.3g} s" if column.startswith("time_to") else f"{v:.3f}"


SUMMARY_COLUMNS = [("final_ppl", "final PPL", 3), ("time_to_t50_s", "sim s to t50", 2), ("BLEU", "BLEU", 3),
                   ("NIST", "NIST", 2), ("METEOR", "METEOR", 3), ("ROUGE_L", "ROUGE-L", 3), ("CIDEr", "CIDEr", 2)]


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *rows])


def summary_markdown(summary: pd.DataFrame, setting: str) -> str:
    """One setting of the summary as a Markdown table (mean ± std over seeds; one seed: the mean alone; a time
    to target reached by no seed: 'not reached'; a method no client could train: 'did not train'), for
    docs/results.md and the notebooks."""
    head, rows = ["method", "seeds"] + [label for _, label, _ in SUMMARY_COLUMNS], []
    for _, row in summary[summary["setting"] == setting].iterrows():
        cells = [row["method"], str(int(row["seeds"]))]
        for column, _, digits in SUMMARY_COLUMNS:
            mean, std = row.get(f"{column}_mean", np.nan), row.get(f"{column}_std", np.nan)
            if pd.isna(mean):
                cells.append("did not train" if isinstance(row.get("note"), str)
                             else "not reached" if column.startswith("time_to") else "")
                continue
            cells.append(f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}"))
        rows.append(cells)
    return _markdown_table(head, rows)


def claims_markdown(claims_table: pd.DataFrame) -> str:
    """The claims as one Markdown table: a row per claim, a column per setting, each cell the verdict with the
    two means (a against b), for docs/results.md."""
    settings = list(dict.fromkeys(claims_table["setting"]))
    rows = []
    for claim, part in claims_table.groupby("claim", sort=False):
        cells = []
        for setting in settings:
            row = part[part["setting"] == setting]
            if row.empty:
                cells.append("")
                continue
            r = row.iloc[0]
            means = [_fmt(r["column"], r.get(k, np.nan)) if not pd.isna(r.get(k, np.nan)) else "never"
                     for k in ("mean_a", "mean_b")]
            cells.append(r["verdict"] if r["verdict"] in ("not run", "not measured") else
                         f"{r['verdict']}: {means[0]} vs {means[1]}")
        rows.append([claim, *cells])
    return _markdown_table(["claim", *settings], rows)
