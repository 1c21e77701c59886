"""Faults end the job in seconds with one line per rank that names the rank, the step and why.

Real 2-rank jobs: a rank killed with SIGKILL, a rank that raises, a rank that stalls past
dist.timeout_s, a SIGTERM while a rank waits in a collective for a stalled peer, a peer that
never starts, a port already taken. The expectations are written here: which rank, which step
(the worker model acts at a known forward call), and how long the job may take.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

from dtrain.runtime.faults import failure_line
from helpers import REPO, child_env, dtrain, free_port, srun_like

pytestmark = pytest.mark.multiproc

# 2 ranks x 128 samples in batches of 16: 8 steps an epoch; the worker acts on its 3rd training forward.
ARGS = ["data.name=synthetic", "data.train_size=256", "data.batch_size=16", "train.epochs=2", "log.progress=none",
        "model.name=tests.workers.stalling_model:build"]


def _dtrain_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("dtrain: error")]


def _report_root_cause(stderr: str) -> str:
    """The `traceback :` line of torchrun's "Root Cause" section: the last thing its report says."""
    tail = stderr[stderr.rindex("Root Cause"):]
    return [ln for ln in tail.splitlines() if ln.strip().startswith("traceback :")][0]


def test_a_killed_rank_ends_the_job_and_the_survivor_says_so_in_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    res = dtrain(2, [*ARGS, f"output_dir={tmp_path}/run"], env={"DTRAIN_TEST_DIE": "1"}, check=False, timeout=120)
    took = time.monotonic() - started
    assert res.returncode != 0
    (line,) = _dtrain_lines(res.stderr)
    assert line.startswith("dtrain: error: rank 0 in step 3: lost contact with the other ranks (rank 1:"), line
    assert "no heartbeat" in line and "[rank0]" not in res.stderr and "pair.cc" not in line
    assert "Signal 9 (SIGKILL)" in _report_root_cause(res.stderr)  # torchrun's report ends naming rank 1's death
    print(f"kill -9 of rank 1: job over {took:.1f} s after launch")


def test_under_srun_a_killed_rank_is_one_line_from_the_survivor(tmp_path: Path) -> None:
    """srun starts the ranks itself (no torchrun to SIGTERM the others): the survivor ends on its own."""
    started = time.monotonic()
    results = srun_like(2, [*ARGS, f"output_dir={tmp_path}/run"], env={"DTRAIN_TEST_DIE": "1"}, timeout=120)
    took = time.monotonic() - started
    assert results[1].returncode == -signal.SIGKILL
    assert results[0].returncode == 1
    (line,) = _dtrain_lines(results[0].stderr)
    assert line.startswith("dtrain: error: rank 0 in step 3: lost contact with the other ranks (rank 1:"), line
    assert "no heartbeat" in line and "Traceback" not in results[0].stderr, results[0].stderr
    print(f"srun, kill -9 of rank 1: rank 0 out {took:.1f} s after launch")


def test_a_rank_that_raises_keeps_its_traceback_and_the_report_ends_with_dtrains_line(tmp_path: Path) -> None:
    res = dtrain(2, ["data.name=synthetic", "data.train_size=256", "data.batch_size=16", "log.progress=none",
                     "model.name=tests.workers.failing_model:build", f"output_dir={tmp_path}/run"],
                 env={"DTRAIN_TEST_FAIL_RANK": "1", "DTRAIN_TEST_FAIL_AT_FORWARD": "5"}, check=False, timeout=120)
    assert res.returncode != 0
    # Forward call 1 is set-up's first-batch check (dtrain/loop/preflight.py); call 5 is step 4's.
    failed = "dtrain: error: rank 1 in step 4 failed: RuntimeError: failing_model: deliberate failure on forward call 5"
    assert failed in _dtrain_lines(res.stderr), res.stderr
    assert failed in _report_root_cause(res.stderr)  # the last line a user reads
    # The user's bug keeps its traceback (once); the survivor prints one line and no gloo traceback.
    assert res.stderr.count("raise RuntimeError(f\"failing_model") == 1
    survivor = [ln for ln in _dtrain_lines(res.stderr) if "rank 0" in ln]
    assert len(survivor) <= 1 and "[rank0]: Traceback" not in res.stderr


