"""Divergence: a non-finite loss, importance score or perplexity stops the run at once, naming where.

A NaN that trained on would be checkpointed as the resume point and drawn in every figure; stopping at
the first one keeps the last finite round as the resume point and names the likely cause.
"""
from __future__ import annotations

import math


class Diverged(FloatingPointError):
    """Training produced a non-finite number; the message names the method, round, step and client."""


def finite(owner, value: float, what: str, client=None, step=None) -> float:
    """`value` if finite; otherwise stop with a Diverged error that names `owner`'s method, round and lr.
    `owner` is a main server or a central trainer (`method`, `round`, `step_in_round`, `lr`)."""
    if math.isfinite(value):
        return value
    step = owner.step_in_round if step is None else step
    where = [f"round {owner.round}"] + ([f"local step {step}"] if step else []) + \
        ([f"client {getattr(client, 'name', client)}"] if client is not None else [])
    raise Diverged(f"{owner.method.name} diverged in {', '.join(where)}: {what} is {value}. The likely cause is "
                   f"the learning rate ({owner.lr:g}); try a smaller one. No non-finite state was saved.")
