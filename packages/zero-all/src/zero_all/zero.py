"""DeepSpeed's ``deepspeed.zero`` names: ``Init``, ``GatheredParameters``, ``register_external_parameter``.

``with zero_all.zero.Init(): model = MyModel()`` builds the model with its parameters partitioned as they
are created (so a model larger than one rank's memory can be built); ``initialize()`` with
``zero_optimization.stage: 3`` then trains it. ``GatheredParameters(params, modifier_rank=None)`` gathers
partitioned parameters for reading, or, with a modifier rank, for changing them on that rank. These are
zero-shard's (see docs/zero-shard.md, "Stage 3"); this module only gives them DeepSpeed's import path.
"""

from zero_shard.init import GatheredParameters, Init, register_external_parameter

__all__ = ["GatheredParameters", "Init", "register_external_parameter"]
