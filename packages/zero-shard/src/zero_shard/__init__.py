"""zero-shard: ZeRO stages 1, 2 and 3: partitioned optimizer states, gradients and parameters over torch.distributed.

Public API: :class:`ZeroConfig` (the ``zero_optimization`` section), :class:`ZeroShardedOptimizer`
(stages 0, 1, 2, 3), :class:`Init` / :func:`GatheredParameters` / :func:`register_external_parameter`
(stage 3, DeepSpeed's ``deepspeed.zero`` names), :func:`default_optimizer_factory`, :func:`consolidate` (full fp32 parameters from
sharded checkpoint state) and :class:`CollectiveChoice` (which collectives move gradients/parameters).
"""

# Fails here, with what to install, when ds-native is missing or built for another ABI.
from zero_shard import _native  # noqa: F401  # isort: skip


from zero_shard.checkpoint_state import consolidate
from zero_shard.comm import CollectiveChoice, choose_collectives
from zero_shard.config import ZeroConfig
from zero_shard.init import GatheredParameters, Init, register_external_parameter
from zero_shard.optimizer import ZeroShardedOptimizer, default_optimizer_factory

__version__ = "0.1.0"

__all__ = [
    "CollectiveChoice",
    "GatheredParameters",
    "Init",
    "ZeroConfig",
    "ZeroShardedOptimizer",
    "__version__",
    "choose_collectives",
    "consolidate",
    "default_optimizer_factory",
    "register_external_parameter",
]
