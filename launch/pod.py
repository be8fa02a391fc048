"""A training job on a Cloud TPU VM slice (queued resource), or its `xpk` equivalent for GKE.

  python -m launch.pod --tpu=v5p-64 --zone=us-east5-a --project=my-project [--spot] \
      --gin_file=configs/experiment/demo.gin --workdir=gs://bucket/run [--dry_run] -- [train flags]

Steps, each one gcloud command (printed as exact argv with --dry_run, which runs nothing and
needs no gcloud): describe / create the queued resource (reused when it is ACTIVE) and poll
until ACTIVE; scp a tarball of the code plus the rendered per-worker script to every worker;
run the script's `fingerprint` mode on every worker (python, jax, jaxlib, libtpu, code hash;
workers that differ abort the launch); run its `run` mode on every worker, which starts
`launch.train` with CIRRUS_DISTRIBUTED=auto (launch/distributed.py); copy the per-worker logs
from <workdir>/logs; delete the queued resource after a successful run (unless
--keep_resource).

What is shipped: the files `git ls-files` lists, plus the job's gin files and --ship paths,
never a file matching SECRET_PATTERNS (.env, keys, credentials); the dry run prints the
tarball's file count and size and what it left out. Run ids, names, zones, projects and the
workdir are checked against what gcloud accepts, and every value in the worker script or the
remote command is shell-quoted.

The per-worker script (launch/pod_script.py) is idempotent (an flock per run id), stops only
launch.train processes an earlier Cirrus job left behind (pid file + command line), and maps
exit codes so that ssh never exits 255 (gcloud re-runs such a command): 0, 1 and 42 pass
through, anything else becomes 2.

Supervisor: a run ending in 42 / 137 / 143, or failing while the queued resource is no longer
ACTIVE (a preempted spot slice), is restarted (the resource recreated when needed) up to
--preemption_budget times, other failures up to --failure_budget times; the run id and workdir
stay the same, so every restart resumes from the last checkpoint.

--backend=xpk prints (or runs) `xpk workload create` for an existing GKE cluster instead.
"""

import dataclasses
import fnmatch
import hashlib
import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app, flags

from launch import cli, distributed, pod_script
from launch import config as gin_config
from launch.pod_script import compare_fingerprints
from research import sharding
from research import tpu as tpu_lib
from research.errors import UserError
from research.tpu import TPU_TYPES as TPU_TYPES  # Re-exported: the slice table.
from research.tpu import TpuType
from research.train import TrainConfig

EXIT_FAILED = 2
RESTART_CODES = (cli.EXIT_PREEMPTED, 137, 143)


DEFAULT_RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
DEFAULT_SETUP = "python3 -m pip install --quiet -r requirements.txt 'jax[tpu]'"

# What reaches a gcloud argv, a remote command or the worker script is checked against these
# (what gcloud accepts for each) before anything is rendered; values are also shell-quoted.
RUN_ID_PATTERN = r"[a-z0-9](?:[-a-z0-9]{0,42}[a-z0-9])?"
NAME_PATTERN = r"[a-z](?:[-a-z0-9]{0,50}[a-z0-9])?"
ZONE_PATTERN = r"[a-z][-a-z0-9]{0,62}"
PROJECT_PATTERN = r"[a-z][-a-z0-9.:]{0,62}"
RUNTIME_PATTERN = r"[A-Za-z0-9][-A-Za-z0-9._]{0,62}"
WORKDIR_PATTERN = r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](?:/[A-Za-z0-9._~/=+@,:-]*)?"

