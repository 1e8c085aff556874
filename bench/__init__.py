"""Routing benchmark: a discrete-event simulation, in virtual time, of a cluster of engines
(``sim.engine_model``) behind a router, comparing the addon's policy (``addon.policy``)
with re-implementations of the field's routers on the standard cache-aware workloads.

Modules:

- ``bench.prompts``: token sequences with their chained hashes computed once.
- ``bench.des``: event loop, engines with batching/queueing, the simulated LMCache controller.
- ``bench.policies``: the routing policies (ours is imported from ``addon.policy``).
- ``bench.workloads``: workload generators and the JSONL trace loader.
- ``bench.report``: tables, plots and JSON.
- ``bench.run``: ``python -m bench.run [--quick] [--out docs]``.
"""
