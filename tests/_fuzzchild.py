"""Child processes of the run-directory fuzz (tests/test_fuzz_rundir.py).

The fuzz starts many short-lived ``neurosim`` processes; importing neurosim and loading its
compiled kernels takes a second or more per process, so they are forked from a small fork
server (:func:`serve`, one process that imported this module and warmed the kernels once).
Each child redirects its output to a log file and runs one command exactly as the console does
(:func:`neurosim.cli.main`), or what a sweep worker runs (:func:`neurosim.sweep.run_one`).

The server speaks JSON lines on stdin/stdout: ``{"op": "start", "id", "kind", "argv",
"log"}`` forks a child; ``{"op": "kill", "id", "sig"}`` signals it if it has not been reaped
yet (so a recycled PID is never hit); every child's end is reported as ``{"id", "exit"}``
(the exit code, or minus the signal that ended it); ``{"op": "quit"}`` or EOF ends the server.

Plots are replaced by a fixed PNG written through the same atomic writer (rendering one takes
~0.4 s, 90 % of a tiny run); everything else (locks, checkpoints, outputs, clean-up) is the
real code.
"""

from __future__ import annotations

import json
import os
import sys

from _tinyrun import TINY_SCENARIO
from neurosim import report, rundir, sweep, training
from neurosim import scenario as sc
from neurosim.cli import main

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def _fast_plots() -> None:
    training._plot = lambda out, metrics, settings: training._atomic_write_bytes(
        out / "learning_curve.png", PNG)

    def plot(path, *a, **k):
        rundir.atomic_write_bytes(path, PNG, unique=True)
        return path

    for name in ("plot_learning", "plot_scalar_series", "plot_traces", "plot_final"):
        setattr(report, name, plot)


def warm(scenario_text: str) -> None:
    """Load the compiled kernels and every lazily imported module of a run and a report (in
    the fork server, once), so that each child starts warm."""
    import tempfile
    from pathlib import Path

    from _tinyrun import make_mnist_like

    _fast_plots()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.toml"
        path.write_text(scenario_text)
        data = make_mnist_like(Path(d) / "data", n_train=64, n_test=32)
        training.run(sc.load(path), Path(d) / "run", data_dir=data, progress=False,
                     log=lambda *a, **k: None)
        report.report(Path(d) / "run")
    from neurosim import cli

    cli._extra_modules()          # the subcommands' modules (brian2 for crosscheck)


def child(kind: str, argv: list, log: str) -> None:
    """Run one fuzz operation with stdout and stderr in ``log``; the exit code is the CLI's."""
    rc = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
        _fast_plots()
        if kind == "worker":
            settings_path, run_dir, data = argv
            res = sweep.run_one(sc.load(settings_path), run_dir, data)
            print("WORKER " + json.dumps({k: res[k] for k in ("status", "error")}))
            rc = 0
        else:
            rc = main(argv)
    except BaseException:        # reported in the log, where the test finds "Traceback"
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(rc)


def serve() -> None:
    import select

    children = {}          # pid -> id, until reaped

    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    buf = b""
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.005)
        if ready:
            chunk = os.read(stdin, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                if req["op"] == "quit":
                    return
                if req["op"] == "start":
                    pid = os.fork()
                    if pid == 0:
                        child(req["kind"], req["argv"], req["log"])
                    children[pid] = req["id"]
                    reply({"id": req["id"], "pid": pid})
                elif req["op"] == "kill":
                    for pid, i in children.items():
                        if i == req["id"]:
                            os.kill(pid, req["sig"])
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            reply({"id": children.pop(pid), "exit": code})


if __name__ == "__main__":
    warm(TINY_SCENARIO.format(epochs=3))
    serve()
