"""`python killer.py <dtrain args>` under torchrun: dtrain, killed with SIGKILL at a chosen point.

DTRAIN_TEST_KILL=backward:N kills the whole job (torchrun and every rank) at rank 0's N-th
backward of this attempt (with K=2, an odd N is inside an accumulation window);
DTRAIN_TEST_KILL=save:N kills it half-way through writing rank 0's N-th checkpoint file;
DTRAIN_TEST_KILL=pointer:N kills it right before rank 0's N-th checkpoints/best.json (checkpoint.monitor);
DTRAIN_TEST_KILL=model:N kills it right before rank 0's N-th model.pt (after the final checkpoint);
DTRAIN_TEST_KILL=shard:N[@R] kills it once rank R (default 0) has written half of its N-th torch.distributed.checkpoint
shard file (.distcp, one per rank per sharded checkpoint), cut there and fsynced: a sharded save caught part-way.
That is `kill -9` of the job at a precise moment, so the test does not depend on timing.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path


def kill_job() -> None:
    agent = os.getppid()  # torchrun
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        children = []
    for pid in [agent, *map(int, children)]:
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    import torch

    import dtrain.checkpoint.store
    import dtrain.loop.precision

    what, _, n = spec.partition(":")
    n, _, rank = n.partition("@")
    target, count = int(n), [0]
    if os.environ.get("RANK", "0") != (rank or "0"):
        return
    if what == "backward":
        original = dtrain.loop.precision.Precision.backward

        def backward(self, loss):  # type: ignore[no-untyped-def]
            count[0] += 1
            if count[0] == target:
                kill_job()
            return original(self, loss)

        dtrain.loop.precision.Precision.backward = backward  # type: ignore[method-assign]
    elif what == "save":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
            # A checkpoint file, not model.pt; torch.save writes it through a HashingWriter (its file is .f).
            is_state = str(getattr(getattr(f, "f", f), "name", "")).endswith("state.pt")
            if is_state:
                count[0] += 1
            if count[0] == target and is_state:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(getattr(f, "f", f).fileno())
                kill_job()
            return real_save(obj, f, *args, **kwargs)

        dtrain.checkpoint.store.torch.save = save  # type: ignore[attr-defined]
    elif what == "shard":
        _cut_shard(target)
    elif what == "model":
        import dtrain.run

        _kill_before(dtrain.run, "write_bytes", "model.pt", target)
    elif what == "pointer":
        import dtrain.callbacks.best

        _kill_before(dtrain.callbacks.best, "write_atomic", "best.json", target)


def _kill_before(module: object, name: str, suffix: str, target: int) -> None:
    """Replace module.name(path, data) so that its target-th write of a file ending in `suffix` kills the job."""
    real, count = getattr(module, name), [0]

    def write(path, data):  # type: ignore[no-untyped-def]
        if str(path).endswith(suffix):
            count[0] += 1
            if count[0] == target:
                kill_job()
        return real(path, data)

    setattr(module, name, write)


def _cut_shard(target: int) -> None:
    """DCP's FileSystemWriter opens each shard file through FileSystem.create_stream; the target-th .distcp this
    rank opens for writing gets every byte DCP writes, then is cut to half its length and fsynced at close."""
    from contextlib import contextmanager

    from torch.distributed.checkpoint import filesystem

    real, count = filesystem.FileSystem.create_stream, [0]

    class CutAtClose(io.FileIO):
        def close(self) -> None:
            if not self.closed:
                self.flush()
                self.truncate(self.tell() // 2)
                os.fsync(self.fileno())
                kill_job()
            super().close()

    @contextmanager
    def create_stream(self, path, mode):  # type: ignore[no-untyped-def]
        if str(path).endswith(".distcp") and "w" in mode:
            count[0] += 1
            if count[0] == target:
                with CutAtClose(str(path), "wb") as stream:
                    yield stream
                return
        with real(self, path, mode) as stream:
            yield stream

    filesystem.FileSystem.create_stream = create_stream  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("DTRAIN_TEST_KILL"):
        install(os.environ["DTRAIN_TEST_KILL"])
    from dtrain.__main__ import main

    sys.exit(main(sys.argv[1:]))
