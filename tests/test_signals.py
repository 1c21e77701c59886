"""Signal handling: handlers only set a flag, and what follows (a line, an interruption, an exit code) is the
monitor's or the scope's. Each case runs in a fresh interpreter (no torch), since it signals itself."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, child_env

EXITS = ("exit", "_exit", "abort")
"""sys.exit raises too; os._exit and os.abort end the process from inside the handler."""


def _defs(tree: ast.Module) -> dict[str, list[ast.AST]]:
    defs: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defs.setdefault(node.name, []).append(node)
    return defs


def _handlers(tree: ast.Module) -> list[ast.AST]:
    """The functions given to signal.signal(...) in a module, found by name (a function, or a method
    of a class in the module), and the lambdas given to it."""
    defs = _defs(tree)
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and len(node.args) == 2):
            continue
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "signal"
                and isinstance(func.value, ast.Name) and func.value.id == "signal"):
            continue
        handler = node.args[1]
        if isinstance(handler, ast.Lambda):
            found.append(handler)
        elif isinstance(handler, ast.Name):
            found.extend(defs.get(handler.id, []))
        elif isinstance(handler, ast.Attribute) and isinstance(handler.value, ast.Name) \
                and handler.value.id == "self":
            found.extend(defs.get(handler.attr, []))
    return found


def _misdeeds(handler: ast.AST, defs: dict[str, list[ast.AST]], seen: set[int]) -> list[str]:
    """What `handler` does that a handler must not, following its calls into the same module."""
    if id(handler) in seen:
        return []
    seen.add(id(handler))
    bad: list[str] = []
    for node in ast.walk(handler):
        if isinstance(node, ast.Raise):
            bad.append(f"raises (line {node.lineno})")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name == "print" or (name == "write" and "std" in ast.unparse(func)):
                bad.append(f"prints (line {node.lineno})")
            elif name in EXITS:
                bad.append(f"calls {name} (line {node.lineno})")
            elif isinstance(func, ast.Name) or (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                                                 and func.value.id == "self"):
                for callee in defs.get(name, []):
                    bad.extend(_misdeeds(callee, defs, seen))
    return bad


def test_no_signal_handler_prints_or_raises() -> None:
    """A handler runs between two bytecodes of whatever the main thread does: printing there can land in a
    print already in progress, and raising there can tear a file write or a collective's Python side."""
    handlers_seen = []
    problems = []
    for path in sorted((REPO / "dtrain").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        defs = _defs(tree)
        for handler in _handlers(tree):
            name = getattr(handler, "name", "<lambda>")
            handlers_seen.append(name)
            problems += [f"{path.relative_to(REPO)}: {name} {what}" for what in _misdeeds(handler, defs, set())]
    # The scan finds the handlers it is meant to check (else it would pass on nothing).
    assert {"_flag", "_delayed_exit"} <= set(handlers_seen), handlers_seen
    assert not problems, problems


def test_the_scan_sees_a_handler_that_prints_through_a_helper() -> None:
    tree = ast.parse(textwrap.dedent("""
        import signal, sys
        class C:
            def install(self):
                signal.signal(signal.SIGTERM, self._handle)
            def _handle(self, signum, frame):
                self._say()
            def _say(self):
                print("received", file=sys.stderr)
                raise SystemExit(143)
    """))
    (handler,) = _handlers(tree)
    assert sorted(_misdeeds(handler, _defs(tree), set())) == ["prints (line 9)", "raises (line 10)"]


def _run(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    prelude = "import os, signal, sys, time\nfrom dtrain.runtime import signals\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.multiproc
def test_a_stop_signal_is_said_once_and_only_flagged() -> None:
    res = _run("""
        with signals.StopSignals(["SIGTERM", "SIGUSR1"], grace_s=60) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a second, different signal changes nothing
            time.sleep(0.5)
            print("received", stop.received)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "received SIGUSR1\n"
    assert res.stderr == "dtrain: received SIGUSR1; saving a checkpoint at the next step boundary, then stopping\n"


@pytest.mark.multiproc
def test_the_same_signal_again_later_exits_now_with_its_code() -> None:
    res = _run("""
        signals.REPEAT_MEANS_NOW_S = 0.3
        with signals.StopSignals(["SIGTERM"], grace_s=60):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the same event twice at once: nothing more
            time.sleep(0.6)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(20)  # the repeat wakes this sleep
        print("not reached")
    """)
    assert res.returncode == 128 + 15, res.stderr
    assert "not reached" not in res.stdout
    assert res.stderr.count("received SIGTERM") == 1


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_no_boundary_within_grace_interrupts_a_sleeping_main_thread(name: str) -> None:
    """SIGINT as a stop signal too: the interruption then comes by another signal, which still raises."""
    res = _run(f"""
        try:
            with signals.StopSignals([{name!r}], grace_s=0.5):
                os.kill(os.getpid(), signal.{name})
                time.sleep(20)
        except KeyboardInterrupt:
            print("interrupted")
    """)
    assert res.returncode == 0 and res.stdout == "interrupted\n", res.stderr
    assert f"dtrain: no step boundary reached within 0.5 s of {name} (is a peer gone?); stopping without a " \
           "checkpoint" in res.stderr


@pytest.mark.multiproc
def test_sigterm_while_loggers_are_open_exits_143_after_their_close() -> None:
    res = _run("""
        guard = signals.TerminationGuard()
        guard.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(20)
            exc_type = None
        except BaseException as exc:
            exc_type = type(exc)
        with guard.closing(exc_type):
            print("closed", exc_type.__name__, flush=True)
    """)
    assert res.returncode == 143, res.stderr
    assert res.stdout == "closed KeyboardInterrupt\n"
    assert res.stderr == "dtrain: received SIGTERM; closing the loggers before exiting\n"


@pytest.mark.multiproc
def test_sigterm_during_the_loggers_close_waits_for_it() -> None:
    res = _run("""
        guard = signals.TerminationGuard()
        guard.install()
        with guard.closing(None):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
            print("closed", flush=True)
        print("not reached")
    """)
    assert res.returncode == 143, res.stderr
    assert res.stdout == "closed\n" and res.stderr == ""
