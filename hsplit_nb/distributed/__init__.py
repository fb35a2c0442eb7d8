"""Real multi-process split training on torch.distributed: rank 0 is the main server, ranks 1..K are the
clients, each in its own process (one torchrun per participant).

The server runs the same `MainServer` as the simulation, with `RemoteClient` proxies instead of in-process
ones; each client process runs the simulation's `LocalClient` on its own replica. Smashed data goes up and
its gradient comes back point to point; adapter restarts are keyed by a seed both sides know, so restarts
cost no bytes. Central methods (cenlora, ft) have no clients and run on the server.

Modules: wire (tensors and control messages with byte counters), remote (the server's proxy of a client
process), worker (the client process), entry (the torchrun entry point and rank 0), launcher, report.
"""
from .entry import DONE_FILE, PROGRESS_FILE, worker_main
from .launcher import free_port, launch
from .remote import RemoteClient
from .report import compare_runs, wire_bytes, wire_vs_simulated
from .wire import PeerLost, Wire

__all__ = ["DONE_FILE", "PROGRESS_FILE", "PeerLost", "RemoteClient", "Wire", "compare_runs", "free_port", "launch",
           "wire_bytes", "wire_vs_simulated", "worker_main"]
