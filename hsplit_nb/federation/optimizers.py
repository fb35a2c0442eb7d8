"""The main server's optimizers: one AdamW per adapter it trains (the shared set, or each client's own copy on the
server side), kept across rounds, forgotten per matrix where an adapter restarts, and carried over to the new
parameters of a rebuilt set for the matrices that were kept."""
from __future__ import annotations

import torch

from ..adapters import adapter_parameters, layer_of, lora_layer


def factor_params(pm, matrix: str, adapter: str) -> tuple:
    layer = lora_layer(pm, matrix, adapter)
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


class ServerOptimizers(dict):
    """adapter -> AdamW over its server-side parameters (None: it trains nothing there), made on first use.
    `server_layers(adapter)` gives the blocks of that adapter the server trains (None: all of them)."""

    def __init__(self, replica, lr: float, server_layers):
        super().__init__()
        self.replica, self.lr, self.server_layers = replica, lr, server_layers

    def of(self, adapter: str):
        if adapter not in self:
            self[adapter] = self.new(adapter)
        return self[adapter]

    def new(self, adapter: str):
        if not self.replica.has_adapter(adapter):
            return None
        params = adapter_parameters(self.replica.pm, adapter, self.server_layers(adapter))
        return torch.optim.AdamW(params, lr=self.lr) if params else None

    def forget(self, adapter: str, matrix: str) -> None:
        """`adapter` restarted on `matrix`: its server-side optimizer state there starts afresh."""
        opt, layers = self.get(adapter), self.server_layers(adapter)
        if opt is not None and (layers is None or layer_of(matrix) in layers):
            for p in factor_params(self.replica.pm, matrix, adapter):
                opt.state.pop(p, None)

    def moments(self, adapter: str, matrices) -> dict:
        """The optimizer state of `matrices` (to carry over a rebuild; empty when none was made yet)."""
        opt = self.get(adapter)
        if opt is None:
            return {}
        return {n: [opt.state.get(p) for p in factor_params(self.replica.pm, n, adapter)] for n in matrices}

    def restore(self, adapter: str, moments: dict) -> None:
        """A fresh optimizer over the rebuilt adapter, holding the carried-over state of the kept matrices."""
        if not any(v is not None for saved in moments.values() for v in saved):
            return
        opt = self[adapter] = self.new(adapter)
        for n, saved in moments.items():
            for p, v in zip(factor_params(self.replica.pm, n, adapter), saved):
                if v is not None:
                    opt.state[p] = v

    def state_dict(self) -> dict:
        return {k: None if opt is None else opt.state_dict() for k, opt in self.items()}

    def load_state_dict(self, state: dict) -> None:
        """Optimizers over the adapters as they are now, holding the saved state."""
        self.clear()
        for key, saved in state.items():
            opt = self[key] = self.new(key)
            if saved is not None:
                opt.load_state_dict(saved)