def test_a_stalled_rank_is_named_after_dist_timeout_s(tmp_path: Path) -> None:
    started = time.monotonic()
    res = dtrain(2, [*ARGS, "dist.timeout_s=4", f"output_dir={tmp_path}/run"], env={"DTRAIN_TEST_STALL_S": "60"},
                 check=False, timeout=120)
    took = time.monotonic() - started
    assert res.returncode != 0
    (line,) = [ln for ln in _dtrain_lines(res.stderr) if "rank 0" in ln]
    assert line.startswith("dtrain: error: rank 0 in step 3: a collective waited dist.timeout_s=4 s"), line
    assert "rank 1: last heard of at step 2, alive but not in the collective" in line
    # Rank 1, still asleep when torchrun stops it, learns from the store that no boundary will come
    # and does not wait out checkpoint.stop_grace_s (20 s).
    assert "rank 0 gave up waiting in a collective, so no step boundary will come" in res.stderr
    assert took < 45, f"{took:.0f} s: the stalled rank waited for its grace period"
    print(f"stall past dist.timeout_s=4: job over {took:.1f} s after launch")


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dtrain", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@contextmanager
def _killed_at_exit(proc: subprocess.Popen) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end and proc.poll() is None, f"never saw {path}"
        time.sleep(0.05)


