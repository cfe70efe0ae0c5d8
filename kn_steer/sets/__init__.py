"""The neuron-set contract: the file format joining offline localization and serving, and the
registry of sets validated against one model."""

from kn_steer.sets.format import (
           MethodInfo,
           ModelIdentity,
           Neuron,
           NeuronSet,
           Operation,
           Provenance,
           model_identity,
)
from kn_steer.sets.registry import NeuronSetRegistry, default_sets_dir

__all__ = ["MethodInfo", "ModelIdentity", "Neuron", "NeuronSet", "NeuronSetRegistry", "Operation",
           "Provenance", "default_sets_dir", "model_identity"]