# Never shipped to workers, whatever git tracks (fnmatch on each path component).
SECRET_PATTERNS = (
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
    "*.keystore", "*.kdbx", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc",
    ".pypirc", ".npmrc", ".git-credentials", ".dockercfg", "credentials*", "*credentials.json",
    "*service*account*.json", "application_default_credentials.json", "*.tfstate", "secrets.*",
    "*api_keys*", "*.secret", "*.secrets",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PodJob:
    """Everything a pod launch needs; built from flags by `main`, validated by `validate`."""

    tpu: str
    zone: str
    project: str
    workdir: str
    name: str
    run_id: str
    runtime_version: str
    provisioning: str = "standard"  # standard | spot | reserved | best_effort
    gin_files: tuple = ()
    gin_bindings: tuple = ()
    train_args: tuple = ()
    setup_command: str = DEFAULT_SETUP
    python: str = "python3"

    @property
    def stage(self) -> str:
        """Where the tarball and script land on each worker (the ssh user's home)."""
        return f"cirrus-{self.run_id}"


def default_run_id(workdir: str) -> str:
    return "pod-" + hashlib.sha1(workdir.encode()).hexdigest()[:10]


def _check(flag: str, value, pattern: str, rule: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise UserError(f"--{flag}={value!r} is not accepted: {rule}")


def validate(
    tpu,
    zone,
    project,
    workdir,
    name,
    gin_files,
    gin_bindings,
    provisioning_flags=(),
    run_id="pod-x",
    runtime_version="",
) -> TpuType:
    """Every check that can fail before anything is created; returns the slice's type."""
    tpu_type = tpu_lib.lookup(tpu)
    if not project:
        raise UserError("--project is required: the Google Cloud project of the TPU.")
    if not zone:
        raise UserError("--zone is required: the zone of the TPU, e.g. us-east5-a.")
    if not workdir or not workdir.startswith("gs://"):
        raise UserError(
            f"--workdir={workdir} must be a gs:// path: every TPU worker reads and writes it "
            "(e.g. --workdir=gs://my-bucket/runs/demo)."
        )
    _check("zone", zone, ZONE_PATTERN, "a zone is lowercase letters, digits and hyphens.")
    _check(
        "project", project, PROJECT_PATTERN,
        "a project id is lowercase letters, digits, hyphens (and a domain prefix 'x.com:').",
    )  # fmt: skip
    _check(
        "workdir", workdir, WORKDIR_PATTERN,
        "gs://<bucket>/<path>: a bucket name of 3-63 lowercase letters, digits, - _ . (as "
        "GCS requires), a path of letters, digits and . _ ~ / = + @ , : - only (no spaces, "
        "quotes or shell characters).",
    )  # fmt: skip
    _check(
        "run_id", run_id, RUN_ID_PATTERN,
        "lowercase letters, digits and hyphens, at most 44 characters, not starting or "
        "ending with a hyphen.",
    )  # fmt: skip
    _check(
        "name", name, NAME_PATTERN,
        "lowercase letters, digits and hyphens, start with a letter, at most 52 characters.",
    )  # fmt: skip
    if runtime_version:
        _check(
            "runtime_version", runtime_version, RUNTIME_PATTERN,
            "a TPU runtime version such as v2-alpha-tpuv5.",
        )  # fmt: skip
    if sum(bool(f) for f in provisioning_flags) > 1:
        raise UserError("--spot, --reserved and --best_effort exclude each other; pick one.")
    gin_config.parse(gin_files, gin_bindings)
    train_config = gin_config.build(TrainConfig)
    try:
        shape = sharding.resolve_mesh_shape(train_config.mesh_shape, tpu_type.chips)
    except UserError as error:
        raise UserError(
            f"--tpu={tpu} has {tpu_type.chips} devices, which cannot fill the mesh: {error} "
            "Change train.mesh_shape or --tpu."
        ) from None
    batch_shards = shape[0] * shape[1]
    if train_config.batch_size % batch_shards or train_config.batch_size % tpu_type.hosts:
        raise UserError(
            f"train.batch_size={train_config.batch_size} must be divisible by the mesh's batch "
            f"axes (data x fsdp = {batch_shards}) and by the {tpu_type.hosts} hosts of --tpu={tpu}."
        )
    return tpu_type


# ----------------------------------------------------------------------------- gcloud argv


def _where(job: PodJob) -> list[str]:
    return [f"--zone={job.zone}", f"--project={job.project}"]


def create_argv(job: PodJob) -> list[str]:
    """`queued-resources create`; best-effort exists only in the alpha track (v2alpha1)."""
    track = ["alpha"] if job.provisioning == "best_effort" else []
    argv = ["gcloud", *track, "compute", "tpus", "queued-resources", "create", job.name]
    argv += [
        f"--node-id={job.name}",
        f"--accelerator-type={job.tpu}",
        f"--runtime-version={job.runtime_version}",
    ]
    if job.provisioning != "standard":
        argv.append("--" + job.provisioning.replace("_", "-"))
    return argv + _where(job)


def describe_argv(job: PodJob) -> list[str]:
    return [
        "gcloud", "compute", "tpus", "queued-resources", "describe", job.name,
        "--format=value(state.state)", *_where(job),
    ]  # fmt: skip


def delete_argv(job: PodJob) -> list[str]:
    return [
        "gcloud", "compute", "tpus", "queued-resources", "delete", job.name,
        "--force", "--quiet", *_where(job),
    ]  # fmt: skip


def scp_argv(job: PodJob, tarball: str, script: str) -> list[str]:
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, script, f"{job.name}:~/",
        "--worker=all", "--recurse", *_where(job),
    ]  # fmt: skip


def ssh_argv(job: PodJob, mode: str) -> list[str]:
    command = f"bash ~/{shlex.quote(job.stage + '.sh')} {shlex.quote(mode)}"
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", job.name, "--worker=all",
        f"--command={command}", *_where(job),
    ]  # fmt: skip


