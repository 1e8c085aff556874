"""Simulators of a vLLM server and of the LMCache 0.5.6 controller.

Modules:

- ``sim.chunks``: LMCache-style chained hashes of 256-token chunks.
- ``sim.engine_model``: pure cost/prefix-cache model of one engine (no I/O, no clock),
  usable in virtual time by a discrete-event simulation.
- ``sim.tokenizer``: deterministic tokenizer, chat template and text generator.
- ``sim.engine_server``: FastAPI app speaking vLLM's HTTP API over ``EngineModel``.
- ``sim.controller``: FastAPI app speaking the LMCache controller's HTTP API, with faults.
- ``sim.cluster``: run those apps in threads or subprocesses for tests and demos.

Nothing is imported here so that ``import sim.engine_model`` stays free of web frameworks.
"""
