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

--backend=pod makes every trial one `launch.pod` job (run one after another, each on its own
queued resource named from its workdir, so a re-run resumes the same one):
  python -m launch.sweep --backend=pod --root=gs://bucket/sweeps --tpu=v5p-64 --zone=Z \
      --project=P [--pod_flag=--spot ...] --gin_file=... --sweep=... [--dry_run] -- [train flags]
The root must be gs://; each trial's slice, mesh and batch are validated like launch.pod does
before any trial starts; --dry_run prints each trial's launch.pod command and the gcloud
commands it would run, and touches nothing (no gcloud needed).
"""

import copy
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys

from absl import app, flags
from etils import epath

import launch.train as train_main
from launch import cli, pod
from launch import config as gin_config
from research import storage
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
# --backend=pod: every trial is one launch.pod job on its own slice.
TPU = flags.DEFINE_string("tpu", None, "--backend=pod: TPU type of each trial, e.g. v5p-64.")
ZONE = flags.DEFINE_string("zone", None, "--backend=pod: zone of the TPUs.")
PROJECT = flags.DEFINE_string("project", None, "--backend=pod: Google Cloud project.")
POD_FLAGS = flags.DEFINE_multi_string(
    "pod_flag", [], "--backend=pod: a launch.pod flag for every trial, e.g. --pod_flag=--spot."
)

SUMMARY_FIELDS = ("step", "loss", "val_loss", "test_loss")
# Flags the sweep sets itself for each trial.
_RESERVED_FLAGS = ("workdir", "gin_file", "gin_bindings")
# launch.pod flags the sweep sets per trial (or that would make trials share one slice).
_RESERVED_POD_FLAGS = ("tpu", "zone", "project", "dry_run", "name", "run_id")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One sweep, from the flags (`from_flags`) or built directly by tests."""

    root: str
    gin_files: tuple = ()
    gin_bindings: tuple = ()
    train_args: tuple = ()
    sweeps: tuple = ()  # --sweep specs, 'name=v1,v2'
    sweep_mode: str = "product"
    experiment: str | None = None
    backend: str = "local"
    trial_hosts: int = 1
    trial_devices_per_host: int = 1
    dry_run: bool = False
    tpu: str | None = None
    zone: str | None = None
    project: str | None = None
    pod_flags: tuple = ()

    @classmethod
    def from_flags(cls, argv) -> "Sweep":
        return cls(
            root=ROOT_DIR.value,
            gin_files=tuple(cli.GIN_FILES.value),
            gin_bindings=tuple(cli.GIN_BINDINGS.value),
            train_args=tuple(argv[1:]),
            sweeps=tuple(SWEEP.value),
            sweep_mode=SWEEP_MODE.value,
            experiment=EXPERIMENT.value,
            backend=BACKEND.value,
            trial_hosts=SWEEP_HOSTS.value,
            trial_devices_per_host=SWEEP_DEVICES.value,
            dry_run=DRY_RUN.value,
            tpu=TPU.value,
            zone=ZONE.value,
            project=PROJECT.value,
            pod_flags=tuple(POD_FLAGS.value),
        )


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


def pod_values(sweep: Sweep) -> dict:
    """launch.pod's flag values for every trial: --tpu/--zone/--project plus --pod_flag's,
    parsed by launch.pod's own flag definitions (so a misspelt one fails here)."""
    if sweep.trial_hosts != 1:
        raise UserError("--trial_hosts is for --backend=local; a pod trial uses every TPU host.")
    reserved = _RESERVED_POD_FLAGS + _RESERVED_FLAGS
    for flag in sweep.pod_flags:
        name = flag[2:].partition("=")[0]
        if not flag.startswith("--") or name in reserved or name.removeprefix("no") in reserved:
            raise UserError(
                f"--pod_flag={flag!r}: pass launch.pod flags as '--name=value'; --tpu, --zone "
                "and --project are the sweep's own flags, and the workdir, gin config, name and "
                "run id are set per trial."
            )
    values = flags.FlagValues()
    pod_flags = pod._define_flags(values)
    argv = ["launch.pod", f"--tpu={sweep.tpu or ''}", f"--zone={sweep.zone or ''}"]
    argv += [f"--project={sweep.project or ''}", *sweep.pod_flags]
    try:
        values(argv)
    except flags.Error as error:
        raise UserError(f"--pod_flag: {error}") from None
    return {name: holder.value for name, holder in pod_flags.items()}


def pod_trial_command(sweep: Sweep, workdir: str, bindings) -> list[str]:
    """`python -m launch.pod ...` for one trial: same gin files, the trial's bindings."""
    command = [sys.executable, "-m", "launch.pod", f"--tpu={sweep.tpu}"]
    command += [f"--zone={sweep.zone}", f"--project={sweep.project}", *sweep.pod_flags]
    command += [f"--workdir={workdir}"]
    command += [f"--gin_file={path}" for path in sweep.gin_files]
    command += [f"--gin_bindings={binding}" for binding in bindings]
    return command + (["--", *sweep.train_args] if sweep.train_args else [])