def gather_logs_argv(job: PodJob, local_dir: str) -> list[str]:
    return ["gcloud", "storage", "cp", "--recursive", job.workdir.rstrip("/") + "/logs", local_dir]


def train_argv(job: PodJob) -> list[str]:
    return (
        [job.python, "-m", "launch.train", f"--workdir={job.workdir}"]
        + [f"--gin_file={path}" for path in job.gin_files]
        + [f"--gin_bindings={binding}" for binding in job.gin_bindings]
        + list(job.train_args)
    )


def xpk_argv(job: PodJob, cluster: str, docker_image: str, max_restarts: int) -> list[str]:
    """`xpk workload create` running the same training command in the image (code baked in)."""
    env = f"{distributed.DISTRIBUTED}=auto {distributed.RUN_ID}={shlex.quote(job.run_id)}"
    command = env + " " + shlex.join(train_argv(job))
    return [
        "xpk", "workload", "create", f"--workload={job.name}", f"--cluster={cluster}",
        f"--tpu-type={job.tpu}", "--num-slices=1", f"--docker-image={docker_image}",
        f"--max-restarts={max_restarts}", f"--command={command}", *_where(job),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- worker script


def render_script(job: PodJob) -> str:
    """The bash script every worker runs (launch/pod_script.py)."""
    return pod_script.render_script(job, train_argv(job))


def is_secret(path: str) -> bool:
    """True for a path any of whose components matches SECRET_PATTERNS."""
    parts = path.replace(os.sep, "/").split("/")
    return any(fnmatch.fnmatch(part, p) for part in parts for p in SECRET_PATTERNS)


@dataclasses.dataclass(frozen=True)
class Shipment:
    """What goes to the workers: repo-relative paths, and what was left out and why."""

    files: tuple
    secrets: tuple  # Files refused as secrets (tracked, or untracked and not ignored).
    untracked: tuple  # Files git does not track (and does not ignore): not shipped.


def shipped_files(root: str = gin_config.ROOT, extras=()) -> Shipment:
    """The files `git ls-files` lists, plus `extras` (repo-relative paths: the job's gin files
    and --ship), minus anything matching SECRET_PATTERNS."""

    def git(*args) -> list[str]:
        try:
            result = subprocess.run(
                ["git", "-C", root, "ls-files", "-z", *args], capture_output=True, check=True
            )
        except (OSError, subprocess.CalledProcessError) as error:
            raise UserError(
                f"{root} is not a git checkout (or git is missing: {error}); launch.pod ships "
                "exactly the files `git ls-files` lists. Run it from a git clone of the repo."
            ) from None
        return [p for p in result.stdout.decode().split("\0") if p]

    tracked = git("--cached")
    named = []
    for extra in extras:
        path = os.path.relpath(os.path.join(root, extra), root)
        if path.startswith(".."):
            raise UserError(f"--ship={extra} is outside the repository {root}; copy it in.")
        if not os.path.isfile(os.path.join(root, path)):
            raise UserError(f"--ship={extra}: no such file under {root}.")
        if is_secret(path):
            raise UserError(
                f"--ship={extra} looks like a secret (matches one of {SECRET_PATTERNS}); "
                "launch.pod never ships secrets. Pass credentials through the workers' "
                "environment or a secret manager."
            )
        named.append(path)
    files, secrets = set(), set()
    for path in tracked + named:
        if not os.path.isfile(os.path.join(root, path)):
            continue  # Deleted in the work tree, or a submodule.
        (secrets if is_secret(path) else files).add(path)
    untracked = []
    for path in git("--others", "--exclude-standard"):
        if path not in files:
            (secrets.add(path) if is_secret(path) else untracked.append(path))
    return Shipment(tuple(sorted(files)), tuple(sorted(secrets)), tuple(sorted(untracked)))


def code_tarball(root: str = gin_config.ROOT, extras=()) -> tuple[bytes, Shipment]:
    """The shipped files (`shipped_files`) as a .tar.gz, and the shipment it holds."""
    shipment = shipped_files(root, extras)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in shipment.files:
            tar.add(os.path.join(root, path), arcname=path, recursive=False)
    return buffer.getvalue(), shipment


def job_extras(job: PodJob, ship=(), root: str = gin_config.ROOT) -> list[str]:
    """The job's gin files that live in the repository, plus --ship: shipped even when git
    does not track them (a new config not yet committed)."""
    extras = [path for path in job.gin_files if os.path.isfile(os.path.join(root, path))]
    return extras + list(ship)


def describe_shipment(tarball: bytes, shipment: Shipment) -> list[str]:
    """Comment lines saying what the tarball holds and what it leaves out."""
    lines = [
        f"# code tarball: {len(shipment.files)} files, {len(tarball) / 1e6:.2f} MB compressed "
        "(git ls-files + the job's gin files + --ship)"
    ]
    if shipment.secrets:
        lines.append(f"# not shipped, secret-like: {', '.join(shipment.secrets)}")
    if shipment.untracked:
        shown = ", ".join(shipment.untracked[:10])
        more = f" and {len(shipment.untracked) - 10} more" if len(shipment.untracked) > 10 else ""
        lines.append(
            f"# not shipped, untracked by git: {shown}{more} (git add them, or --ship=PATH)"
        )
    return lines


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class Paths:
    tarball: str
    script: str
    logs: str


def plan(job: PodJob, paths: Paths) -> list[tuple[str, list[str]]]:
    """The steps of one attempt, in order, as (label, argv)."""
    return [
        ("describe", describe_argv(job)),
        ("create", create_argv(job)),
        ("poll until ACTIVE", describe_argv(job)),
        ("ship code", scp_argv(job, paths.tarball, paths.script)),
        ("fingerprint", ssh_argv(job, "fingerprint")),
        ("run", ssh_argv(job, "run")),
        ("gather logs", gather_logs_argv(job, paths.logs)),
        ("delete", delete_argv(job)),
    ]


def dry_run_text(job: PodJob, paths: Paths, shipment_lines=()) -> str:
    lines = [f"# launch.pod dry run: {job.tpu} {job.name} run {job.run_id}; nothing is run."]
    lines += list(shipment_lines)
    for label, argv in plan(job, paths):
        lines.append(f"# {label}")
        lines.append(shlex.join(argv))
    lines.append(f"# per-worker script ({paths.script})")
    lines.append(render_script(job))
    return "\n".join(lines)


class Runner:
    """Runs commands for real; tests pass a fake with the same two methods."""

    def call(self, argv) -> int:
        return subprocess.call(argv, stdin=subprocess.DEVNULL)

    def capture(self, argv) -> tuple[int, str]:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode:
            sys.stderr.write(result.stderr)
        return result.returncode, result.stdout


def resource_state(job: PodJob, runner) -> str | None:
    """The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, ...), None if absent."""
    code, out = runner.capture(describe_argv(job))
    if code:
        return None
    return out.strip() or "UNKNOWN"


def ensure_resource(job: PodJob, runner, *, timeout_s, poll_s, log, sleep=time.sleep) -> None:
    """Reuses an ACTIVE queued resource, replaces a dead one, creates a missing one."""
    state = resource_state(job, runner)
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
        log(f"launch.pod: queued resource {job.name} is {state}; deleting it")
        runner.call(delete_argv(job))
        state = None
    if state is None:
        log(f"launch.pod: creating queued resource {job.name} ({job.tpu}, {job.provisioning})")
        if runner.call(create_argv(job)):
            raise RuntimeError(f"creating the queued resource {job.name} failed")
    deadline = time.monotonic() + timeout_s
    while (state := resource_state(job, runner)) != "ACTIVE":
        if state in ("FAILED", "SUSPENDED") or time.monotonic() > deadline:
            raise RuntimeError(f"queued resource {job.name} is {state}, not ACTIVE")
        log(f"launch.pod: queued resource {job.name} is {state}; waiting")
        sleep(poll_s)
    log(f"launch.pod: queued resource {job.name} is ACTIVE")


def supervise(
    job: PodJob,
    paths: Paths,
    runner,
    *,
    preemption_budget: int,
    failure_budget: int,
    keep_resource: bool = False,
    timeout_s: float = 3600.0,
    poll_s: float = 30.0,
    log=print,
    sleep=time.sleep,
) -> int:
    """Provisions, ships, runs and restarts per the budgets; returns the job's exit code."""
    preemptions = failures = 0
    attempt = 0
    while True:
        log(f"launch.pod: run {job.run_id} attempt {attempt}")
        ensure_resource(job, runner, timeout_s=timeout_s, poll_s=poll_s, log=log, sleep=sleep)
        code = runner.call(scp_argv(job, paths.tarball, paths.script))
        if code == 0:
            code, out = runner.capture(ssh_argv(job, "fingerprint"))
            if code == 0:
                compare_fingerprints(out)
                code = runner.call(ssh_argv(job, "run"))
        runner.call(gather_logs_argv(job, paths.logs))
        log(f"launch.pod: attempt {attempt} ended with code {code}")
        if code in (0, cli.EXIT_USER_ERROR):
            if code == 0 and not keep_resource:
                runner.call(delete_argv(job))
            return code
        preempted = code in RESTART_CODES or resource_state(job, runner) != "ACTIVE"
        if preempted:
            if preemptions >= preemption_budget:
                log(f"launch.pod: preemption budget ({preemption_budget}) used up")
                return code
            preemptions += 1
        else:
            if failures >= failure_budget:
                return code
            failures += 1
        attempt += 1
        log("launch.pod: restarting from the last checkpoint in the same workdir")


# ----------------------------------------------------------------------------- main

# Defined only when this module is the program: launch.local and launch.sweep own flags of
# the same names (--dry_run, --preemption_budget, ...), and absl flags are global.
_FLAGS = {}


class _Definer:
    """flags.DEFINE_* bound to one FlagValues (launch.sweep checks pod flags in its own)."""

    def __init__(self, flag_values):
        self.flag_values = flag_values

    def __getattr__(self, name):
        define = getattr(flags, name)
        return lambda *args, **kwargs: define(*args, flag_values=self.flag_values, **kwargs)


def _define_flags(flag_values=flags.FLAGS) -> dict:
    """Defines launch.pod's own flags in `flag_values`; returns {name: FlagHolder}."""
    f = _Definer(flag_values)
    defined = dict(
        tpu=f.DEFINE_string("tpu", None, "TPU type, e.g. v5p-64, v5litepod-16 (or v5e-16), v6e-8."),
        zone=f.DEFINE_string("zone", None, "Zone of the TPU."),
        project=f.DEFINE_string("project", None, "Google Cloud project."),
        spot=f.DEFINE_bool("spot", False, "Spot capacity (preemptible)."),
        reserved=f.DEFINE_bool("reserved", False, "Use the project's reservation."),
        best_effort=f.DEFINE_bool("best_effort", False, "Best-effort capacity (alpha API)."),
        runtime_version=f.DEFINE_string("runtime_version", None, "TPU VM runtime version."),
        name=f.DEFINE_string("name", None, "Queued resource / node name; default from run id."),
        run_id=f.DEFINE_string("run_id", None, "Run id; default: derived from --workdir."),
        dry_run=f.DEFINE_bool("dry_run", False, "Print every step and the script; run none."),
        backend=f.DEFINE_enum("backend", "tpu_vm", ["tpu_vm", "xpk"], "Where the job runs."),
        cluster=f.DEFINE_string("cluster", None, "GKE cluster (--backend=xpk)."),
        docker_image=f.DEFINE_string("docker_image", None, "Image with the code (xpk)."),
        setup_command=f.DEFINE_string(
            "setup_command", DEFAULT_SETUP, "A shell command run on each worker before training."
        ),
        ship=f.DEFINE_multi_string(
            "ship", [], "A repo file git does not track to ship as well (secrets are refused)."
        ),
        preemption_budget=f.DEFINE_integer("preemption_budget", 3, "Restarts after preemption."),
        failure_budget=f.DEFINE_integer("failure_budget", 0, "Restarts after other failures."),
        keep_resource=f.DEFINE_bool("keep_resource", False, "Do not delete it after success."),
    )
    if flag_values is flags.FLAGS:
        _FLAGS.update(defined)
    return defined


def build_job(v: dict, workdir: str, gin_files, gin_bindings, train_args) -> tuple:
    """(PodJob, Paths) from launch.pod's flag values `v` ({flag name: value}), validated.

    launch.sweep --backend=pod builds each trial's job through this as well.
    """
    workdir = workdir or ""
    run_id = v["run_id"] or default_run_id(workdir)
    name = v["name"] or "cirrus-" + run_id.removeprefix("pod-")
    provisioning_flags = (v["spot"], v["reserved"], v["best_effort"])
    tpu = tpu_lib.canonical_name(v["tpu"] or "")
    validate(
        tpu,
        v["zone"],
        v["project"],
        workdir,
        name,
        gin_files,
        gin_bindings,
        provisioning_flags,
        run_id=run_id,
        runtime_version=v["runtime_version"] or "",
    )
    provisioning = "standard"
    for label, chosen in zip(("spot", "reserved", "best_effort"), provisioning_flags, strict=True):
        provisioning = label if chosen else provisioning
    job = PodJob(
        tpu=tpu,
        zone=v["zone"],
        project=v["project"],
        workdir=workdir.rstrip("/"),
        name=name,
        run_id=run_id,
        runtime_version=v["runtime_version"] or DEFAULT_RUNTIME[tpu.rsplit("-", 1)[0]],
        provisioning=provisioning,
        gin_files=tuple(gin_files),
        gin_bindings=tuple(gin_bindings),
        train_args=tuple(train_args),
        setup_command=v["setup_command"],
    )
    stage = os.path.join(tempfile.gettempdir(), "cirrus-pod", run_id)
    paths = Paths(
        tarball=os.path.join(stage, job.stage + ".tar.gz"),
        script=os.path.join(stage, job.stage + ".sh"),
        logs=os.path.join(stage, "logs"),
    )
    return job, paths


def main(argv):
    v = {key: flag.value for key, flag in _FLAGS.items()}
    job, paths = build_job(
        v, cli.WORKDIR.value, cli.GIN_FILES.value, cli.GIN_BINDINGS.value, argv[1:]
    )
    if v["backend"] == "xpk":
        if not v["cluster"] or not v["docker_image"]:
            raise UserError("--backend=xpk needs --cluster and --docker_image.")
        argv_xpk = xpk_argv(job, v["cluster"], v["docker_image"], v["preemption_budget"])
        print(shlex.join(argv_xpk), flush=True)
        sys.exit(0 if v["dry_run"] else min(Runner().call(argv_xpk), 254))
    tarball, shipment = code_tarball(extras=job_extras(job, v.get("ship", ())))
    if v["dry_run"]:
        print(dry_run_text(job, paths, describe_shipment(tarball, shipment)), flush=True)
        return 0
    print("\n".join(describe_shipment(tarball, shipment)), flush=True)
    os.makedirs(paths.logs, exist_ok=True)
    with open(paths.tarball, "wb") as out:
        out.write(tarball)
    with open(paths.script, "w") as out:
        out.write(render_script(job))
    code = supervise(
        job,
        paths,
        Runner(),
        preemption_budget=v["preemption_budget"],
        failure_budget=v["failure_budget"],
        keep_resource=v["keep_resource"],
        log=lambda message: print(message, flush=True),
    )
    sys.exit(min(code, 254))  # Never 255: gcloud re-runs a command whose ssh exits 255.


if __name__ == "__main__":
    _define_flags()
    app.run(cli.guarded(main))
