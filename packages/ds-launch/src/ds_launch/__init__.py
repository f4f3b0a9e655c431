"""ds-launch: the ``ds-launch`` CLI, a DeepSpeed-compatible launcher for one node or many
(ssh, pdsh, OpenMPI, MPICH/MVAPICH, SLURM) with real failure handling.

Library API (the CLI is built from these):

- :func:`ds_launch.hostfile.parse_hostfile`, :func:`ds_launch.hostfile.select_resources`
- :func:`ds_launch.envfile.parse_env_file`, :func:`ds_launch.envfile.collect_exports`
- :func:`ds_launch.runners.build_commands` (command construction per runner)
- :func:`ds_launch.agent.run_node` (one node's workers via torch.distributed.elastic)
- :func:`ds_launch.cli.main` (the command line)
"""

from .cli import main
from .envfile import EnvFileError, parse_env_file
from .hostfile import HostfileError, parse_hostfile, select_resources

__version__ = "0.1.0"

__all__ = [
    "EnvFileError",
    "HostfileError",
    "__version__",
    "main",
    "parse_env_file",
    "parse_hostfile",
    "select_resources",
]
