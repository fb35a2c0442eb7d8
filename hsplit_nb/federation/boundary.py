"""The aggregation round: what the main server does to adapters and weights at a round boundary and between
rounds. It owns the generation that keys every restart, the merges of the current boundary (for the clients'
messages), the non-merging aggregators' global deltas, the matrices whose frozen weight has been merged into,
and each adapter's last restart; it restarts, rebuilds and aggregates over the server's replica and optimizers,
and builds what each client is sent (`Configure`, `Apply`, `CatchUp`, `Sync`)."""
from __future__ import annotations

import contextlib

import torch

from ..adapters import (
    adapter_names, adapter_parameters, base_weight, layer_of, merge_delta, read_adapter, write_adapter,
)
from ..aggregation import Stacked
from .clients import Client
from .clock import Clock
from .ledger import Ledger
from .messages import Apply, CatchUp, Configure, Sync, Upload
from .optimizers import ServerOptimizers
from .replica import Replica

SERVER_ADAPTER = "server"


class AggregationRound:
    """`method`: the method's behaviour objects (its aggregator, its server-side adapter policy); `matrices`: the
    candidate matrices; `p`: bytes per frozen weight value."""

    def __init__(self, replica: Replica, opts: ServerOptimizers, method, matrices, p: int):
        self.replica, self.opts, self.method, self.matrices, self.p = replica, opts, method, matrices, p
        self.aggregator = method.aggregator
        self.generation = 0
        self.merges: list = []          # (matrix, Stacked) merged at the current boundary
        self.global_deltas: dict = {}   # non-merging aggregators: the global model's deltas (matrix -> Stacked)
        self.touched: set[str] = set()  # matrices whose frozen weight has been merged into
        self.last_reset: dict[str, int] = {}  # adapter -> generation of its last restart

    @property
    def pm(self):
        return self.replica.pm

    def next_generation(self) -> None:
        self.generation += 1
        self.merges = []

    # ---- restarts -----------------------------------------------------------------------------------

    def restart(self, matrix: str, adapter: str) -> None:
        """`adapter` on `matrix` starts again from the common A of this generation, with fresh Adam state."""
        self.replica.restart(matrix, adapter, self.generation)
        self.opts.forget(adapter, matrix)

    def replace(self, name: str, ranks: dict[str, int]) -> None:
        """Adapter `name` built afresh at `ranks` (none: dropped), its optimizer with it."""
        self.opts.pop(name, None)
        if self.replica.replace_adapter(name, ranks, self.generation):
            self.last_reset[name] = self.generation

    def rebuild_shared(self, ranks: dict[str, int], kept: list[str]) -> None:
        """Build the shared set at `ranks`; the `kept` matrices keep their factors and Adam state."""
        factors = {n: read_adapter(self.pm, n, SERVER_ADAPTER) for n in kept}
        moments = self.opts.moments(SERVER_ADAPTER, kept)
        self.replace(SERVER_ADAPTER, ranks)
        for n, f in factors.items():
            write_adapter(self.pm, n, f.A, f.B, SERVER_ADAPTER)
        self.opts.restore(SERVER_ADAPTER, moments)

    def restart_clients(self, clients: list[Client], change) -> None:
        """Rebuild the clients' own adapters whose ranks changed; restart the changed matrices of the others."""
        for c in clients:
            if c.name in change.rebuilt:
                self.replace(c.name, self.method.server.client_ranks(c.ranks, c.split_point))
            elif self.replica.has_adapter(c.name):
                for n in sorted(change.matrices & set(adapter_names(self.pm, c.name))):
                    self.restart(n, c.name)

    # ---- what the holders are ----------------------------------------------------------------------

    def device_ranks(self, c: Client) -> dict[str, int]:
        """The ranks of the adapters on c's device."""
        return {n: r for n, r in self.method.server.client_ranks(c.ranks, c.split_point).items()
                if r > 0 and c.hosts(layer_of(n))}

    def shared_matrices(self) -> list[str]:
        """The matrices that carry the main server's shared adapter set (none for the per-client variant)."""
        return adapter_names(self.pm, SERVER_ADAPTER) if self.replica.has_adapter(SERVER_ADAPTER) else []

    def _has_device_adapter(self, c: Client) -> bool:
        return self.replica.has_adapter(c.name) and bool(self.device_ranks(c))

    def _holders(self, clients: list[Client], m) -> list[Client]:
        """Clients whose own adapter carries matrix m: on their device, or (per-client variant) on the server."""
        shared = self.method.server.shared
        return [c for c in clients if c.ranks.get(m.name, 0) > 0 and self.replica.has_adapter(c.name)
                and not (shared and not c.hosts(m.layer))]

    # ---- aggregation --------------------------------------------------------------------------------

    def aggregate(self, clients: list[Client], links, ledger: Ledger) -> float:
        """Aggregate every matrix of every client (wherever its adapter lives) and send each present client its
        result; returns the seconds of the boundary's transfers."""
        present = [c for c in clients if c.present]
        self._collect_uploads(present, links)
        self.next_generation()
        shared = set(self.shared_matrices())
        for m in self.matrices:
            self._aggregate_matrix(clients, m, ledger, shared)
        present = [c for c in clients if c.present]
        seconds = Clock.transfer(present, {c.name: ledger.adapter_bytes(c.name) for c in present})
        for c in present:
            links.post(c, self.apply_message(c))
        return seconds

    def _collect_uploads(self, present: list[Client], links) -> None:
        asked = {c.name: Upload() for c in present if self._has_device_adapter(c)}
        uploaders = [c for c in present if c.name in asked]
        for c in uploaders:
            links.post(c, asked[c.name])
        for c in uploaders:
            factors = links.collect(c, asked[c.name])
            if factors is not None:
                self.replica.write_factors(c.name, factors.tensors)

    def _aggregate_matrix(self, clients: list[Client], m, ledger: Ledger, shared: set[str]) -> None:
        """Aggregate one matrix over its holders: the clients' adapters and, on an overlap layer, the server's
        shared copy (one more holder, weighted by the data it served). Server-only layers are left to learn on."""
        agg, holders = self.aggregator, self._holders(clients, m)
        present = [c for c in clients if c.present]
        if not holders:
            if m.name in shared:  # a server-only layer: the global model carries the shared set's delta
                f = read_adapter(self.pm, m.name, SERVER_ADAPTER)
                self.global_deltas[m.name] = Stacked(f.scale * f.B, f.A)
            return
        # the shared copy's weight: the data of the present clients whose server part contained m's layer
        served = sum(len(c.indices) for c in present if not c.hosts(m.layer)) if m.name in shared else None
        names = [c.name for c in holders] + ([SERVER_ADAPTER] if served is not None else [])
        factors = [read_adapter(self.pm, m.name, a) for a in names]
        # absent clients have weight 0: they add nothing, but get what they would have received
        weights = [len(c.indices) if c.present else 0 for c in holders] + ([served] if served is not None else [])
        out = agg(factors, weights, names, m.name)
        ranks = [f.rank if c.present else 0 for f, c in zip(factors, holders)]
        on_device = [c.hosts(m.layer) for c in holders]
        if served is not None:  # the server's copy is stacked too, but never crosses the network
            ranks.append(factors[-1].rank if served else 0)
            on_device.append(False)
        for c, cb in zip(holders, agg.communication(ranks, m.d_in, m.d_out, on_device)):
            if c.present:
                ledger.add(c.name, "adapter_up", cb["up"])
                ledger.add(c.name, "adapter_down", cb["down"])
        self._apply(m, out, names)
        extra = agg.hosting_download(out.merge.rank if out.merge is not None else 0, m.d_in, m.d_out)
        for c in present:  # a client hosting the layer without an adapter there still merges
            if c not in holders and c.hosts(m.layer) and extra:
                ledger.add(c.name, "adapter_down", extra)

    def _apply(self, m, out, names: list[str]) -> None:
        """One matrix's aggregate: factors written back, the global model's delta kept, the merge folded in;
        under a merging rule every holder restarts."""
        for a, f in zip(names, out.factors):
            if f is not None:
                write_adapter(self.pm, m.name, f[0], f[1], a)
        if out.global_delta is not None:
            self.global_deltas[m.name] = out.global_delta
        if out.merge is not None:
            self.merge(m.name, out.merge)
        if self.aggregator.merges:
            for a in names:
                self.restart(m.name, a)
                self.last_reset[a] = self.generation

    def merge(self, name: str, stacked: Stacked) -> None:
        """Fold B_cat A_cat into the frozen weight; the clients hosting it get the factors at the boundary."""
        self.replica.merge(name, stacked.delta())
        self.touched.add(name)
        self.merges.append((name, stacked))

    def fold_changed(self, present: list[Client], changed: set[str], before) -> dict[str, int]:
        """Merge the learned deltas not yet in the frozen weights (non-merging aggregators' global deltas,
        server-only layers' shared set) of the changed matrices; returns what each present client downloads."""
        folds = {n: st for n, st in self.global_deltas.items() if n in changed}
        downloads = {}
        for c in present:
            b = sum(st.rank * (st.A.shape[1] + st.B.shape[0]) * 4 for n, st in folds.items()
                    if layer_of(n) < before[c.name][0])
            if b:
                downloads[c.name] = b
        for n, st in folds.items():
            self.merge(n, st)
            del self.global_deltas[n]
        return downloads

    # ---- what each client is sent --------------------------------------------------------------------

    def configure_message(self, c: Client, old_split: int, grown: range, rebuild: bool, changed) -> Configure:
        """A new plan for client c: its device ranks, the folds of the deltas its device held, the blocks it
        newly hosts, and (unless its adapter is rebuilt) the changed matrices it restarts."""
        restarts = [] if rebuild else sorted(n for n in changed if c.hosts(layer_of(n))
                                             and self.device_ranks(c).get(n, 0))
        return Configure(c.split_point, self.device_ranks(c), self.generation, rebuild=rebuild, restarts=restarts,
                         folds=[(n, st.B, st.A) for n, st in self.merges if layer_of(n) < old_split],
                         blocks=[self.replica.block_tensors(layer) for layer in grown])

    def apply_message(self, c: Client) -> Apply:
        restart, factors = self.aggregator.share(self._has_device_adapter(c))
        return Apply(restart=restart, generation=self.generation,
                     merges=[(n, st.B, st.A) for n, st in self.merges if c.hosts(layer_of(n))],
                     factors=self.replica.factors(c.name, c.device_layers) if factors else {})

    def catch_up_bytes(self, c: Client) -> int:
        """What a returning client downloads: the merged weights of its device-side matrices that have been
        merged into and, for non-merging aggregators, its device-side adapter factors."""
        device = [m for m in self.matrices if c.hosts(m.layer)]
        return self.aggregator.return_bytes(sum(m.d_in * m.d_out * self.p for m in device if m.name in self.touched),
                                            sum(c.ranks.get(m.name, 0) * m.rank1_cost * 4 for m in device))

    def catch_up_message(self, c: Client) -> CatchUp:
        restart, factors = self.aggregator.share(self._has_device_adapter(c))
        return CatchUp(restart=restart, generation=self.last_reset.get(c.name, self.generation),
                       weights=self._device_weights(c),
                       factors=self.replica.factors(c.name, c.device_layers) if factors else {})

    def sync_message(self, c: Client, optimizer) -> Sync:
        """Everything client c held at a checkpoint, for a resumed run."""
        has = self._has_device_adapter(c)
        return Sync(c.split_point, self.device_ranks(c), self.generation, weights=self._device_weights(c),
                    factors=self.replica.factors(c.name, c.device_layers) if has else {}, optimizer=optimizer)

    def _device_weights(self, c: Client) -> dict:
        return self.replica.weights(sorted(n for n in self.touched if c.hosts(layer_of(n))))

    # ---- the global model, and the state -----------------------------------------------------------

    @contextlib.contextmanager
    def global_model(self):
        """The global model: merged frozen weights plus, for non-merging aggregators, the global deltas
        (added to a snapshot and restored exactly afterwards); per-client adapters are switched off."""
        pm = self.pm
        saved = {n: base_weight(pm, n).detach().clone() for n in self.global_deltas}
        try:
            for n, st in self.global_deltas.items():
                merge_delta(pm, n, st.delta())
            with pm.disable_adapter():
                yield pm
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    base_weight(pm, n).copy_(w)

    def trainable_params(self, clients: list[Client], n_blocks: int) -> tuple[int, int]:
        """(parameters trained on clients, on the server), summed over clients."""
        pm, on_clients, on_server = self.pm, 0, 0
        for c in clients:
            if not self.replica.has_adapter(c.name):
                continue
            on_clients += sum(p.numel() for p in adapter_parameters(pm, c.name, c.device_layers))
            on_server += sum(p.numel() for p in adapter_parameters(pm, c.name, range(c.split_point, n_blocks)))
        if self.replica.has_adapter(SERVER_ADAPTER):
            on_server += sum(p.numel() for p in adapter_parameters(pm, SERVER_ADAPTER))
        return on_clients, on_server

    def state_dict(self) -> dict:
        """The adapters, the merged weights, the global deltas and the restart bookkeeping."""
        return {"adapters": {a: {n: read_adapter(self.pm, n, a) for n in adapter_names(self.pm, a)}
                             for a in self.replica.adapters()},
                "touched": {n: w.clone() for n, w in self.replica.weights(sorted(self.touched)).items()},
                "global_deltas": {n: (st.B, st.A) for n, st in self.global_deltas.items()},
                "generation": self.generation, "last_reset": dict(self.last_reset)}

    def load_state_dict(self, state: dict) -> None:
        for adapter, mats in state["adapters"].items():
            self.replace(adapter, {n: f.rank for n, f in mats.items()})
            for n, f in mats.items():
                write_adapter(self.pm, n, f.A, f.B, adapter)
        self.replica.load_weights(state["touched"])
        self.touched = set(state["touched"])
        self.global_deltas = {n: Stacked(B, A) for n, (B, A) in state["global_deltas"].items()}
        self.generation, self.last_reset = state["generation"], dict(state["last_reset"])
