"""The engine-neutral half of TALAN inside a serving engine.

What every engine plugin (``talan_serve.plugins.<engine>``) needs and none owns: the step
of the side path over the engine's per-request state pool (``side_path``), the swap of the
decoder layer at a connection point (``decoder``), the ``Talan<Host>`` model mixin and its
lazy class factory (``model``), and what a request runs and which cache namespace that
puts it in (``requests``). Run-time loading goes through
``talan_serve.checkpoint.load_checkpoint``, so an adapter loaded into a running engine is
validated like any other. The host table is ``talan_serve.hosts``.

A plugin keeps only its engine's glue: where the engine keeps the state and the step's
metadata, how its decoder layers hand the residual stream on, how a request's arguments
reach the forward, and the engine-internal names (its ``_compat.py``). docs/design.md
("Adding an engine") lists what a third engine adds.
"""