def read_summary(workdir: str) -> dict:
    """Final metrics of one trial from metrics.jsonl (and eval_test.json when present)."""
    summary = {}
    metrics = f"{workdir}/metrics.jsonl"
    if _exists(metrics):
        for line in _read(metrics).splitlines():
            record = json.loads(line)
            summary["step"] = record.get("step")
            summary["loss"] = record.get("loss")
            if "val_loss" in record:
                summary["val_loss"] = record["val_loss"]
    test = f"{workdir}/eval_test.json"
    if _exists(test):
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


def _trials(sweep: Sweep) -> tuple[str, list[dict]]:
    """(experiment dir, one {overrides, workdir, bindings, command, pod} per trial), every
    trial validated (gin, train flags, and for pods the slice) before any runs."""
    if not sweep.root:
        raise UserError("--root is required: the directory that holds the sweep's trials.")
    remote = storage.is_remote(sweep.root)
    if sweep.backend == "pod" and not sweep.root.startswith("gs://"):
        raise UserError(
            f"--root={sweep.root} must be a gs:// path with --backend=pod: every TPU worker "
            "reads and writes its trial's workdir (e.g. --root=gs://my-bucket/sweeps)."
        )
    if sweep.backend == "local" and remote:
        raise UserError(f"--root={sweep.root}: --backend=local needs a local directory.")
    sweeps = parse_sweeps(sweep.sweeps)
    overrides_list = expand(sweeps, sweep.sweep_mode)
    validate_train_flags(sweep.train_args)
    validate_bindings(sweep.gin_files, sweep.gin_bindings, overrides_list)
    experiment = sweep.experiment or (
        os.path.splitext(os.path.basename(sweep.gin_files[-1]))[0] if sweep.gin_files else "default"
    )
    root = sweep.root.rstrip("/") if remote else os.path.abspath(sweep.root)
    experiment_dir = f"{root}/{experiment}"
    values = pod_values(sweep) if sweep.backend == "pod" else None
    trials = []
    for overrides in overrides_list:
        workdir = f"{experiment_dir}/{trial_dirname(overrides)}"
        bindings = list(sweep.gin_bindings) + [f"{k} = {v}" for k, v in overrides.items()]
        trial = {"overrides": overrides, "workdir": workdir, "bindings": bindings, "pod": None}
        if values is None:
            trial["command"] = trial_command(
                workdir, sweep.gin_files, bindings, sweep.train_args,
                sweep.trial_hosts, sweep.trial_devices_per_host,
            )  # fmt: skip
        else:
            try:
                trial["pod"] = pod.build_job(
                    values, workdir, sweep.gin_files, bindings, sweep.train_args
                )
            except UserError as error:
                shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the base config"
                raise UserError(f"trial {shown}: {error}") from None
            trial["command"] = pod_trial_command(sweep, workdir, bindings)
        trials.append(trial)
    return experiment_dir, trials


def run_sweep(sweep: Sweep, call=subprocess.call, log=_log) -> int:
    """Runs (or with dry_run prints) every trial; returns the first failure's exit code."""
    experiment_dir, trials = _trials(sweep)
    experiment = experiment_dir.rsplit("/", 1)[1]
    names = [name for name, _ in parse_sweeps(sweep.sweeps)]
    log(f"sweep: {len(trials)} trial(s) of {experiment} in {experiment_dir}")
    rows, first_failure = [], 0
    for trial in trials:
        overrides, workdir, command = trial["overrides"], trial["workdir"], trial["command"]
        record = {
            "experiment": experiment,
            "overrides": overrides,
            "gin_files": list(sweep.gin_files),
            "gin_bindings": trial["bindings"],
            "train_flags": list(sweep.train_args),
            "command": command,
        }
        name = workdir.rsplit("/", 1)[1]
        if sweep.dry_run:
            log(f"sweep: {name}: " + shlex.join(command))
            if trial["pod"] is not None:
                for label, argv in pod.plan(*trial["pod"]):
                    log(f"    # {label}\n    {shlex.join(argv)}")
            continue
        path = f"{workdir}/trial.json"
        previous = json.loads(_read(path)) if _exists(path) else {}
        if previous and previous.get("overrides") != overrides:
            raise UserError(f"{path} belongs to other overrides {previous.get('overrides')}.")
        if previous.get("status") == "done" and previous.get("command") == command:
            log(f"sweep: {name}: already done, skipped")
            status = "done"
        else:
            _write_json(path, dict(record, status="running"))
            log(f"sweep: {name}: running{' (resuming)' if previous else ''}")
            code = call(command, cwd=gin_config.ROOT)
            status = "done" if code == 0 else f"failed ({code})"
            _write_json(path, dict(record, status=status, exit_code=code))
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
        summary = f"{experiment_dir}/summary.csv"
        _write(summary, csv_text)
        log("\n" + text + f"\n\nsummary: {summary}")
    return min(first_failure, 254)


def _read(path) -> str:
    return epath.Path(path).read_text()


def _exists(path) -> bool:
    return epath.Path(path).exists()


def _write(path, text: str) -> None:
    """Writes text (atomically for local paths; a gs:// object appears whole anyway)."""
    if storage.is_remote(path):
        epath.Path(path).write_text(text)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.replace(path + ".tmp", path)


def _write_json(path, value):
    _write(path, json.dumps(value, indent=2))


def main(argv):
    sys.exit(run_sweep(Sweep.from_flags(argv)))


if __name__ == "__main__":
    app.run(cli.guarded(main))
