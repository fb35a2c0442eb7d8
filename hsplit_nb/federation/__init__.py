"""Federation: the main server, its clients behind one interface, the byte ledger and clock, the central
references, and checkpoints. `federation(...)` builds what a method needs."""
from __future__ import annotations

from .boundary import SERVER_ADAPTER
from .central import CENTRAL_ADAPTER, CentralTraining
from .clients import Client, next_indices
from .divergence import Diverged
from .clock import Clock
from .ledger import BYTE_KINDS, Ledger
from .local import LocalClient, unsplit_step
from .messages import VOCABULARY, ClientStages, Message
from .proxy import ClientProxy, InProcess
from .replica import Replica
from .server import MainServer, NoClientFits, in_process

__all__ = ["BYTE_KINDS", "CENTRAL_ADAPTER", "SERVER_ADAPTER", "VOCABULARY", "CentralTraining", "Client", "ClientProxy",
           "ClientStages", "Clock", "Diverged", "InProcess", "Ledger", "LocalClient", "MainServer", "Message",
           "NoClientFits", "Replica", "federation", "in_process", "next_indices", "unsplit_step"]


def federation(model, tokenizer, method, clients, train_dataset, cfg, device="cpu", transport=in_process,
               on_lost=None):
    """The main server of a federated method, or the central trainer of a centralised one."""
    if not method.federated:
        return CentralTraining(model, tokenizer, method, clients, train_dataset, cfg, device)
    return MainServer(model, tokenizer, method, clients, train_dataset, cfg, device, transport, on_lost)
