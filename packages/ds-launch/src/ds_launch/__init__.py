"""ds-launch: The ds-launch CLI: DeepSpeed-compatible launcher for one node or many (ssh, pdsh, OpenMPI, MPICH, SLURM)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
