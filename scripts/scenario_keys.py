"""Write docs/scenarios.md, the reference of every scenario key, from the schemas themselves
(``neurosim.scenario.SCHEMA``, ``MONITOR_SCHEMA`` and each registered model's schema), so the
reference cannot drift from what ``neurosim validate`` accepts.

    python scripts/scenario_keys.py            # rewrite docs/scenarios.md
    python scripts/scenario_keys.py --check    # exit 1 if it is out of date (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from neurosim import scenario as sc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "scenarios.md"

MEANING = {
    "name": "scenario name (run directories default to `runs/<name>-<time>`)",
    "description": "free text",
    "data.dataset": "which dataset",
    "data.train_limit": "use only the first N training samples",
    "data.test_limit": "use only the first N test samples",
    "data.dir": "folder with the dataset's own files (`--data` sets it)",
    "data.verify": "check the files' checksums (false: structure checks only)",
    "training.epochs": "epochs to train",
    "training.batch_size": "minibatch size (trials are minibatches)",
    "training.lr": "learning rate eta",
    "training.momentum": "SGD momentum in [0, 1)",
    "training.weight_decay": "L2 weight decay inside the momentum step",
    "training.optimizer": "momentum convention: `reference` (PEPITA code: v = m v + lr g; W -= v) "
                          "or `torch` (v = m v + g; W -= lr v)",
    "training.milestones": "epochs after which lr is multiplied by `gamma` (schedule `step`)",
    "training.gamma": "factor of the step schedule",
    "training.schedule": "`step` (milestones/gamma) or `linear_decay` (constant, then linear to "
                         "lr/epochs; Hinton's FF schedule)",
    "training.decay_start": "fraction of the epochs after which `linear_decay` starts",
    "training.train_eval": "also evaluate (no dropout, no plasticity) the first N training "
                           "samples whenever the test set is evaluated (metrics.csv "
                           "`train_accuracy_eval`); 0: off",
    "training.max_weight": "divergence guard: a weight above this stops the run with an error",
    "training.seed": "root seed (weights, F, dropout masks, shuffling)",
    "training.backend": "`numba` (compiled, default) or `numpy` (the reference backend: no "
                        "compilation, slower; docs/engine.md)",
    "training.threads": "threads inside the kernels (docs/engine.md; use on idle cores)",
    "training.eval_every": "evaluate the test set every k epochs (and at the last)",
    "training.keep_checkpoints": "checkpoints kept on disk",
    "training.chunk": "minibatches per compiled call (progress granularity; results do not "
                      "depend on it)",
    "simulation.mode": "`steady` (settled passes) or `time` (Euler steps of tau dr/dt = -r + f)",
    "simulation.dt": "time step (time mode); a number in seconds or a string like \"2 ms\"",
    "simulation.tau": "rate time constant of the non-instantaneous populations",
    "simulation.phase_duration": "duration of each phase (time mode)",
    "simulation.method": "`euler` or `exp_euler` (exact for the leak)",
    "monitor.target": "`pop.r`, `pop.drive`, `proj.w`, `proj.dw`, `proj.norm`, `proj.update_norm`, `angle:F`, "
                      "`angle:B1`, `grad_angle:W1` (angle of the rule's update to the BP "
                      "gradient), or a model's own (FF: `h1.goodness`)",
    "monitor.phase": "phase recorded (rates, drives; FF goodness); default: the first",
    "monitor.every": "record every k steps or trials, or every x epochs (`\"0.1 epoch\"`: "
                     "rounded to whole minibatches once the training-set size is known)",
    "monitor.per": "`step` or `trial` (default: step in time mode for rates, else trial)",
    "monitor.units": "[start, stop) of the units to record",
    "monitor.sample": "batch row recorded, or `mean` over the batch",
    "monitor.name": "key in traces.npz (default: derived from the target)",
    "monitor.synapses": "with `proj.w`/`proj.dw`: only these [post, pre] entries (default: the whole matrix)",
}


def _kind(kind) -> str:
    if isinstance(kind, tuple):
        return " \\| ".join(f"`{k}`" if k is not None else "none" for k in kind)
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    text = {"int+": "integer >= 1", "int0": "integer >= 0", "float+": "number > 0",
            "float0": "number >= 0", "prob": "number in [0, 1)", "mom": "number in [0, 1)",
            "bool": "true / false", "str": "string", "time": "time (s, or \"10 ms\")",
            "list[int]": "list of integers", "pairs": "list of [post, pre] pairs",
            "sample": "integer >= 0 or `mean`",
            "every": "integer >= 1 or \"x epoch\""}.get(kind, kind)
    return text + (", optional" if optional else "")


def _default(v) -> str:
    return "—" if v is None else f"`{v!r}`".replace("'", '"').replace("True", "true") \
        .replace("False", "false")


def render() -> str:
    lines = ["# Scenario keys", "",
             "Every key a scenario file accepts, with its type and default (generated from the "
             "schemas by `python scripts/scenario_keys.py`; `neurosim validate FILE` checks a "
             "file against them and names the key of any error). Any key can be overridden on the "
             "command line: `--set section.key=value`.", ""]

    def table(title, schema, prefix):
        lines.extend([f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"])
        for key, (kind, default) in schema.items():
            meaning = MEANING.get(f"{prefix}{key}", "")
            lines.append(f"| `{key}` | {_kind(kind)} | {_default(default)} | {meaning} |")
        lines.append("")

    top = {k: v for k, v in sc.SCHEMA.items() if not isinstance(v, dict)}
    table("top level", top, "")
    for section, schema in sc.SCHEMA.items():
        if isinstance(schema, dict):
            table(f"[{section}]", schema, f"{section}.")
    table("[[monitor]] (any number)", sc.MONITOR_SCHEMA, "monitor.")
    lines.extend(["## [model]", "",
                  "`name` picks the model; the other keys depend on it (see docs/rules.md, "
                  "docs/theory.md and docs/interop.md for their meaning).", ""])
    for name, (schema, _, _, _) in sorted(sc._models().items()):
        lines.extend([f"### `{name}`", "", "| key | type | default |", "|---|---|---|"])
        for key, (kind, default) in schema.items():
            lines.append(f"| `{key}` | {_kind(kind)} | {_default(default)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/scenario_keys.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
