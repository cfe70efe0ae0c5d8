"""The papers' evaluations as library code; ``benchmarks/repro_*.py`` only parse arguments, call
these and write tables, JSON and plots.

* :mod:`.ircan` — IRCAN: localize on dev, choose h and beta on held-out dev, report on test against
  unsteered and random controls; cross-dataset transfer; one set over several datasets.
* :mod:`.relation` — relation neurons: cumulativity over N and the full interference matrix.
* :mod:`.knowledge` — knowledge neurons: suppress / enhance against random controls.

Every protocol scores each condition on the same items as the unsteered model (paired tests), uses
random controls of the same size and dose (per-layer ``matched`` and ``uniform``, several seeds) and
caches every result under a key of everything it depends on (:mod:`kn_steer.eval.cache`).
"""
