"""kn-steer: find MLP neurons offline and steer them per request in vLLM.

The neuron is one unit of the input of an MLP's output projection (``down_proj`` in gated MLPs,
``act(fc(x))`` in non-gated ones); localization, the transformers reference and the vLLM plugin
all hook exactly that point, located through :mod:`kn_steer.models.sites`.
"""

__version__ = "0.1.0"
