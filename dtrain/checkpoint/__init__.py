"""Checkpoints: the on-disk commit protocol (store), where a run starts (rundir), saving and restoring a run
(saving), the Slurm requeue after a signal (slurm). May import `loop` and everything below it."""
