"""IWI: Important Weight Identification with the resource-normalised gradient-weight product (RNGWP).

RNGWP_m = sum_ij |W_m,ij * dL/dW_m,ij| / (d_in + d_out), from one calibration mini-batch; the
tracker smooths it with a dynamic coefficient and decides when ARMSC must reconfigure.
"""
from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora import LoraLayer

from .adapters import base_weight, candidate_matrices
from .architectures import architecture
from .split import split_model, unwrap


@contextlib.contextmanager
def _base_grads(model, names):
    """Turn on requires_grad for the frozen base weights for one calibration, and always turn it off."""
    weights = [base_weight(model, n) for n in names]
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield weights
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)


def _score(weight: torch.Tensor, grad: torch.Tensor, cost: int) -> float:
    return float((weight.detach() * grad).abs().sum()) / cost


@contextlib.contextmanager
def scoring(model, names):
    """Calibration mode for the matrices `names`: eval mode (no dropout noise in the estimate) and their
    frozen weights requiring grad; both restored afterwards. Yields the weights."""
    was_training = model.training
    model.eval()
    try:
        with _base_grads(model, names) as weights:
            yield weights
    finally:
        model.train(was_training)


@contextlib.contextmanager
def riding(model, matrices, live_inputs=()):
    """RNGWP of `matrices` formed in the backward of the step run inside, on that step's batch: a forward hook
    keeps each frozen base layer's input x, a hook on its output forms G = g_out^T x when the backward reaches it
    and reduces it to the score at once (G is never stored). `live_inputs` (a client's embedding modules) make
    the first hidden state require grad, so the backward also reaches blocks before the first adapter; no
    adapter's gradient changes. Yields {matrix: score}, filled during the backward; the hooks go on exit."""
    hf = unwrap(model)
    transposed = architecture(hf).weights_transposed
    scores: dict[str, float] = {}
    handles = []

    def keep(m, weight):
        def on_forward(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach()

            def on_backward(g):
                x2, g2 = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
                scores[m.name] = _score(weight.float(), x2.T @ g2 if transposed else g2.T @ x2, m.rank1_cost)
            output.register_hook(on_backward)
        return on_forward

    def live(module, inputs, output):
        return None if output.requires_grad else output.detach().requires_grad_(True)

    try:
        for m in matrices:
            module = hf.get_submodule(m.name)
            base = module.get_base_layer() if isinstance(module, LoraLayer) else module
            handles.append(base.register_forward_hook(keep(m, base_weight(model, m.name))))
        handles += [mod.register_forward_hook(live) for mod in live_inputs]
        yield scores
    finally:
        for h in handles:
            h.remove()


def side_matrices(config, split_point: int | None, side: str) -> list:
    """The candidate matrices on one side of a split ("client": blocks below it, "server": the rest)."""
    matrices = candidate_matrices(config)
    if split_point is None:
        return matrices if side == "server" else []
    return [m for m in matrices if (m.layer < split_point) == (side == "client")]


def server_scores(server, received: torch.Tensor, mask, labels, matrices, weights) -> tuple[dict, torch.Tensor]:
    """The server's half of a split calibration: RNGWP of its matrices and the smashed data's gradient."""
    received.requires_grad_(True)
    loss = server(received, mask, labels).loss
    grads = torch.autograd.grad(loss, [received] + list(weights))
    return {m.name: _score(w, g, m.rank1_cost) for m, w, g in zip(matrices, weights, grads[1:])}, grads[0]


def client_scores(smashed: torch.Tensor, grad: torch.Tensor, matrices, weights) -> dict[str, float]:
    """The client's half: RNGWP of its matrices from the gradient the server sent down."""
    if not matrices:
        return {}
    grads = torch.autograd.grad(smashed, list(weights), grad_outputs=grad)
    return {m.name: _score(w, g, m.rank1_cost) for m, w, g in zip(matrices, weights, grads)}


def rngwp_scores(model, batch: dict, split_point: int | None = None) -> dict[str, float]:
    """RNGWP of every candidate matrix on one batch: {matrix name: S_m / (d_in + d_out)}.

    Gradients come from torch.autograd.grad, so no `.grad` (base or adapter) is written, and the base
    weights stop requiring grad afterwards. With `split_point`, the split protocol is followed: the server
    scores its blocks, sends the smashed data's gradient down, and the client scores its own blocks; only
    scalars would leave either side. The scores are the same either way.
    """
    config = unwrap(model).config
    names = [m.name for m in candidate_matrices(config)]
    with scoring(model, names) as weights:
        if split_point is None:
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, weights)
            cost = {m.name: m.rank1_cost for m in candidate_matrices(config)}
            return {n: _score(w, g, cost[n]) for n, w, g in zip(names, weights, grads)}
        weight = dict(zip(names, weights))
        cli, srv = side_matrices(config, split_point, "client"), side_matrices(config, split_point, "server")
        client, server = split_model(model, split_point)
        smashed = client(batch["input_ids"], batch.get("attention_mask"))
        scores, grad = server_scores(server, smashed.detach(), batch.get("attention_mask"), batch["labels"], srv,
                                     [weight[m.name] for m in srv])
        scores.update(client_scores(smashed, grad, cli, [weight[m.name] for m in cli]))
        return {n: scores[n] for n in names}


