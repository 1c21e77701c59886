"""data.download's policy: who downloads what, and who waits, before any rank builds its datasets."""

from __future__ import annotations

import os

from dtrain.config import GENERATED_DATASETS, DataConfig
from dtrain.data.builtin import factory_datasets
from dtrain.data.char_text import prepare_shakespeare
from dtrain.data.vision import download_files
from dtrain.runtime.dist import DistState


def fetch_datasets(cfg: DataConfig, seed: int, dist_state: DistState) -> None:
    """Download what data.download asks for: a step every rank takes together (it holds collectives).

    Rank 0 downloads while the others wait, so nobody reads half-written files;
    then the first rank of each other node fetches whatever its node still
    lacks: nothing when data.root is shared storage, its own copy when it is
    node-local.
    """
    if not cfg.download or cfg.name in GENERATED_DATASETS:
        return
    if cfg.name == "tokens":
        folder = os.path.expanduser(cfg.path)
        dist_state.run_on_node_main(lambda: prepare_shakespeare(folder))
        return
    if ":" in cfg.name:
        # A user factory with download=true: built once on each node's first rank
        # before any other rank builds it, so nobody reads what it is still writing.
        def build_first() -> None:
            factory_datasets(cfg, seed)

        dist_state.run_on_node_main(build_first)
        return
    dist_state.run_on_node_main(lambda: download_files(cfg.name, cfg.root))
