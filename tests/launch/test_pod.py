"""launch.pod: gcloud argv, the per-worker script, validation, the supervisor, and the real
gcloud CLI fed the generated commands against a fake TPU REST API on 127.0.0.1."""

import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from launch import pod
from launch.config import ROOT
from research.errors import UserError

DEMO = "configs/experiment/demo.gin"
WORKDIR = "gs://bucket/run"


def make_job(**changes) -> pod.PodJob:
    fields = dict(
        tpu="v5p-64",
        zone="us-east5-a",
        project="proj",
        workdir=WORKDIR,
        name="cirrus-test",
        run_id="pod-test",
        runtime_version="v2-alpha-tpuv5",
        provisioning="spot",
        gin_files=(DEMO,),
        gin_bindings=("train.batch_size = 64",),
        train_args=("--sample_prompt=",),
    )
    fields.update(changes)
    return pod.PodJob(**fields)


# ----------------------------------------------------------------------------- dry run


def test_dry_run_prints_exact_argv_and_script_without_gcloud(tmp_path):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    (empty_path / "git").symlink_to(shutil.which("git"))  # git, and no gcloud.
    result = subprocess.run(
        [sys.executable, "-m", "launch.pod", "--tpu=v5p-64", "--zone=us-east5-a"]
        + ["--project=proj", "--spot", "--name=cirrus-test", "--run_id=pod-test"]
        + [f"--gin_file={DEMO}", "--gin_bindings=train.batch_size = 64"]
        + [f"--workdir={WORKDIR}", "--dry_run", "--", "--sample_prompt="],
        cwd=ROOT,
        env=dict(os.environ, PATH=str(empty_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    stage = "/tmp/cirrus-pod/pod-test/cirrus-pod-test"
    where = "--zone=us-east5-a --project=proj"
    for expected in [
        "gcloud compute tpus queued-resources create cirrus-test --node-id=cirrus-test "
        f"--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot {where}",
        "gcloud compute tpus queued-resources describe cirrus-test "
        f"'--format=value(state.state)' {where}",
        f"gcloud compute tpus tpu-vm scp {stage}.tar.gz {stage}.sh 'cirrus-test:~/' "
        f"--worker=all --recurse {where}",
        "gcloud compute tpus tpu-vm ssh cirrus-test --worker=all "
        f"'--command=bash ~/cirrus-pod-test.sh run' {where}",
        "gcloud compute tpus tpu-vm ssh cirrus-test --worker=all "
        f"'--command=bash ~/cirrus-pod-test.sh fingerprint' {where}",
        "gcloud storage cp --recursive gs://bucket/run/logs /tmp/cirrus-pod/pod-test/logs",
        f"gcloud compute tpus queued-resources delete cirrus-test --force --quiet {where}",
    ]:
        assert expected in lines
    script = result.stdout.split("#!/bin/bash", 1)[1]
    assert 'export CIRRUS_DISTRIBUTED=auto CIRRUS_RUN_ID="$RUN_ID"' in script
    assert (
        '"$PYTHON" -m launch.train --workdir=gs://bucket/run '
        "--gin_file=configs/experiment/demo.gin '--gin_bindings=train.batch_size = 64' "
        "--sample_prompt=" in script
    )
    assert "/tmp/libtpu_lockfile" in script and "/dev/accel*" in script
    assert not os.path.exists("/tmp/cirrus-pod/pod-test/cirrus-pod-test.sh")
    (tarball,) = [line for line in lines if line.startswith("# code tarball: ")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    count = sum(os.path.isfile(os.path.join(ROOT, p)) for p in tracked.stdout.splitlines())
    assert tarball.startswith(f"# code tarball: {count} files, ")


def test_provisioning_flags_and_xpk():
    assert "--best-effort" in pod.create_argv(make_job(provisioning="best_effort"))
    assert pod.create_argv(make_job(provisioning="best_effort"))[:2] == ["gcloud", "alpha"]
    assert "--reserved" in pod.create_argv(make_job(provisioning="reserved"))
    standard = pod.create_argv(make_job(provisioning="standard"))
    assert not {"--spot", "--reserved", "--best-effort"} & set(standard)
    xpk = pod.xpk_argv(make_job(), "my-cluster", "gcr.io/p/cirrus:1", 3)
    assert xpk[:3] == ["xpk", "workload", "create"]
    assert "--tpu-type=v5p-64" in xpk and "--cluster=my-cluster" in xpk
    assert "--max-restarts=3" in xpk
    command = next(a for a in xpk if a.startswith("--command="))
    assert command.startswith("--command=CIRRUS_DISTRIBUTED=auto CIRRUS_RUN_ID=pod-test ")
    assert "-m launch.train --workdir=gs://bucket/run" in command


def test_tpu_table():
    assert pod.TPU_TYPES["v5p-64"] == pod.TpuType("v5p-64", 32, 8)
    assert pod.TPU_TYPES["v4-8"] == pod.TpuType("v4-8", 4, 1)
    assert pod.TPU_TYPES["v5litepod-8"] == pod.TpuType("v5litepod-8", 8, 1)
    assert pod.TPU_TYPES["v6e-256"] == pod.TpuType("v6e-256", 256, 64)
    assert pod.TPU_TYPES["v5p-12288"].chips == 6144


# ----------------------------------------------------------------------------- validation

GOOD = dict(
    tpu="v5p-8",
    zone="z",
    project="p",
    workdir=WORKDIR,
    name="cirrus-x",
    gin_files=[DEMO],
    gin_bindings=[],
)


@pytest.mark.parametrize(
    "changes, flag",
    [
        (dict(tpu="v5p-63"), "--tpu=v5p-63"),
        (dict(tpu="v9-8"), "--tpu=v9-8"),
        (dict(project=None), "--project"),
        (dict(zone=""), "--zone"),
        (dict(workdir="/tmp/run"), "--workdir=/tmp/run"),
        (dict(workdir="s3://b/run"), "--workdir=s3://b/run"),
        (dict(name="Bad_Name"), "--name"),
        (dict(gin_bindings=["train.mesh_shape = (8, 1, 1)"]), "--tpu=v5p-8 has 4 devices"),
        (dict(tpu="v5p-64", gin_bindings=["train.batch_size = 12"]), "train.batch_size=12"),
        (dict(provisioning_flags=(True, False, True)), "--spot, --reserved and --best_effort"),
    ],
)
def test_validation_errors(changes, flag):
    with pytest.raises(UserError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        pod.validate(**dict(GOOD, **changes))


def test_validation_passes_and_cli_exits_1():
    assert pod.validate(**GOOD).chips == 4
    result = subprocess.run(
        [sys.executable, "-m", "launch.pod", "--tpu=v5p-7", "--zone=z", "--project=p"]
        + [f"--gin_file={DEMO}", f"--workdir={WORKDIR}", "--dry_run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "error: --tpu=v5p-7 is not a known TPU type" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- worker script


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def worker(tmp_path):
    """A fake worker: HOME with the shipped tarball, stub python / sudo / gcloud / curl."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    job = make_job(run_id=f"pod-{tmp_path.name[-12:]}", python="python", setup_command="true")
    source = tmp_path / "src"
    source.mkdir()
    (source / "hello.py").write_text("print('hi')\n")
    with tarfile.open(home / f"{job.stage}.tar.gz", "w:gz") as tar:
        tar.add(source / "hello.py", arcname="hello.py")
    script = home / f"{job.stage}.sh"
    script.write_text(pod.render_script(job))
    # python: exits with $FAKE_CODE for launch.train (recording its argv and env).
    _executable(
        bin_dir / "python",
        '#!/bin/bash\nif [ "$2" = launch.train ]; then\n'
        f'  echo "$@" "$CIRRUS_DISTRIBUTED" "$CIRRUS_RUN_ID" > {tmp_path}/train_call\n'
        f'  printf "%s\\0" "$@" > {tmp_path}/train_argv\n'
        '  exit "$FAKE_CODE"\nfi\nexec python3 "$@"\n',
    )
    for stub in ("sudo", "gcloud", "curl"):
        _executable(bin_dir / stub, "#!/bin/bash\nexit 1\n")
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
    yield job, script, env, tmp_path
    shutil.rmtree(f"/tmp/cirrus/{job.run_id}", ignore_errors=True)


@pytest.mark.parametrize("code, mapped", [(0, 0), (1, 1), (42, 42), (3, 2), (137, 2), (255, 2)])
def test_script_maps_exit_codes(worker, code, mapped):
    job, script, env, tmp_path = worker
    result = subprocess.run(
        ["bash", str(script), "run"],
        env=dict(env, FAKE_CODE=str(code)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == mapped, result.stdout + result.stderr
    call = (tmp_path / "train_call").read_text()
    assert call.startswith("-m launch.train --workdir=gs://bucket/run")
    assert call.rstrip().endswith(f"auto {job.run_id}")
    assert (tmp_path / "home" / job.stage / "code" / "hello.py").exists()
    assert not os.path.exists(f"/tmp/cirrus/{job.run_id}/train_pid")
    with open(f"/tmp/cirrus/{job.run_id}/exit_code") as exit_file:
        assert exit_file.read().strip() == str(code)


def test_script_waits_for_a_running_instance(worker):
    job, script, env, tmp_path = worker
    state = f"/tmp/cirrus/{job.run_id}"
    os.makedirs(state, exist_ok=True)
    with open(f"{state}/exit_code", "w") as out:
        out.write("42")
    sleeper = subprocess.Popen(["flock", f"{state}/lock", "sleep", "1"])  # A running instance.
    try:
        time.sleep(0.3)
        result = subprocess.run(
            ["bash", str(script), "run"], env=dict(env, FAKE_CODE="0"), capture_output=True,
            text=True, timeout=30,
        )  # fmt: skip
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "already running" in result.stdout
    assert result.returncode == 42
    assert not (tmp_path / "train_call").exists()


def test_script_fingerprint_and_comparison(worker):
    job, script, env, _ = worker
    result = subprocess.run(
        ["bash", str(script), "fingerprint"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    (fingerprint,) = pod.compare_fingerprints(result.stdout)
    assert set(fingerprint) == {"worker", "python", "jax", "jaxlib", "libtpu", "code_hash"}
    other = dict(fingerprint, worker="w1", jax="0.0.1")
    with pytest.raises(UserError, match="jax"):
        pod.compare_fingerprints(result.stdout + "CIRRUS_FINGERPRINT " + json.dumps(other))


# ----------------------------------------------------------------------------- hostile input

POD_FLAGS = dict(
    tpu="v5p-8", zone="us-east5-a", project="proj", spot=False, reserved=False,
    best_effort=False, runtime_version=None, name=None, run_id=None,
    setup_command=pod.DEFAULT_SETUP,
)  # fmt: skip


@pytest.mark.parametrize(
    "changes, flag",
    [
        (dict(run_id="x$(touch pwned)"), "--run_id"),
        (dict(run_id="a;b"), "--run_id"),
        (dict(run_id="../../etc"), "--run_id"),
        (dict(run_id="ok", name="cirrus-x`id`"), "--name"),
        (dict(zone="us-east5-a; rm -rf ~"), "--zone"),
        (dict(project="p$(id)"), "--project"),
        (dict(runtime_version="v2 --foo"), "--runtime_version"),
    ],
)
def test_hostile_flags_are_refused_before_anything_is_rendered(changes, flag):
    with pytest.raises(UserError, match=re.escape(flag)):
        pod.build_job(dict(POD_FLAGS, **changes), WORKDIR, [DEMO], [], [])


@pytest.mark.parametrize("workdir", ["gs://b/run$(touch x)", "gs://b/a b", "gs://b/'q'"])
def test_hostile_workdirs_are_refused(workdir):
    with pytest.raises(UserError, match="--workdir"):
        pod.build_job(POD_FLAGS, workdir, [DEMO], [], [])


def test_values_reach_the_worker_verbatim_and_never_run(worker):
    """Every value that may legitimately hold shell characters (gin bindings, train flags,
    the setup command's arguments) is quoted: the worker's launch.train receives it byte for
    byte, and nothing in it runs."""
    job, script, env, tmp_path = worker
    pwned = tmp_path / "pwned"
    hostile = [f"$(touch {pwned})", f"`touch {pwned}`", f"'; touch {pwned}; '", "a\nb", '"$HOME"']
    job = dataclasses.replace(
        job,
        gin_bindings=tuple(f"train.tag = '{value}'" for value in hostile),
        train_args=tuple(f"--sample_prompt={value}" for value in hostile),
        setup_command=f"echo setup-ran {shlex.quote(hostile[0])} > {tmp_path}/setup",
    )
    script.write_text(pod.render_script(job))
    result = subprocess.run(
        ["bash", str(script), "run"], env=dict(env, FAKE_CODE="0"), capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert not pwned.exists()
    argv = (tmp_path / "train_argv").read_text().split("\0")[:-1]
    assert argv == pod.train_argv(job)[1:]
    assert (tmp_path / "setup").read_text() == f"setup-ran {hostile[0]}\n"
    # The remote command gcloud runs through the worker's shell is three plain words.
    command = next(a for a in pod.ssh_argv(job, "run") if a.startswith("--command="))
    assert shlex.split(command.removeprefix("--command=")) == [
        "bash", f"~/{job.stage}.sh", "run"
    ]  # fmt: skip


def test_stale_cleanup_stops_only_what_cirrus_started(worker):
    """A launch.train left by an earlier job (pid file + command line) is stopped and named;
    a process whose pid file no longer matches a launch.train command line is left alone."""
    job, script, env, tmp_path = worker
    stale_dir = f"/tmp/cirrus/{job.run_id}-old"
    other_dir = f"/tmp/cirrus/{job.run_id}-other"
    sleep = "import time; time.sleep(120)"
    stale = subprocess.Popen([sys.executable, "-c", sleep, "-m", "launch.train", "--workdir=x"])
    bystander = subprocess.Popen([sys.executable, "-c", sleep])
    for process in (stale, bystander):
        threading.Thread(target=process.wait, daemon=True).start()  # Reaped when killed.
    try:
        for directory, process in ((stale_dir, stale), (other_dir, bystander)):
            os.makedirs(directory, exist_ok=True)
            with open(f"{directory}/train_pid", "w") as out:
                out.write(str(process.pid))
        result = subprocess.run(
            ["bash", str(script), "run"], env=dict(env, FAKE_CODE="0"), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"stopping pid {stale.pid}, left by an earlier Cirrus job" in result.stdout
        deadline = time.monotonic() + 10
        while stale.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stale.poll() is not None
        assert bystander.poll() is None
        assert str(bystander.pid) not in result.stdout
    finally:
        for process in (stale, bystander):
            process.kill()
        shutil.rmtree(stale_dir, ignore_errors=True)
        shutil.rmtree(other_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- the tarball


def test_tarball_ships_git_files_and_never_secrets(tmp_path):
    repo = tmp_path / "repo"
    files = {
        "research/model.py": "x = 1\n",
        "configs/a.gin": "train.num_steps = 1\n",
        ".env": "OPENAI_API_KEY=sk-secret\n",
        "deploy/server.key": "-----BEGIN PRIVATE KEY-----\n",
        "keys/id_ed25519": "secret\n",
        "credentials.json": "{}\n",
        "data_cache/shard.bin": "cache\n",
        "notes.txt": "untracked\n",
        "configs/new.gin": "train.num_steps = 2\n",
    }
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    (repo / ".gitignore").write_text("/data_cache/\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    tracked = ["research/model.py", "configs/a.gin", ".gitignore", ".env", "deploy/server.key"]
    subprocess.run(["git", "-C", str(repo), "add", "-f", *tracked], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "keys", "credentials.json"], check=True)
    data, shipment = pod.code_tarball(str(repo), extras=["configs/new.gin"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = sorted(tar.getnames())
    assert names == [".gitignore", "configs/a.gin", "configs/new.gin", "research/model.py"]
    assert shipment.secrets == (".env", "credentials.json", "deploy/server.key", "keys/id_ed25519")
    assert shipment.untracked == ("notes.txt",)
    text = "\n".join(pod.describe_shipment(data, shipment))
    assert "4 files" in text and "notes.txt" in text and ".env" in text
    with pytest.raises(UserError, match="--ship=.env looks like a secret"):
        pod.code_tarball(str(repo), extras=[".env"])
    with pytest.raises(UserError, match="outside the repository"):
        pod.code_tarball(str(repo), extras=["../x"])


# ----------------------------------------------------------------------------- supervisor


class FakeRunner:
    """Scripted exit codes for `ssh ... run` and states for `describe`; records every argv."""

    def __init__(self, run_codes, states):
        self.run_codes, self.states, self.calls = list(run_codes), list(states), []

    def call(self, argv):
        self.calls.append(argv)
        if "ssh" in argv and argv[-3].endswith(" run"):
            return self.run_codes.pop(0)
        return 0

    def capture(self, argv):
        self.calls.append(argv)
        if "describe" in argv:
            state = self.states.pop(0) if self.states else "ACTIVE"
            return (1, "") if state is None else (0, state + "\n")
        fingerprint = {"python": "3.11", "jax": "1", "jaxlib": "1", "libtpu": "1"}
        return 0, "CIRRUS_FINGERPRINT " + json.dumps(dict(fingerprint, code_hash="h"))


def _label(argv):
    if "queued-resources" in argv:
        return argv[4]
    if "ssh" in argv:
        return "ssh " + argv[-3].split()[-1]
    return argv[4] if argv[1] == "compute" else argv[2]


def _supervise(runner, **kw):
    paths = pod.Paths("/s/code.tar.gz", "/s/run.sh", "/s/logs")
    kw = dict(preemption_budget=2, failure_budget=0, poll_s=0, log=lambda m: None) | kw
    return pod.supervise(make_job(), paths, runner, **kw)


def test_supervisor_creates_runs_and_deletes():
    runner = FakeRunner([0], [None, "WAITING_FOR_RESOURCES", "ACTIVE"])
    assert _supervise(runner) == 0
    assert [_label(a) for a in runner.calls] == [
        "describe", "create", "describe", "describe", "scp", "ssh fingerprint", "ssh run",
        "cp", "delete",
    ]  # fmt: skip


def test_supervisor_restarts_on_preemption_and_dead_resource():
    # 42, then a failure while the slice was preempted (recreated), then done.
    runner = FakeRunner([42, 2, 0], ["ACTIVE"] * 4 + ["SUSPENDED", "SUSPENDED", "ACTIVE"])
    assert _supervise(runner) == 0
    runs = [a for a in runner.calls if "ssh" in a and a[-3].endswith(" run")]
    assert len(runs) == 3
    assert sum("create" in a for a in runner.calls) == 1
    assert all(a == runs[0] for a in runs)  # Same run id and workdir every time.


def test_supervisor_budgets_and_user_error():
    runner = FakeRunner([42, 42, 42], [])
    assert _supervise(runner, preemption_budget=2) == 42
    assert not any("delete" in a for a in runner.calls)
    runner = FakeRunner([2, 2], [])
    assert _supervise(runner, failure_budget=1) == 2
    assert sum("ssh" in a and a[-3].endswith(" run") for a in runner.calls) == 2
    runner = FakeRunner([1], [])
    assert _supervise(runner) == 1
    assert sum("ssh" in a and a[-3].endswith(" run") for a in runner.calls) == 1


# ----------------------------------------------------------------------------- real gcloud


class _FakeTpuApi(BaseHTTPRequestHandler):
    requests = []

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        self.requests.append((self.command, self.path, json.loads(body) if body else None))
        path = self.path.split("?")[0]
        if self.command == "GET" and "/queuedResources/" in path:
            reply = {"name": path.split("/", 2)[2], "state": {"state": "ACTIVE"}}
        else:
            reply = {
                "name": "projects/proj/locations/us-east5-a/operations/x",
                "done": True,
                "response": {"name": "x"},
            }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_gcloud(tmp_path_factory):
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud is not installed; the generated commands cannot be checked.")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeTpuApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    directory = tmp_path_factory.mktemp("gcloud")
    (directory / "token").write_text("fake-access-token\n")
    env = dict(
        os.environ,
        CLOUDSDK_CONFIG=str(directory / "config"),
        CLOUDSDK_AUTH_ACCESS_TOKEN_FILE=str(directory / "token"),
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU=f"http://127.0.0.1:{server.server_port}/",
    )

    def run(argv):
        _FakeTpuApi.requests.clear()
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result, list(_FakeTpuApi.requests)

    yield run
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "provisioning, version, expected",
    [
        ("spot", "v2", {"spot": {}}),
        (
            "reserved",
            "v2",
            {"reservationName": "projects/proj/locations/us-east5-a/reservations/-"},
        ),
        ("best_effort", "v2alpha1", {"bestEffort": {}}),
    ],
)
def test_gcloud_create_sends_the_queued_resource(fake_gcloud, provisioning, version, expected):
    _, requests = fake_gcloud(pod.create_argv(make_job(provisioning=provisioning)))
    method, path, body = requests[0]
    assert method == "POST"
    assert path.startswith(f"/{version}/projects/proj/locations/us-east5-a/queuedResources?")
    assert "queuedResourceId=cirrus-test" in path
    for key, value in expected.items():
        assert body[key] == value
    (spec,) = body["tpu"]["nodeSpec"]
    assert spec["nodeId"] == "cirrus-test"
    assert spec["parent"] == "projects/proj/locations/us-east5-a"
    assert spec["node"]["acceleratorType"] == "v5p-64"
    assert spec["node"]["runtimeVersion"] == "v2-alpha-tpuv5"


def test_gcloud_describe_and_delete(fake_gcloud):
    result, requests = fake_gcloud(pod.describe_argv(make_job()))
    assert result.stdout.strip() == "ACTIVE"
    assert requests == [
        ("GET", "/v2/projects/proj/locations/us-east5-a/queuedResources/cirrus-test?alt=json", None)
    ]
    _, requests = fake_gcloud(pod.delete_argv(make_job()))
    method, path, _ = requests[0]
    assert method == "DELETE"
    assert path.startswith("/v2/projects/proj/locations/us-east5-a/queuedResources/cirrus-test?")
    assert "force=True" in path


def test_gcloud_accepts_the_ssh_and_scp_flags(fake_gcloud):
    """ssh/scp need a live VM; `--help` still parses the command group, and --dry-run of ssh
    would contact the API, so check each flag appears in the command's own help text."""
    job = make_job()
    for argv in (pod.ssh_argv(job, "run"), pod.scp_argv(job, "/a", "/b")):
        result, _ = fake_gcloud([*argv[:5], "--help"])
        text = result.stdout
        for flag in argv[5:]:
            if flag.startswith("--"):
                assert flag.split("=")[0] in text, flag