def _sigterm_rank0(proc: subprocess.Popen, pids: Path) -> tuple[str, float]:
    """SIGTERM to rank 0 alone; the job's stderr and the seconds from the signal to the job's end."""
    sent = time.monotonic()
    os.kill(int((pids / "pid_rank0.txt").read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return err, time.monotonic() - sent


def test_sigterm_while_waiting_in_a_collective_for_a_stalled_peer_ends_the_job_in_seconds(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _start([*ARGS, "dist.timeout_s=300", f"output_dir={tmp_path}/run"],
                  {"DTRAIN_TEST_STALL_S": "120", "DTRAIN_TEST_PID_DIR": str(pids)})
    with _killed_at_exit(proc):
        # Rank 1 sleeps in its 3rd forward; rank 0 is then inside the step's all-reduce. Wait for that.
        _wait_for(tmp_path / "run" / "metrics.jsonl", proc)
        time.sleep(3)
        err, took = _sigterm_rank0(proc, pids)
    assert proc.returncode != 0
    assert "dtrain: rank 0: SIGTERM arrived 5 s ago while this rank waited inside a collective" in err, err
    assert took < 15, f"{took:.1f} s from SIGTERM to the end of the job"
    print(f"SIGTERM to a rank blocked in a collective: job over {took:.1f} s later")


def _by_hand(rank: int, port: int, out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    env = child_env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    return subprocess.run([sys.executable, "-m", "dtrain", "data.name=synthetic", f"output_dir={out}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_a_peer_that_never_comes_is_named_after_dist_start_timeout_s(tmp_path: Path) -> None:
    started = time.monotonic()
    res = _by_hand(0, free_port(), tmp_path / "run", ["dist.start_timeout_s=2"])
    assert res.returncode == 2
    assert res.stderr.strip() == ("dtrain: error: only 1 of 2 ranks arrived within dist.start_timeout_s=2 s; missing: "
                                  "rank 1 (WORLD_SIZE=2: start every rank, or raise dist.start_timeout_s if they start "
                                  "late)")
    assert time.monotonic() - started < 30


def test_a_rank_that_cannot_reach_rank_0_says_where_it_looked(tmp_path: Path) -> None:
    port = free_port()
    res = _by_hand(1, port, tmp_path / "run", ["dist.start_timeout_s=2"])
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()  # no C++ retry logs
    assert line.startswith("dtrain: error (rank 1): could not reach rank 0 at MASTER_ADDR:MASTER_PORT "
                           f"127.0.0.1:{port} within dist.start_timeout_s=2 s"), line


def test_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _by_hand(0, port, tmp_path / "run", ["dist.start_timeout_s=2"])
    assert res.returncode == 2
    assert res.stderr.strip() == (f"dtrain: error: rank 0 cannot listen on MASTER_PORT 127.0.0.1:"
                                  f"{port}: the port is in use (another job on this node?); choose a "
                                  "free MASTER_PORT")


def test_failure_line_names_step_and_peers_without_library_boilerplate() -> None:
    exc = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                       "[127.0.0.1]:54450. This is typically caused by a remote worker crashing. GLHF!")
    exc.dtrain_where = "step 7"  # type: ignore[attr-defined]
    exc.dtrain_blame = {3: "last heard of at step 6, no heartbeat: died"}  # type: ignore[attr-defined]
    assert failure_line(exc, "0") == ("rank 0 in step 7: lost contact with the other ranks (rank 3: last heard of at "
                                      "step 6, no heartbeat: died) [Connection closed by peer [127.0.0.1]:54450]; the "
                                      "failed rank's own message, or the launcher's report, says why")
    assert failure_line(ValueError("bad\nvalue"), "2") == "rank 2 failed: ValueError: bad value"
    # gloo's word when its own timeout closes the connection (seen under load in place of "Timed out waiting").
    closed = RuntimeError("Application timeout caused pair closure")
    assert failure_line(closed, "0", 5).startswith("rank 0: a collective waited dist.timeout_s=5 s for the other ranks")


@pytest.mark.parametrize("key, said", [
    ("model.name=tests.workers.nothere:build", "config key 'model.name' has value 'tests.workers.nothere:build'; "
     "cannot import 'tests.workers.nothere': No module named 'tests.workers.nothere'"),  # agreed in set-up
    ("dist.backend=nccl", "config key 'dist.backend' has value 'nccl'; allowed: gloo | auto on CPU (NCCL needs "
     "CUDA)"),  # before any process group: no agreement to mark it
])
def test_an_error_every_rank_sees_is_printed_once(tmp_path: Path, key: str, said: str) -> None:
    import torch

    if key == "dist.backend=nccl" and torch.cuda.is_available():
        pytest.skip("NCCL is allowed where CUDA is")
    res = dtrain(2, ["data.name=synthetic", key, f"output_dir={tmp_path}/run"], check=False, timeout=120)
    assert res.returncode != 0
    assert _dtrain_lines(res.stderr) == [f"dtrain: error: {said}"], res.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_sigterm_during_a_long_checkpoint_save_still_saves_and_stops(tmp_path: Path) -> None:
    """Rank 0 writes a checkpoint for 10 s while rank 1 waits in its collectives: not "blocked"."""
    pids = tmp_path / "pids"
    pids.mkdir()
    # 20 epochs of 8 steps of 20 ms: the stop, agreed within two rounds (~0.4 s of training), comes long
    # before the end.
    proc = _start(["data.name=synthetic", "data.train_size=256", "data.batch_size=16", "log.progress=none",
                   "train.epochs=20", "checkpoint.every_steps=5", "model.name=tests.workers.slow_save_model:build",
                   f"output_dir={tmp_path}/run"], {"DTRAIN_TEST_PID_DIR": str(pids), "DTRAIN_TEST_SLOW_SAVE_S": "10"})
    with _killed_at_exit(proc):
        _wait_for(pids / "saving", proc)
        time.sleep(1)
        for rank in (0, 1):
            os.kill(int((pids / f"pid_rank{rank}.txt").read_text()), signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out and "while this rank waited inside" not in err, err
    from dtrain.checkpoint import store as checkpoint

    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
    assert stopped_at > 5 and [c.step for c in checkpoint.committed(str(tmp_path / "run"))][-1] == stopped_at


def test_a_rank_that_gave_up_but_is_stuck_in_a_collective_still_exits(tmp_path: Path) -> None:
    """SIGTERM lands while rank 0 runs Python (its handler runs), then rank 0 waits in a collective for
    rank 1, asleep for 120 s: after checkpoint.stop_grace_s its KeyboardInterrupt cannot land there."""
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _start([*ARGS, "dist.timeout_s=300", "checkpoint.stop_grace_s=2", f"output_dir={tmp_path}/run"],
                  {"DTRAIN_TEST_STALL_S": "120", "DTRAIN_TEST_PAUSE_RANK0_S": "2", "DTRAIN_TEST_PID_DIR": str(pids)})
    with _killed_at_exit(proc):
        _wait_for(pids / "paused_rank0", proc)
        err, took = _sigterm_rank0(proc, pids)
    assert "no step boundary reached within 2 s of SIGTERM" in err, err
    assert "s after giving up, this rank is still inside a collective" in err, err
    assert took < 20, f"{took:.1f} s"


def test_a_forked_child_signalled_does_not_stop_its_parent(tmp_path: Path) -> None:
    """A child forked while StopSignals is active (a DataLoader worker, a user's Pool) that gets a
    SIGTERM must not look like one to the parent's monitor."""
    code = textwrap.dedent("""
        import multiprocessing as mp, os, signal, sys, time
        from dtrain.runtime.signals import BLOCKED_S, StopSignals

        def child():
            signal.signal(signal.SIGTERM, lambda *a: None)  # a Python handler, as DataLoader workers have
            time.sleep(30)

        with StopSignals(["SIGTERM"], grace_s=60):
            p = mp.get_context("fork").Process(target=child)
            p.start()
            time.sleep(0.5)
            os.kill(p.pid, signal.SIGTERM)
            time.sleep(BLOCKED_S + 2)
            p.kill()
        print("parent alive")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "parent alive" in res.stdout, res.stderr


def test_the_peer_watch_lets_go_of_the_store() -> None:
    """Rank 0's store server must not outlive a run: a second run in the process binds the port again."""
    import datetime

    import torch.distributed as dist

    from dtrain.runtime.peers import PeerWatch

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=5))
    watch = PeerWatch(store, 0, 1, interval_s=0.05)
    time.sleep(0.2)
    assert watch._get("dtrain/beat/0") is not None  # it published
    watch.close()
    del store
    import gc

    gc.collect()
    again = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=5))  # the port is free
    again.set("x", "1")


def _silence(watch: object) -> None:
    """A rank killed or frozen: its heartbeat thread stops without a word (not even that it is done)."""
    watch.store = None  # type: ignore[attr-defined]
    watch._stop.set()  # type: ignore[attr-defined]
    watch._thread.join()  # type: ignore[attr-defined]


def test_the_peer_watch_blames_the_dead_and_the_stalled_peer() -> None:
    """Four watches on one real store, as four ranks would be: rank 1 stops beating (dead), rank 2 beats but
    never reaches the collective, rank 3 waits in it as rank 0 does; after the timeout rank 0 blames 1 and 2."""
    import datetime
    import threading

    import torch.distributed as dist

    from dtrain.runtime.peers import PeerWatch

    store = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=datetime.timedelta(seconds=5))
    watches = [PeerWatch(store, r, 4, interval_s=0.05) for r in range(4)]
    for r, w in enumerate(watches):
        w.step_of = lambda r=r: 10 + r
    time.sleep(0.3)
    _silence(watches[1])  # killed: its last beat and step stay in the store
    rank3 = threading.Thread(target=watches[3].diagnose, args=(True,))
    rank3.start()
    blame = watches[0].diagnose(True)
    rank3.join()
    assert blame == {1: "last heard of at step 11, no heartbeat: died, was killed or is frozen",
                     2: "last heard of at step 12, alive but not in the collective: stalled in its own work"}
    assert watches[0].diagnose(False) == {1: "last heard of at step 11, no heartbeat: died, was killed or is frozen"}
    for w in watches:
        w.close()


@pytest.mark.parametrize("when, where", [("eval", "the eval of epoch 2"), ("save", "the checkpoint at step 6"),
                                         ("step", "step 4"), ("final save", "the final checkpoint at step 9"),
                                         ("log", "the log record of step 2"), ("epoch end", "the end of epoch 3"),
                                         ("final check", "the final check after step 9")])
def test_a_failure_names_what_the_loop_was_doing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str,
                                                 where: str) -> None:
    """3 steps an epoch, a checkpoint every 3: a failure in the second eval, in the checkpoint after step 6,
    or in step 4's forward is said to be there, not in the step that comes next."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import dtrain
    from dtrain.checkpoint import saving

    calls = {"metric": 0, "forward": 0}

    def metric(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["metric"] += 1
        if when == "eval" and calls["metric"] == 2:  # one eval batch an epoch
            raise ValueError("metric broke")
        return (out.argmax(1) == y).float()

    class Model(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls["forward"] += 1
            # call 1: the set-up check; 2-4: steps 1-3; 5: epoch 1's eval; 6: step 4
            if when == "step" and calls["forward"] == 6:
                raise ValueError("forward broke")
            return super().forward(x)

    if when in ("save", "final save"):
        real_save = saving.Checkpointer.save
        at = 6 if when == "save" else 9

        def save(self, state, meter):  # type: ignore[no-untyped-def]
            if state.step == at:
                raise OSError("disk gone")
            return real_save(self, state, meter)

        monkeypatch.setattr(saving.Checkpointer, "save", save)
    if when in ("log", "epoch end", "final check"):
        from dtrain.loop.meters import Meter

        real_take, takes = Meter._take, {"n": 0}
        # Meter._take: row 0 at each log record (every 2 steps, then the end), row 1 at each epoch's end;
        # the final check settles the lagged agreement, then all-reduces the non-finite flags.
        if when == "final check":
            from dtrain.runtime.agreement import LaggedAgreement

            def settle(self):  # type: ignore[no-untyped-def]
                if takes["n"] >= 3:  # after epoch 3's take
                    raise RuntimeError("gloo: connection closed by peer")

            monkeypatch.setattr(LaggedAgreement, "settle", settle)

        def take(self, row, *args, **kwargs):  # type: ignore[no-untyped-def]
            if row == 1:
                takes["n"] += 1
            if (when == "log" and row == 0) or (when == "epoch end" and row == 1 and takes["n"] == 3):
                raise RuntimeError("gloo: connection closed by peer")
            return real_take(self, row, *args, **kwargs)

        monkeypatch.setattr(Meter, "_take", take)
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    raised = {"eval": (ValueError, "metric broke"), "step": (ValueError, "forward broke"),
              "save": (OSError, "disk gone"), "final save": (OSError, "disk gone")}.get(
                  when, (RuntimeError, "connection closed by peer"))
    with pytest.raises(raised[0], match=raised[1]) as info:
        dtrain.train(model=Model(4, 2), train_data=TensorDataset(x[:36], y[:36]),
                     eval_data=TensorDataset(x[36:], y[36:]), loss="cross_entropy", metrics={"acc": metric},
                     overrides=["train.epochs=3", "data.batch_size=12", "checkpoint.every_steps=3",
                                "log.every_steps=2", "log.progress=none", f"output_dir={tmp_path}"])
    assert getattr(info.value, "dtrain_where") == where


def test_only_a_stopped_silent_peer_is_frozen_not_one_that_is_finishing_or_running() -> None:
    """Four watches on one real store, ranks 1-3 standing for real processes on this host: rank 1 failed and
    is on its way out (said done, process alive), rank 2 is SIGSTOPped, rank 3 is silent but asleep. Only rank 2
    is frozen and ended; rank 1 is not blamed as frozen, rank 3 is named and left to the launcher."""
    import datetime

    import torch.distributed as dist

    from dtrain.runtime import localproc
    from dtrain.runtime.peers import PROCESS, PeerWatch

    store = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=datetime.timedelta(seconds=5))
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        watches = [PeerWatch(store, r, 4, interval_s=0.05) for r in range(4)]
        for r, w in enumerate(watches):
            w.step_of = lambda r=r: 10 + r
        time.sleep(0.3)
        for r, child in enumerate(children, start=1):
            store.set(f"{PROCESS}/{r}", f"{localproc._machine()} {child.pid} {localproc._stat(child.pid)[1]}")
        watches[1].tell_failure(ValueError("its own failure"))
        watches[1].close()
        for r in (2, 3):  # silent without a word, as a frozen process is
            _silence(watches[r])
        os.kill(children[1].pid, signal.SIGSTOP)
        time.sleep(0.1)
        blame, frozen = watches[0].examine(False)
        assert blame == {
            1: "last heard of at step 11: it failed or stopped on its own, its own line says why",
            2: f"last heard of at step 12, no heartbeat: frozen, its process {children[1].pid} on this host is "
               "stopped (SIGSTOP?); ended with SIGKILL",
            3: f"last heard of at step 13, no heartbeat: its process {children[2].pid} on this host is asleep (hung "
               "in native code?); left to the launcher"}
        assert [p.pid for p in frozen] == [children[1].pid]
        assert localproc.kill(frozen[0])
        assert children[1].wait(timeout=10) == -signal.SIGKILL
        assert children[0].poll() is None and children[2].poll() is None
        os.kill(children[2].pid, signal.SIGCONT)
        assert not localproc.kill(localproc.find(f"{localproc._machine()} {children[2].pid} "
                                                 f"{localproc._stat(children[2].pid)[1]}"))  # not stopped: spared
        assert children[2].poll() is None
        for w in watches:
            w.close()
    finally:
        for child in children:
            child.kill()
            child.wait()


@pytest.mark.multiproc
def test_a_frozen_peer_is_ended_after_a_scripts_traceback_too(tmp_path: Path) -> None:
    """dtrain.train() in a script raises into the script: nothing of dtrain's reports it, yet the frozen peer
    the failure named (a real SIGSTOPped process on this host) is ended once Python has printed the traceback."""
    frozen = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(frozen.pid, signal.SIGSTOP)
        code = textwrap.dedent(f"""
            import datetime, time
            import torch.distributed as dist
            from dtrain.runtime import localproc
            from dtrain.runtime.peers import PROCESS, PeerWatch
            store = dist.TCPStore("127.0.0.1", {free_port()}, 1, True, timeout=datetime.timedelta(seconds=5))
            watches = [PeerWatch(store, r, 2, interval_s=0.05) for r in range(2)]
            time.sleep(0.3)
            watches[1].store = None  # silent without a word, as a frozen process is
            watches[1]._stop.set()
            watches[1]._thread.join()
            store.set(f"{{PROCESS}}/1", f"{{localproc._machine()}} {frozen.pid} {{localproc._stat({frozen.pid})[1]}}")
            exc = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv")
            watches[0].tell_failure(exc)
            print(exc.dtrain_blame[1], flush=True)
            raise exc
            """)
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 1 and res.stderr.rstrip().endswith("Timed out waiting 5000ms for recv"), res.stderr
        assert res.stdout.startswith("last heard of at step 0, no heartbeat: frozen, its process "
                                     f"{frozen.pid} on this host is stopped"), res.stdout
        assert frozen.wait(timeout=10) == -signal.SIGKILL
    finally:
        frozen.kill()
        frozen.wait()


@pytest.mark.parametrize("env, says", [
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, "dtrain: error: "),
    ({"RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0"}, None),  # rank 0's node: rank 0 says it
    ({"RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, "dtrain: error (rank 2): "),  # another node's first
    ({"RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1"}, None),
    ({"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"}, "dtrain: error (rank 2): "),
])
def test_a_device_error_before_the_group_is_said_once_per_node(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str],
                                                              env: dict[str, str], says: Optional[str]) -> None:
    """One node of a job may lack CUDA: its ranks cannot learn what rank 0 saw, so its first rank says it; a
    config error that is the same everywhere stays rank 0's alone."""
    from dtrain.cli import guarded
    from dtrain.errors import ConfigError
    from dtrain.runtime.dist import distributed
    from dtrain.runtime.env import LaunchInfo

    for key in ("RANK", "LOCAL_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
                "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def run() -> None:
        with distributed(LaunchInfo("env", 2, 0, 4, "127.0.0.1", 1), backend="nccl", device="cpu"):
            pass

    assert guarded("dtrain", [], run) == 2
    said = "config key 'dist.backend' has value 'nccl'; allowed: gloo | auto on CPU (NCCL needs CUDA)\n"
    assert capsys.readouterr().err == ("" if says is None else says + said)

    def everywhere() -> None:
        raise ConfigError("train.epochs", 0, "an integer >= 1")

    assert guarded("dtrain", [], everywhere) == 2
    assert bool(capsys.readouterr().err) == (env.get("RANK") == "0")
