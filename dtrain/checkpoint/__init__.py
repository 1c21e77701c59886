"""Checkpoints: the on-disk commit protocol, where a run starts (new, resumed, finished), and saving
and restoring a run. May import `loop` and everything below it."""
