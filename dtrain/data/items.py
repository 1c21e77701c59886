"""A dataset item that fails to load is named: its index and its own error, in one line.

A DataLoader worker hands its exception to the rank as text only: the rank re-raises the original
type with "Caught ValueError in DataLoader worker process 0. Original Traceback ..." and the whole
worker traceback as its message; the index is lost. So the dataset the DataLoader reads is wrapped:
a failing `__getitem__` (or `__getitems__`) raises a `DataItemError` whose message says the index and
the original error, and the worker's text, re-raised as a DataItemError, still holds that message on
its last line.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch.utils.data import Dataset

_SAID = re.compile(r"^(?:[\w.]+\.)?DataItemError: (data items? .*)$", re.MULTILINE)
_CAUSE = "\n\nThe above exception was the direct cause of the following exception:"


class DataItemError(Exception):
    """One message (what DataLoader rebuilds the exception from): in the process that read the item,
    "data item 1234 failed: ValueError: bad image file x.png"; re-raised from a worker, the worker's
    traceback, which ends with that message."""

    @property
    def dtrain_own_line(self) -> str:
        """What the rank's one line says (faults.failure_line): the message, not the worker's traceback."""
        said = _SAID.findall(self.args[0]) if self.args else []
        return said[-1] if said else str(self.args[0] if self.args else "a data item failed")

    @property
    def dtrain_traceback(self) -> Any:
        """The worker's traceback of the original error, printed above the line (faults.report); None in the
        process that read the item, whose own traceback shows it."""
        text = str(self.args[0]) if self.args else ""
        worker = re.match(r"Caught \w+ in (DataLoader worker process \d+)", text)
        start = text.find("Traceback (most recent call last)")
        if worker is None or start < 0:
            return None
        return f"In {worker.group(1)}:\n" + text[start:].split(_CAUSE)[0].rstrip("\n") + "\n"

    def __str__(self) -> str:
        return self.dtrain_own_line


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


class NamedItems(Dataset):
    """`dataset`, whose failing items raise a DataItemError naming them."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> Any:
        try:
            return self.dataset[index]
        except Exception as exc:
            raise DataItemError(f"data item {index} failed: {_said(exc)}") from exc

    def __getattr__(self, name: str) -> Any:
        # Attributes the user's code reads off the DataLoader's dataset (classes, a collate helper).
        if name == "dataset":  # not set yet: unpickling in a spawned worker
            raise AttributeError(name)
        return getattr(self.dataset, name)


class NamedBatchedItems(NamedItems):
    """The same for a dataset with `__getitems__` (the DataLoader then fetches a batch in one call: a
    Subset, a StackDataset, so anything from random_split). When the call fails, the items are read again
    one by one to find the one that fails, and that index and its own error are what is said; only if
    each item loads alone is the batch named."""

    def __getitems__(self, indices: Sequence[Any]) -> Any:
        try:
            return self.dataset.__getitems__(indices)  # type: ignore[attr-defined]
        except Exception as exc:
            batch_error = exc
        for index in indices:
            try:
                self.dataset[index]
            except Exception as exc:
                raise DataItemError(f"data item {index} failed: {_said(exc)}") from exc
        shown = ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")
        raise DataItemError(f"data items [{shown}] ({len(indices)}, one call) failed: "
                            f"{_said(batch_error)}") from batch_error


def named_items(dataset: Dataset) -> Dataset:
    """`dataset` for a DataLoader: a failing item says its index."""
    return NamedBatchedItems(dataset) if getattr(dataset, "__getitems__", None) else NamedItems(dataset)
