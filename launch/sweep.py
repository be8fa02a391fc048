"""Sweeps of gin bindings: one run per trial, stable work directories, a summary table.

  python -m launch.sweep --gin_file=configs/experiment/demo.gin --root=/tmp/sweeps \
      --sweep='train.learning_rate=1e-3,3e-4' --sweep='model.num_layers=2,4' \
      [--sweep_mode=product|zip] [--trial_hosts=2 --trial_devices_per_host=2] [-- train flags]

Trials: the product (default) or the zip of the --sweep lists. Each runs `launch.train` (or
`launch.local` with --trial_hosts > 1) with the sweep's gin files and bindings plus its own
overrides, in `<root>/<experiment>/<slug>-<hash of overrides>/` (experiment: --experiment or
the last gin file's name), with a `trial.json` describing it. Every binding of every trial and
every train flag after `--` is validated before the first trial starts. Re-running the same
sweep skips finished trials and resumes unfinished ones from their checkpoints. At the end a
table of final metrics per trial is printed and written to `<root>/<experiment>/summary.csv`.
Values are gin literals; commas inside (), [] or quotes do not split them.
"""

import copy
import csv
import hashlib
import io
import itertools
import json
import os
import re
import subprocess
import sys

from absl import app, flags

import launch.train as train_main
from launch import cli
from launch import config as gin_config
from research.checkpoint import CheckpointConfig
from research.data import DataConfig
from research.errors import UserError
from research.model import ModelConfig
from research.train import TrainConfig

SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "A swept gin binding 'name=value1,value2,...'; repeatable."
)
SWEEP_MODE = flags.DEFINE_enum(
    "sweep_mode", "product", ["product", "zip"], "Cross every list, or pair them up in order."
)
ROOT_DIR = flags.DEFINE_string("root", None, "Sweep root: trials go to <root>/<experiment>/.")
EXPERIMENT = flags.DEFINE_string(
    "experiment", None, "Experiment name (a directory under --root); default: last gin file."
)
BACKEND = flags.DEFINE_enum("backend", "local", ["local", "pod"], "Where trials run.")
# Named apart from launch.local's --num_hosts / --devices_per_host: both modules are imported
# into one process by tests and tools, and absl flags are global.
SWEEP_HOSTS = flags.DEFINE_integer(
    "trial_hosts", 1, "Processes per trial; > 1 runs each trial through launch.local."
)
SWEEP_DEVICES = flags.DEFINE_integer(
    "trial_devices_per_host", 1, "CPU devices per process (with --trial_hosts > 1)."
)
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate, print each trial's command, run none.")

SUMMARY_FIELDS = ("step", "loss", "val_loss", "test_loss")
# Flags the sweep sets itself for each trial.
_RESERVED_FLAGS = ("workdir", "gin_file", "gin_bindings")


def split_values(text: str) -> list[str]:
    """'1e-3,(2, 1),"a,b"' -> ['1e-3', '(2, 1)', '"a,b"']: commas at depth 0 split."""
    values, current, depth, quote = [], "", 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def parse_sweeps(specs) -> list[tuple[str, list[str]]]:
    """--sweep values -> [(gin name, [values])], with clear errors."""
    parsed = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*\.\w+", name):
            raise UserError(
                f"--sweep={spec!r} must look like 'train.learning_rate=1e-3,3e-4' (a gin "
                "name such as model.*, data.*, train.* or checkpoint.*, '=', comma-separated "
                "values)."
            )
        items = split_values(values)
        if not all(items):
            raise UserError(f"--sweep={spec!r} has an empty value; list values like 'a=1,2'.")
        if name in {n for n, _ in parsed}:
            raise UserError(f"--sweep sets {name} twice; give each name once.")
        parsed.append((name, items))
    return parsed


