"""What the main server does at a round boundary and between rounds: aggregation (NAA or a baseline's rule)
and its messages, folds of non-merging global deltas, catch-ups of returning clients, and the global model
that evaluation sees."""
from __future__ import annotations

import contextlib

import torch

from ..adapters import adapter_parameters, base_weight, layer_of, merge_delta, read_adapter, write_adapter
from ..aggregation import Stacked
from ..metrics import perplexity
from .clients import Client
from .clock import Clock
from .ledger import Ledger
from .messages import Apply, CatchUp, Upload

SERVER_ADAPTER = "server"


def _holders(server, m) -> list[Client]:
    """Clients whose own adapter carries matrix m: on their device, or (per-client variant) on the server too."""
    shared = server.method.server.shared
    return [c for c in server.clients if c.ranks.get(m.name, 0) > 0 and server.replica.has_adapter(c.name)
            and not (shared and not c.hosts(m.layer))]


def _server_copy_weight(server, m, shared: set[str]) -> float | None:
    """The shared server copy's NAA weight on m: the data of the present clients whose server part contained
    m's layer this round (None: the server holds no shared copy of m; `shared`: the matrices it covers)."""
    if m.name not in shared:
        return None
    return sum(len(c.indices) for c in server.present if not c.hosts(m.layer))


def _collect_uploads(server) -> None:
    uploaders = [c for c in server.present if server.replica.has_adapter(c.name) and server.device_ranks(c)]
    asked = {c.name: Upload() for c in uploaders}
    for c in uploaders:
        server.links.post(c, asked[c.name])
    for c in uploaders:
        factors = server.links.collect(c, asked[c.name])
        if factors is not None:
            server.replica.write_factors(c.name, factors.tensors)


def _aggregate_matrix(server, m, ledger: Ledger, shared: set[str]) -> None:
    """Aggregate one matrix over its holders: the clients' adapters and, on an overlap layer, the server's
    shared copy (one more holder, weighted by the data it served). Server-only layers are left to learn on."""
    agg, holders = server.aggregator, _holders(server, m)
    if not holders:
        if m.name in shared:  # a server-only layer: the global model carries the shared set's delta
            f = read_adapter(server.pm, m.name, SERVER_ADAPTER)
            server.global_deltas[m.name] = Stacked(f.scale * f.B, f.A)
        return
    served = _server_copy_weight(server, m, shared)
    names = [c.name for c in holders] + ([SERVER_ADAPTER] if served is not None else [])
    factors = [read_adapter(server.pm, m.name, a) for a in names]
    # absent clients have weight 0: they add nothing, but get what they would have received
    weights = [len(c.indices) if c.present else 0 for c in holders] + ([served] if served is not None else [])
    out = agg(factors, weights, names, m.name)
    ranks = [f.rank if c.present else 0 for f, c in zip(factors, holders)]
    on_device = [c.hosts(m.layer) for c in holders]
    if served is not None:  # the server's copy is stacked too, but never crosses the network
        ranks.append(factors[-1].rank if served else 0)
        on_device.append(False)
    comm = agg.communication(ranks, m.d_in, m.d_out, on_device)
    for c, cb in zip(holders, comm):
        if c.present:
            ledger.add(c.name, "adapter_up", cb["up"])
            ledger.add(c.name, "adapter_down", cb["down"])
    if not agg.merges:
        for a, f in zip(names, out.factors):
            if f is not None:
                write_adapter(server.pm, m.name, f[0], f[1], a)
        if out.global_delta is not None:
            server.global_deltas[m.name] = out.global_delta
        return
    if out.merge is not None:
        merge(server, m.name, out.merge)
    for a in names:
        server.replica.restart(m.name, a, server.generation)
        server.server_opts.forget(a, m.name)
        server.last_reset[a] = server.generation
    rank_sum = out.merge.rank if out.merge is not None else 0
    for c in server.present:  # a client hosting the layer without an adapter there still merges
        if c not in holders and c.hosts(m.layer) and rank_sum:
            ledger.add(c.name, "adapter_down", rank_sum * (m.d_in + m.d_out) * 4)