class ImportanceTracker:
    """Smoothed importance Ibar with the spec's dynamic beta, the global vector g, and the trigger.

    Ibar(t) = beta_t * Ibar(t-1) + (1 - beta_t) * RNGWP(t),
    beta_t = beta_max * (1 - 1/(t+1)) / (1 + Delta_t),  Delta_t = ||RNGWP(t) - Ibar(t-1)||_1 / ||Ibar(t-1)||_1,
    with t = 0, 1, ... counting calibrations (so the first calibration sets Ibar = RNGWP).
    """

    def __init__(self, names, beta_max: float = 0.9, delta: float = 0.1):
        if not 0 <= beta_max < 1:
            raise ValueError(f"beta_max must be in [0, 1), got {beta_max!r}")
        if not delta > 0:
            raise ValueError(f"delta must be positive, got {delta!r}")
        self.names = list(names)
        if not self.names:
            raise ValueError("ImportanceTracker needs at least one matrix name")
        self.beta_max, self.delta = beta_max, delta
        self.t = 0
        self.ibar: torch.Tensor | None = None
        self.history: list[dict] = []
        self._g_config: torch.Tensor | None = None
        self._budgets_config: dict | None = None
        self._present_config: frozenset | None = None

    def update(self, scores: dict[str, float]) -> dict:
        """Fold one calibration's RNGWP scores in; returns beta, the fluctuation and the new g."""
        missing = [n for n in self.names if n not in scores]
        if missing:
            raise ValueError(f"scores lack {len(missing)} matrices, e.g. {missing[:3]}")
        r = torch.tensor([float(scores[n]) for n in self.names], dtype=torch.float64)
        if not torch.isfinite(r).all() or (r < 0).any():
            raise ValueError("RNGWP scores must be finite and non-negative")
        if self.ibar is None:
            beta, fluctuation = 0.0, None
            self.ibar = r
        else:
            fluctuation = float((r - self.ibar).abs().sum() / self.ibar.abs().sum().clamp_min(1e-300))
            beta = self.beta_max * (1 - 1 / (self.t + 1)) / (1 + fluctuation)
            self.ibar = beta * self.ibar + (1 - beta) * r
        record = {"t": self.t, "beta": beta, "fluctuation": fluctuation,
                  "shift": self.shift() if self._g_config is not None else None}
        self.history.append(record)
        self.t += 1
        return record

    @property
    def ready(self) -> bool:
        """Whether a calibration has been folded in (before it, ARMSC plans with uniform importance)."""
        return self.ibar is not None

    def importance(self) -> dict[str, float]:
        """Ibar per matrix (what ARMSC ranks by)."""
        self._need_data()
        return dict(zip(self.names, self.ibar.tolist()))

    def global_vector(self) -> dict[str, float]:
        """g = Ibar / ||Ibar||_1 over all candidates of all layers."""
        return dict(zip(self.names, self._g().tolist()))

    def _g(self) -> torch.Tensor:
        self._need_data()
        return self.ibar / self.ibar.abs().sum().clamp_min(1e-300)

    def _need_data(self):
        if self.ibar is None:
            raise RuntimeError("no calibration yet: call update() with RNGWP scores first")

    def shift(self) -> float:
        """||g(t) - g(t_last_config)||_1."""
        if self._g_config is None:
            raise RuntimeError("no configuration recorded yet: call configured() after planning")
        return float((self._g() - self._g_config).abs().sum())

    @property
    def has_configuration(self) -> bool:
        """Whether a configuration planned from importance has been recorded (`configured`)."""
        return self._g_config is not None

    def configured(self, budgets: dict | None = None, present=None) -> None:
        """Record the state a (re)configuration was planned from."""
        self._g_config = self._g().clone()
        self._budgets_config = dict(budgets or {})
        self._present_config = frozenset(present) if present is not None else None

    STATE = ("t", "ibar", "history", "_g_config", "_budgets_config", "_present_config")

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the calibrations folded in and the state the last configuration saw."""
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for k in self.STATE:
            setattr(self, k, state[k])

    def trigger(self, budgets: dict | None = None, present=None) -> list[str]:
        """Why ARMSC must reconfigure now (empty: it need not): never configured, importance moved more
        than delta in L1, a budget changed, or a client left or returned."""
        if self._g_config is None:
            return ["no configuration yet"]
        reasons = []
        shift = self.shift()
        if shift > self.delta:
            reasons.append(f"importance shift {shift:.4f} > delta {self.delta}")
        reasons += resource_changes(self._budgets_config, self._present_config, budgets, present)
        return reasons


def resource_changes(old_budgets: dict | None, old_present, budgets: dict | None = None, present=None) -> list[str]:
    """Reasons to reconfigure other than importance: budgets that changed, clients that left or returned."""
    reasons = []
    if budgets is not None and old_budgets is not None:
        changed = sorted(k for k in set(budgets) | set(old_budgets) if budgets.get(k) != old_budgets.get(k))
        if changed:
            reasons.append(f"budget changed for {', '.join(map(str, changed))}")
    if present is not None and old_present is not None:
        left, back = sorted(set(old_present) - set(present)), sorted(set(present) - set(old_present))
        if left:
            reasons.append(f"left: {', '.join(map(str, left))}")
        if back:
            reasons.append(f"returned: {', '.join(map(str, back))}")
    return reasons