def expand(sweeps, mode: str = "product") -> list[dict]:
    """[(name, values)] -> one {name: value} per trial, in a stable order."""
    if not sweeps:
        return [{}]
    names = [name for name, _ in sweeps]
    lists = [values for _, values in sweeps]
    if mode == "zip":
        lengths = {name: len(values) for name, values in sweeps}
        if len(set(lengths.values())) > 1:
            raise UserError(
                f"--sweep_mode=zip needs lists of equal length, got {lengths}; make them equal "
                "or use --sweep_mode=product."
            )
        combos = zip(*lists, strict=True)
    else:
        combos = itertools.product(*lists)
    return [dict(zip(names, combo, strict=True)) for combo in combos]


def trial_dirname(overrides: dict) -> str:
    """A readable slug of the overrides plus a hash of them: stable across re-runs."""
    digest = hashlib.sha1(json.dumps(sorted(overrides.items())).encode()).hexdigest()[:8]
    parts = [f"{name.rsplit('.', 1)[-1]}_{value}" for name, value in overrides.items()]
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "", "__".join(parts))[:80] or "base"
    return f"{slug}-{digest}"


def validate_bindings(gin_files, gin_bindings, trials) -> None:
    """Every trial's gin config parses and builds, before any trial starts."""
    for overrides in trials:
        bindings = list(gin_bindings) + [f"{k} = {v}" for k, v in overrides.items()]
        try:
            gin_config.parse(gin_files, bindings)
            for cls in (ModelConfig, DataConfig, TrainConfig, CheckpointConfig):
                gin_config.build(cls)
        except UserError as error:
            shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the base config"
            raise UserError(f"trial {shown}: {error}") from None


def validate_train_flags(args) -> None:
    """The flags after `--` must be launch.train's own, with valid values."""
    known = {f.name: f for f in flags.FLAGS.flags_by_module_dict().get(train_main.__name__, [])}
    for arg in args:
        if not arg.startswith("--"):
            raise UserError(f"{arg!r} after '--' is not a flag; pass train flags as --name=value.")
        name, has_value, value = arg[2:].partition("=")
        if name in _RESERVED_FLAGS:
            raise UserError(f"--{name} after '--' is set by the sweep; pass it before '--'.")
        flag = known.get(name)
        if flag is None and name.startswith("no") and not has_value:
            flag = known.get(name[2:])
            if flag is not None and not flag.boolean:
                flag = None
        if flag is None:
            raise UserError(
                f"unknown launch.train flag {arg!r}; known: "
                + ", ".join(f"--{n}" for n in sorted(known))
                + "."
            )
        if has_value:
            try:
                copy.deepcopy(flag).parse(value)
            except (flags.Error, ValueError) as error:
                raise UserError(f"{arg}: {error}") from None


def trial_command(workdir, gin_files, bindings, train_args, num_hosts, devices_per_host):
    module = ["-m", "launch.train"]
    if num_hosts > 1:
        module = ["-m", "launch.local", f"--num_hosts={num_hosts}"]
        module += [f"--devices_per_host={devices_per_host}"]
    command = [sys.executable, *module, f"--workdir={workdir}"]
    command += [f"--gin_file={path}" for path in gin_files]
    command += [f"--gin_bindings={binding}" for binding in bindings]
    if train_args:
        command += (["--"] if num_hosts > 1 else []) + list(train_args)
    return command


def read_summary(workdir: str) -> dict:
    """Final metrics of one trial from metrics.jsonl (and eval_test.json when present)."""
    summary = {}
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        for line in _read(metrics).splitlines():
            record = json.loads(line)
            summary["step"] = record.get("step")
            summary["loss"] = record.get("loss")
            if "val_loss" in record:
                summary["val_loss"] = record["val_loss"]
    test = os.path.join(workdir, "eval_test.json")
    if os.path.exists(test):
        summary["test_loss"] = json.loads(_read(test)).get("loss")
    return summary