def aggregate(server, ledger: Ledger) -> float:
    """Aggregate every matrix of every client (wherever its adapter lives) and send each present client its
    result; returns the seconds of the boundary's transfers."""
    _collect_uploads(server)
    server.merges = []
    server.generation += 1
    shared = set(server.shared_matrices())
    for m in server.matrices:
        _aggregate_matrix(server, m, ledger, shared)
    present = server.present
    seconds = Clock.transfer(present, {c.name: ledger.adapter_bytes(c.name) for c in present})
    for c in present:
        server.links.post(c, apply_message(server, c))
    return seconds


def _has_device_adapter(server, c: Client) -> bool:
    return server.replica.has_adapter(c.name) and bool(server.device_ranks(c))


def apply_message(server, c: Client) -> Apply:
    merging, has = server.aggregator.merges, _has_device_adapter(server, c)
    return Apply(restart=has and merging, generation=server.generation,
                 merges=[(n, st.B, st.A) for n, st in server.merges if c.hosts(layer_of(n))],
                 factors=server.replica.factors(c.name, c.device_layers) if has and not merging else {})


def merge(server, name: str, stacked: Stacked) -> None:
    """Fold B_cat A_cat into the frozen weight; the clients hosting it get the factors at the boundary."""
    server.replica.merge(name, stacked.delta())
    server.touched.add(name)
    server.merges.append((name, stacked))


def fold_changed(server, changed: set[str], before) -> dict[str, int]:
    """Merge the learned deltas not yet in the frozen weights (non-merging aggregators' global deltas, server-only
    layers' shared set) of the changed matrices; returns what each present client downloads for them."""
    folds = {n: st for n, st in server.global_deltas.items() if n in changed}
    downloads = {}
    for c in server.present:
        b = sum(st.rank * (st.A.shape[1] + st.B.shape[0]) * 4 for n, st in folds.items()
                if layer_of(n) < before[c.name][0])
        if b:
            downloads[c.name] = b
    for n, st in folds.items():
        merge(server, n, st)
        del server.global_deltas[n]
    return downloads


def catch_up_bytes(server, c: Client) -> int:
    """What a returning client downloads: the merged weights of its device-side matrices that have been
    merged into and, for non-merging aggregators, its device-side adapter factors."""
    device = [m for m in server.matrices if c.hosts(m.layer)]
    merged = sum(m.d_in * m.d_out * server.p for m in device if m.name in server.touched)
    if server.aggregator.merges:
        return merged
    return merged + sum(c.ranks.get(m.name, 0) * m.rank1_cost * 4 for m in device)


def catch_up_message(server, c: Client) -> CatchUp:
    merging, has = server.aggregator.merges, _has_device_adapter(server, c)
    return CatchUp(restart=has and merging, generation=server.last_reset.get(c.name, server.generation),
                   weights=server.replica.weights(sorted(n for n in server.touched if c.hosts(layer_of(n)))),
                   factors=server.replica.factors(c.name, c.device_layers) if has and not merging else {})


# ---- the global model -----------------------------------------------------------------------------

@contextlib.contextmanager
def global_model(server):
    """The global model: merged frozen weights plus, for non-merging aggregators, the global deltas
    (added to a snapshot and restored exactly afterwards); per-client adapters are switched off."""
    pm = server.pm
    saved = {n: base_weight(pm, n).detach().clone() for n in server.global_deltas}
    try:
        for n, st in server.global_deltas.items():
            merge_delta(pm, n, st.delta())
        with pm.disable_adapter():
            yield pm
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                base_weight(pm, n).copy_(w)


def evaluate_ppl(server, batches) -> float:
    with server.global_model() as model:
        return perplexity(model, batches, server.device)


def trainable_params(server) -> tuple[int, int]:
    """(parameters trained on clients, on the server), summed over clients."""
    pm, on_clients, on_server = server.pm, 0, 0
    for c in server.clients:
        if not server.replica.has_adapter(c.name):
            continue
        on_clients += sum(p.numel() for p in adapter_parameters(pm, c.name, c.device_layers))
        on_server += sum(p.numel() for p in adapter_parameters(pm, c.name, range(c.split_point, server.L)))
    if server.replica.has_adapter(SERVER_ADAPTER):
        on_server += sum(p.numel() for p in adapter_parameters(pm, SERVER_ADAPTER))
    return on_clients, on_server
