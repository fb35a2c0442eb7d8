"""A replica: one copy of the model's weights with the named peft adapters it carries.

The main server holds one; in the simulation every in-process client shares it (a merge reaches every copy
at once), while a client process holds its own. Adapter restarts draw A from a generator keyed by
(seed, matrix, generation), never by the adapter's owner, so every holder of a matrix starts from the same A
and two replicas restart an adapter identically without sending it.
"""
from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora import LoraLayer

from ..adapters import (
    adapter_names, add_adapters, base_weight, layer_of, lora_layer, merge_delta, read_adapter, restart_adapter,
    restart_seed,
    write_adapter,
)
from ..architectures import block_list
from ..split import unwrap


class Replica:
    """`top_rank`: the rows of A every restart draws (lower ranks take the first rows); `alpha`: the LoRA alpha,
    fixed across ranks."""

    def __init__(self, model, seed: int, top_rank: int, alpha: float):
        self.model, self.seed, self.top_rank, self.alpha = model, seed, top_rank, alpha
        self.pm = model  # the peft model once adapters exist, else the transformers model

    def has_adapter(self, name: str) -> bool:
        return unwrap(self.pm) is not self.pm and name in self.pm.peft_config

    def adapters(self) -> list[str]:
        return list(self.pm.peft_config) if unwrap(self.pm) is not self.pm else []

    def ranks(self, adapter: str) -> dict[str, int]:
        """The rank of every matrix carrying `adapter` (empty when there is no such adapter)."""
        if not self.has_adapter(adapter):
            return {}
        return {n: lora_layer(self.pm, n, adapter).r[adapter] for n in adapter_names(self.pm, adapter)}

    def replace_adapter(self, name: str, ranks: dict[str, int], generation: int) -> bool:
        """Drop adapter `name` and, if any rank is positive, build it afresh at `generation`; True if built."""
        if self.has_adapter(name):
            self.pm.delete_adapter(name)
        if not any(r > 0 for r in ranks.values()):
            return False
        self.pm = add_adapters(self.pm, ranks, alpha=self.alpha, adapter=name)
        self.restart_all(name, generation)
        return True

    def restart(self, matrix: str, adapter: str, generation: int) -> None:
        """Common initialisation: every adapter on `matrix` at `generation` starts from the same A."""
        restart_adapter(self.pm, matrix, adapter, restart_seed(self.seed, matrix, generation), self.top_rank)

    def restart_all(self, adapter: str, generation: int) -> None:
        for n in adapter_names(self.pm, adapter):
            self.restart(n, adapter, generation)

    def activate(self, names: list[str]) -> None:
        self.pm.base_model.set_adapter(names)

    @contextlib.contextmanager
    def using(self, names: list[str]):
        """Forward and backward through exactly the adapters `names` (none: every adapter switched off)."""
        names = [n for n in names if self.has_adapter(n)]
        if names:
            self.activate(names)
            yield
        elif unwrap(self.pm) is not self.pm:
            with self.pm.disable_adapter():
                yield
        else:
            yield

    def merge(self, matrix: str, delta: torch.Tensor) -> None:
        merge_delta(self.pm, matrix, delta)

    def factors(self, adapter: str, layers=None) -> dict[str, torch.Tensor]:
        """Copies of an adapter's factors, keyed `matrix|A` and `matrix|B` (only blocks in `layers` if given)."""
        out = {}
        for n in adapter_names(self.pm, adapter):
            if layers is None or layer_of(n) in layers:
                f = read_adapter(self.pm, n, adapter)
                out[f"{n}|A"], out[f"{n}|B"] = f.A, f.B
        return out

    def write_factors(self, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        for key in tensors:
            if key.endswith("|A"):
                n = key[:-2]
                write_adapter(self.pm, n, tensors[key], tensors[n + "|B"], adapter)

    def weights(self, names) -> dict[str, torch.Tensor]:
        """The frozen weights of the matrices `names` (views, not copies)."""
        return {n: base_weight(self.pm, n).detach() for n in names}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, w in tensors.items():
                base_weight(self.pm, n).copy_(w)

    def block_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The frozen parameters of one block (no adapters), named independently of peft's wrapping."""
        block = block_list(unwrap(self.pm))[layer]
        return {f"{layer}.{n.replace('.base_layer', '')}": p.detach() for n, p in block.named_parameters()
                if "lora_" not in n}

    def load_block_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            layer, name = key.split(".", 1)
            path, attr = name.rsplit(".", 1)
            module = block_list(unwrap(self.pm))[int(layer)].get_submodule(path)
            if isinstance(module, LoraLayer):
                module = module.get_base_layer()
            with torch.no_grad():
                getattr(module, attr).copy_(t)