def summary_table(rows, names) -> tuple[str, str]:
    """(printable table, CSV text) of the trials' final metrics."""
    header = ["trial", *names, "status", *SUMMARY_FIELDS]
    table = [header]
    for row in rows:
        table.append(
            [row["trial"], *(row["overrides"][n] for n in names), row["status"]]
            + [_format(row["summary"].get(f)) for f in SUMMARY_FIELDS]
        )
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    text = "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in table
    )
    out = io.StringIO()
    csv.writer(out).writerows(table)
    return text, out.getvalue()


def _format(value):
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else value


def _log(message: str) -> None:
    print(message, flush=True)


def run_sweep(argv) -> int:
    root = ROOT_DIR.value
    if not root:
        raise UserError("--root is required: the directory that holds the sweep's trials.")
    if BACKEND.value == "pod":
        raise UserError(
            "--backend=pod is not wired to launch.pod yet (trials need gs:// workdirs and "
            "--tpu/--zone/--project); run each trial with `python -m launch.pod`."
        )
    gin_files, gin_bindings = cli.GIN_FILES.value, cli.GIN_BINDINGS.value
    train_args = list(argv[1:])
    sweeps = parse_sweeps(SWEEP.value)
    trials = expand(sweeps, SWEEP_MODE.value)
    validate_train_flags(train_args)
    validate_bindings(gin_files, gin_bindings, trials)
    experiment = EXPERIMENT.value or (
        os.path.splitext(os.path.basename(gin_files[-1]))[0] if gin_files else "default"
    )
    experiment_dir = os.path.join(os.path.abspath(root), experiment)
    names = [name for name, _ in sweeps]
    _log(f"sweep: {len(trials)} trial(s) of {experiment} in {experiment_dir}")
    rows, first_failure = [], 0
    for overrides in trials:
        workdir = os.path.join(experiment_dir, trial_dirname(overrides))
        bindings = list(gin_bindings) + [f"{k} = {v}" for k, v in overrides.items()]
        command = trial_command(
            workdir, gin_files, bindings, train_args, SWEEP_HOSTS.value, SWEEP_DEVICES.value
        )
        trial = {
            "experiment": experiment,
            "overrides": overrides,
            "gin_files": list(gin_files),
            "gin_bindings": bindings,
            "train_flags": train_args,
            "command": command,
        }
        path = os.path.join(workdir, "trial.json")
        previous = json.loads(_read(path)) if os.path.exists(path) else {}
        if previous and previous.get("overrides") != overrides:
            raise UserError(f"{path} belongs to other overrides {previous.get('overrides')}.")
        name = os.path.basename(workdir)
        if DRY_RUN.value:
            _log(f"sweep: {name}: " + " ".join(command))
            continue
        if previous.get("status") == "done" and previous.get("command") == command:
            _log(f"sweep: {name}: already done, skipped")
            status = "done"
        else:
            os.makedirs(workdir, exist_ok=True)
            _write_json(path, dict(trial, status="running"))
            _log(f"sweep: {name}: running{' (resuming)' if previous else ''}")
            code = subprocess.call(command, cwd=gin_config.ROOT)
            status = "done" if code == 0 else f"failed ({code})"
            _write_json(path, dict(trial, status=status, exit_code=code))
            first_failure = first_failure or code
        rows.append(
            {
                "trial": name,
                "overrides": overrides,
                "status": status,
                "summary": read_summary(workdir),
            }
        )
    if rows:
        text, csv_text = summary_table(rows, names)
        with open(os.path.join(experiment_dir, "summary.csv"), "w") as out:
            out.write(csv_text)
        _log("\n" + text + f"\n\nsummary: {os.path.join(experiment_dir, 'summary.csv')}")
    return min(first_failure, 254)


def _read(path) -> str:
    with open(path) as file:
        return file.read()


def _write_json(path, value):
    with open(path + ".tmp", "w") as out:
        json.dump(value, out, indent=2)
    os.replace(path + ".tmp", path)


def main(argv):
    sys.exit(run_sweep(argv))


if __name__ == "__main__":
    app.run(cli.guarded(main))
