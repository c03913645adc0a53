"""Command line: ``neurosim run | validate | ...`` (argument parsing and printing only).

Further subcommands live in their own modules and are listed in :data:`EXTRA_COMMANDS`: each
module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from .errors import NeurosimError, ValidationError


EXTRA_COMMANDS = {
    "crosscheck": "neurosim.interop.crosscheck",
    "sweep": "neurosim.sweep",
    "campaign": "neurosim.campaign",
    "report": "neurosim.report",
}


def _extra_modules():
    mods = {}
    for name, path in EXTRA_COMMANDS.items():
        try:
            mods[name] = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name and path.startswith(e.name):  # module not built (yet); others propagate
                continue
            raise
    return mods


def _parser(extra=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neurosim", description="Rate-based simulation of "
                                "forward-only learning (PEPITA, Forward-Forward, FA family).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a scenario (training + evaluation) into a run directory")
    r.add_argument("scenario", nargs="?", help="TOML scenario file")
    r.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    r.add_argument("--data", help="folder holding the dataset's own files (e.g. the four MNIST "
                   "IDX files); default: $NEUROSIM_DATA/<dataset>, then the user cache")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set training.epochs=3 (repeatable)")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last "
                   "checkpoint (uses DIR/scenario.toml)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = sub.add_parser("validate", help="check a scenario (and build its circuit) without running")
    v.add_argument("scenario")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    for name, mod in (extra or {}).items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP))
    return p


def main(argv=None) -> int:
    try:
        extra = _extra_modules()
        args = _parser(extra).parse_args(argv)
        if args.command in extra:
            return extra[args.command].main(args)
        if args.command == "validate":
            return _validate(args)
        return _run(args)
    except NeurosimError as e:
        print(f"neurosim: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output left (| head): nothing to tell it
        try:                 # and no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except OSError as e:    # a file-system failure no command turned into a clearer error
        from .rundir import os_error

        print(f"neurosim: error: {os_error(e, doing='complete the command')}", file=sys.stderr)
        return 2
    except MemoryError:
        print("neurosim: error: the machine ran out of memory. Hint: lower training.batch_size "
              "or the population sizes.", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # the runs say what they kept (KeyboardInterrupt("interrupted; epochs 1-3 are kept..."))
        print(f"neurosim: {str(e) or 'interrupted.'}", file=sys.stderr)
        return 130


def _validate(args) -> int:
    from . import scenario as sc
    from .training import simulator_for

    settings = sc.load(args.scenario, args.overrides)
    if sc.runner_for(settings) is not None and sc.simulator_for(settings) is None:
        sc.build(settings)  # the model's own checks
        print(f"{args.scenario}: OK — model {settings['model']['name']!r}")
        return 0
    sim = simulator_for(settings)
    plan = sim.plan
    print(f"{args.scenario}: OK — model {settings['model']['name']!r}, "
          f"{len(plan.circuit.populations)} populations, {len(plan.circuit.projections)} "
          f"projections, mode {plan.protocol.mode}, {len(plan.train.prog)} instructions per trial, "
          f"arena {plan.init_mem.nbytes / 2**20:.1f} MiB")
    return 0


def _run(args) -> int:
    from . import scenario as sc
    from .rundir import check_inside, safe_name
    from .training import run

    if args.resume:
        out = Path(args.resume)
        if not ((out / "scenario.toml").is_file() and (out / "checkpoints").is_dir()):
            raise ValidationError("--resume", f"{str(out)!r} has no scenario.toml and "
                                  "checkpoints/ folder; it is not a run directory.",
                                  "give the folder a neurosim run wrote (it prints 'run "
                                  "directory: ...').")
        if args.scenario:
            print("neurosim: note: --resume uses the run directory's scenario.toml; the "
                  "scenario argument is ignored.", file=sys.stderr)
        settings = sc.load(out / "scenario.toml", args.overrides)
    else:
        if not args.scenario:
            raise ValidationError("run", "no scenario given.", "neurosim run scenarios/pepita_mnist.toml")
        settings = sc.load(args.scenario, args.overrides)
        if args.out:
            out = Path(args.out)
        else:   # the name is the user's text: one safe path component, inside runs/
            out = Path("runs") / (f"{safe_name(settings['name'], 'run')}-"
                                  f"{time.strftime('%Y%m%d-%H%M%S')}")
            check_inside(out, Path("runs"), "name")
    runner = sc.runner_for(settings) or run
    summary = runner(settings, out, data_dir=args.data, resume=bool(args.resume),
                     progress=not args.no_progress)
    if "final_test_accuracy" not in summary:
        print(f"run directory: {out}")
        return 0
    acc = summary["final_test_accuracy"]
    print(f"run directory: {out}")
    print(f"final test accuracy: {acc:.4f}" if acc is not None else "no evaluation")
    print(f"wall time: {summary['wall_s']:.1f} s, {summary['mean_samples_per_s']:.0f} samples/s")
    return 0


def entry() -> None:
    """The ``neurosim`` console command: :func:`main`, then exit with its code. After Ctrl-C
    (exit code 130; every command has released its folders and written what it keeps by then)
    the process ends at once instead of waiting, often most of a second, for the libraries'
    interpreter teardown, so that Ctrl-C returns the prompt within a second."""
    rc = main()
    if rc == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    entry()
