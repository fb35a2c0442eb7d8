"""The split engine: cut a causal LM into a client part and a server part at block s.

The client holds the embeddings and blocks [0, s); the server holds blocks [s, L), the final norm
and the LM head. Only the smashed data (B x T x d), the padding mask and the labels cross the cut
upwards, and the smashed data's gradient downwards. Positions, rotary tables and the causal mask are
recomputed on each side, never shipped. Both parts reuse the model's own block modules, so the
split forward runs exactly the computation of the unsplit forward.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutput

from .architectures import architecture, block_list, hidden_size, num_blocks


def unwrap(model) -> nn.Module:
    """The transformers model inside a peft PeftModel (or the model itself)."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model and hasattr(base, "model"):
        return base.model
    return model


def check_split_point(split_point, n_blocks: int) -> int:
    """The split point as an int (numpy integers included), or an error naming the allowed range."""
    if isinstance(split_point, bool) or not isinstance(split_point, numbers.Integral) \
            or not 1 <= split_point <= n_blocks - 1:
        raise ValueError(f"split_point must be an integer in [1, {n_blocks - 1}] for a {n_blocks}-block model, "
                         f"got {split_point!r}")
    return int(split_point)


def _check_mask(mask: torch.Tensor | None, shape) -> None:
    if mask is not None and mask.numel() != shape[0] * shape[1]:
        raise ValueError(f"attention_mask must have shape {tuple(shape)} (batch, seq), got {tuple(mask.shape)}")


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    # The same default as the unsplit HF forward: 0..T-1 for every row (batches are right-padded).
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


class _Part(nn.Module):
    """What both halves share: the config, the blocks they own and how to run them."""

    def __init__(self, model, blocks):
        super().__init__()
        hf = unwrap(model)
        self.config = hf.config
        self.arch = architecture(hf)
        self.blocks = nn.ModuleList(blocks)
        self.rotary_emb = hf.get_submodule(self.arch.rotary) if self.arch.rotary else None

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        positions = _positions(hidden)
        if attention_mask is not None:
            attention_mask = attention_mask.view(hidden.shape[0], -1)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=positions)
        rope = self.rotary_emb(hidden, position_ids=positions) if self.rotary_emb is not None else None
        for block in self.blocks:
            hidden = self.arch.run_block(block, hidden, mask, positions, rope)
        return hidden


class ClientPart(_Part):
    """Embeddings and blocks [0, s): input ids -> smashed data."""

    def __init__(self, model, split_point: int):
        hf = unwrap(model)
        split_point = check_split_point(split_point, num_blocks(hf))
        super().__init__(model, list(block_list(hf))[:split_point])
        self.split_point = split_point
        self.embeddings = nn.ModuleList([hf.get_submodule(path) for path in self.arch.embeddings])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids of shape (batch, seq), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        _check_mask(attention_mask, input_ids.shape)
        return self.run_blocks(self.arch.embed(self.embeddings, input_ids, _positions(input_ids)), attention_mask)


class ServerPart(_Part):
    """Blocks [s, L), final norm and LM head: smashed data -> logits and loss."""

    def __init__(self, model, split_point: int):
        hf = unwrap(model)
        split_point = check_split_point(split_point, num_blocks(hf))
        super().__init__(model, list(block_list(hf))[split_point:])
        self.split_point = split_point
        self.norm = hf.get_submodule(self.arch.final_norm)
        self.lm_head = hf.lm_head
        self._loss_function = hf.loss_function

    def forward(self, smashed: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> CausalLMOutput:
        d = hidden_size(self.config)
        if smashed.dim() != 3 or smashed.shape[-1] != d:
            raise ValueError(f"smashed data must have shape (batch, seq, {d}) at split point {self.split_point}, "
                             f"got {tuple(smashed.shape)}")
        _check_mask(attention_mask, smashed.shape[:2])
        if labels is not None and tuple(labels.shape) != tuple(smashed.shape[:2]):
            raise ValueError(f"labels must have shape {tuple(smashed.shape[:2])}, got {tuple(labels.shape)}")
        logits = self.lm_head(self.norm(self.run_blocks(smashed, attention_mask)))
        loss = None
        if labels is not None:
            loss = self._loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutput(loss=loss, logits=logits)


def split_model(model, split_point: int) -> tuple[ClientPart, ServerPart]:
    """Cut `model` (a transformers causal LM, or a peft model around one) at block `split_point`."""
    return ClientPart(model, split_point), ServerPart(model, split_point)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class StepResult:
    loss: float
    bytes_up: int    # client -> server: smashed data, padding mask, labels
    bytes_down: int  # server -> client: gradient of the smashed data


def server_update(server: ServerPart, received: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
                  server_opt: torch.optim.Optimizer | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's stage of a step on received smashed data (a leaf): forward, loss, backward, optimizer
    step. Returns the loss and the smashed data's gradient, which goes back to the client."""
    received.requires_grad_(True)
    out = server(received, mask, labels)
    if server_opt is not None:
        server_opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if server_opt is not None:
        server_opt.step()
    return out.loss.detach(), received.grad


def client_update(smashed: torch.Tensor, grad: torch.Tensor, client_opt: torch.optim.Optimizer | None) -> None:
    """The client's last stage: backward from the received gradient through the graph kept since the
    forward, and an optimizer step (nothing to do if the client trains nothing)."""
    if smashed.requires_grad:
        if client_opt is not None:
            client_opt.zero_grad(set_to_none=True)
        smashed.backward(grad)
        if client_opt is not None:
            client_opt.step()


def split_step(client: ClientPart, server: ServerPart, batch: dict,
               client_opt: torch.optim.Optimizer | None, server_opt: torch.optim.Optimizer | None) -> StepResult:
    """One local step of split learning, in the five stages of the protocol."""
    input_ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    # 1. client forward
    smashed = client(input_ids, mask)
    # 2. the cut: the server receives a leaf tensor, so its backward stops here
    received = smashed.detach()
    # 3. server forward, loss, backward and optimizer step; 4. the gradient goes back
    loss, grad = server_update(server, received, mask, labels, server_opt)
    # 5. client backward and optimizer step
    client_update(smashed, grad, client_opt)
    return StepResult(loss=loss.item(), bytes_up=nbytes(received, mask, labels), bytes_down=nbytes(grad))
