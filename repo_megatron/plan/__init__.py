"""Planning a cluster run before it queues: per-GPU memory (``repo-megatron plan``) and the
layout values the SLURM scripts read from a config (``python -m repo_megatron.plan.slurm``)."""
