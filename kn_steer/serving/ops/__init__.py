"""Serving operations: the per-layer math of each kind of intervention, one module each.

An operation owns its per-slot tensors for the layers of this worker and applies them to the
canonical view of its site (:mod:`kn_steer.models.sites`), indexed by the step's token -> slot
map. Today: :mod:`.neuron_mask` (multiply-add masks on MLP neurons).
"""
