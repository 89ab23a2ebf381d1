"""Launchers: run a saejax command as processes that form one JAX cluster, on this machine
(`launch.local`), on a Cloud TPU VM or pod slice (`launch.tpu`) or on a SLURM GPU cluster
(`launch.slurm`). They ask saejax to join the cluster through the SAEJAX_* variables listed in
launch/common.py; `--dry_run` prints what the cloud and cluster launchers would do.
"""
