"""Serves a model over the OpenAI API (completions, chat completions) on 127.0.0.1:8000.

  python -m launch.serve --workdir=DIR                 # a Cirrus run (latest checkpoint)
  python -m launch.serve --from_hf=DIR                 # a Hugging Face model directory
  python -m launch.serve --from_gguf=FILE              # a llama.cpp GGUF file
      [--host=127.0.0.1 --port=8000 --model_name=NAME --api_keys_file=FILE
       --rate_limit_rpm=0 --rate_limit_tpm=0 --max_request_kb=1024 --log_prompts
       --mesh_shape=1,1,2 --gin_bindings='serve.num_slots=16']

Then `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`. API keys come from
--api_keys_file (one per line, # comments) and $CIRRUS_API_KEYS (comma-separated); with none,
no key is needed. `serve.*` gin bindings set the EngineConfig (slots, context, queue, prefix
cache, watchdog). GET /ready answers 200 once the engine has compiled. SIGTERM or Ctrl-C: stop
taking connections, let in-flight requests finish (at most --drain_timeout_s; what is still
running then gets a 503 "shutting down, retry"), exit 0. If the
engine fails (it died, or a device call hung past serve.watchdog_s), /health and /ready
answer 503, in-flight requests get errors, and the process exits with code 3.
"""

import os
import signal
import sys
import threading
import time

from absl import app, flags, logging

from launch import cli
from launch import config as gin_config
from research.errors import UserError

FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face model directory to serve.")
FROM_GGUF = flags.DEFINE_string("from_gguf", None, "GGUF file to serve.")
HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 = every one).")
PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "The model id clients send (default: the source's base name)."
)
API_KEYS_FILE = flags.DEFINE_string("api_keys_file", None, "File of API keys, one per line.")
RATE_LIMIT_RPM = flags.DEFINE_integer("rate_limit_rpm", 0, "Requests per minute per key.")
RATE_LIMIT_TPM = flags.DEFINE_integer("rate_limit_tpm", 0, "Tokens per minute per key.")
MAX_REQUEST_KB = flags.DEFINE_integer("max_request_kb", 1024, "Largest request body (KiB).")
LOG_PROMPTS = flags.DEFINE_bool(
    "log_prompts",
    False,
    "Log each request's prompt and output text on the console (and WORKDIR/logs/serve.log), "
    "redacted: the server's API keys, bearer / API-key-like tokens, e-mail addresses, phone "
    "numbers, IP addresses and card numbers become placeholders. Off: only request ids and "
    "token counts, in the log file.",
)
MESH_SHAPE = flags.DEFINE_string(
    "mesh_shape", None, "(data, fsdp, tensor) mesh for tensor-parallel serving, e.g. 1,1,2."
)
DRAIN_TIMEOUT_S = flags.DEFINE_float(
    "drain_timeout_s", 30.0, "On SIGTERM: how long in-flight requests may take to finish."
)
EXIT_ON_FAILURE_S = flags.DEFINE_float(
    "exit_on_failure_s",
    2.0,
    "When the engine fails (dies, or a device call hangs past serve.watchdog_s): exit with "
    "code 3 this many seconds later, so the replica is restarted; < 0 = keep running (then "
    "/health answers 503).",
)
EXIT_ENGINE_FAILED = 3
KEYS_ENV = "CIRRUS_API_KEYS"


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; see --helpfull.")
    sources = [(name, value) for name, value in (("workdir", cli.WORKDIR.value),
               ("from_hf", FROM_HF.value), ("from_gguf", FROM_GGUF.value)) if value]  # fmt: skip
    if len(sources) != 1:
        raise UserError(
            "give exactly one model: --workdir=DIR (a Cirrus run), --from_hf=DIR or "
            f"--from_gguf=FILE; got {[f'--{name}' for name, _ in sources] or 'none'}."
        )
    kind, source = sources[0]
    for name, value in (("rate_limit_rpm", RATE_LIMIT_RPM.value),
                        ("rate_limit_tpm", RATE_LIMIT_TPM.value)):  # fmt: skip
        if value < 0:
            raise UserError(f"--{name}={value} must be >= 0 (0 = unlimited).")
    if MAX_REQUEST_KB.value < 1:
        raise UserError(f"--max_request_kb={MAX_REQUEST_KB.value} must be >= 1.")
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)

    from research.serving.engine import Engine, EngineConfig

    engine_config = gin_config.build(EngineConfig)
    engine_config.check()
    api_keys = read_api_keys(API_KEYS_FILE.value, os.environ.get(KEYS_ENV, ""))
    mesh = cli.device_mesh(MESH_SHAPE.value)
    model_name = MODEL_NAME.value or default_model_name(source)

    import uvicorn

    from research.serving.engine import ServingMetrics
    from research.serving.http.endpoints import PROMPT_LOGGER
    from research.serving.http.server import create_app

    cli.enable_compilation_cache()
    loaded = load(kind, source, mesh)
    if loaded.tokenizer is None:
        raise UserError(f"{source} has no tokenizer; serving needs one to read and write text.")
    engine = Engine(
        loaded.model_config,
        loaded.graphdef,
        loaded.params,
        loaded.tokenizer,
        engine_config,
        mesh=mesh,
        metrics=ServingMetrics(model_name),
    )
    loaded.params = None  # The engine's Sampler holds them (repacked for decode on CPU).
    application = create_app(
        engine,
        model_name=model_name,
        api_keys=api_keys,
        rate_limit_rpm=RATE_LIMIT_RPM.value,
        rate_limit_tpm=RATE_LIMIT_TPM.value,
        max_request_bytes=MAX_REQUEST_KB.value * 1024,
        chat_template=loaded.chat_template,
        log_prompts=LOG_PROMPTS.value,
    )
    _log(
        f"serving {model_name!r} ({kind} {source}): context {engine.max_len}, "
        f"{engine_config.num_slots} slots, "
        f"{'API keys required' if api_keys else 'no API keys'}, "
        f"chat template {'from the tokenizer' if loaded.chat_template else 'default ChatML'}; "
        f"http://{HOST.value}:{PORT.value}/v1 (ready once compiled: GET /ready)"
    )
    if LOG_PROMPTS.value:
        cli.show_on_console(PROMPT_LOGGER)
        _log("--log_prompts: prompts and completions are logged, redacted (scrubbed PII, keys)")
    if not api_keys and HOST.value not in ("127.0.0.1", "localhost", "::1"):
        _log(
            f"warning: listening on {HOST.value} without API keys: anyone who reaches the port "
            f"can use the model; set --api_keys_file or ${KEYS_ENV}."
        )
    engine.start()  # Compiles on its thread while /health and /ready already answer.
    server = uvicorn.Server(
        uvicorn.Config(
            application,
            host=HOST.value,
            port=PORT.value,
            log_level="info" if cli.SHOW_LIBRARY_LOGS.value else "warning",
            timeout_graceful_shutdown=max(1, int(DRAIN_TIMEOUT_S.value)),
        )
    )
    # uvicorn catches SIGTERM / SIGINT (stop accepting, finish in-flight requests) and
    # re-raises them once it returns; these handlers make that re-raise a no-op so the engine
    # drains and the process exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if EXIT_ON_FAILURE_S.value >= 0:
        threading.Thread(target=_stop_on_failure, args=(engine, server), daemon=True).start()
    threading.Thread(target=_drain_with_server, args=(engine, server), daemon=True).start()
    server.run()
    if engine.error:
        _log(f"error: {engine.error}; exiting with code {EXIT_ENGINE_FAILED} to be restarted")
        # At once: the engine thread may be stuck in a device call that never returns.
        os._exit(EXIT_ENGINE_FAILED)
    _log("shutting down: draining the engine")
    engine.shutdown(DRAIN_TIMEOUT_S.value)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # Drained; nothing is left for the interpreter's teardown to wait for.


def _drain_with_server(engine, server) -> None:
    """Once uvicorn starts its graceful shutdown (SIGTERM / Ctrl-C), the engine drains too,
    with a deadline a little before uvicorn's: a request still running then ends with a 503
    the client can retry elsewhere, not a bare 500 from uvicorn cancelling it."""
    while not server.should_exit:
        time.sleep(0.2)
    engine.begin_shutdown(max(0.0, DRAIN_TIMEOUT_S.value - 2.0))


def _stop_on_failure(engine, server) -> None:
    """Once the engine fails (in-flight requests got their errors), stops uvicorn so the
    process exits non-zero and the orchestrator restarts the replica."""
    engine.wait_failed()
    time.sleep(EXIT_ON_FAILURE_S.value)  # Lets the error responses reach their clients.
    server.should_exit = True


def read_api_keys(path: str | None, env_value: str) -> tuple[str, ...]:
    """Keys from a file (one per line; blank lines and # comments skipped) and a
    comma-separated environment value."""
    keys = [k.strip() for k in env_value.split(",") if k.strip()]
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--api_keys_file={path!r} does not exist; give a file of keys.")
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        file_keys = [line for line in lines if line and not line.startswith("#")]
        if not file_keys:
            raise UserError(f"--api_keys_file={path!r} holds no keys (one key per line).")
        keys += file_keys
    return tuple(dict.fromkeys(keys))


def default_model_name(source: str) -> str:
    name = os.path.basename(os.path.normpath(source.rstrip("/")))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def load(kind: str, source: str, mesh):
    """The LoadedModel of the source (research.checkpoint.load, the one loader)."""
    from research.checkpoint import load as load_source

    if kind == "from_hf" and source.endswith(".gguf"):
        raise UserError(f"--from_hf={source!r} is a GGUF file; use --from_gguf.")
    if kind == "from_gguf" and not source.endswith(".gguf"):
        raise UserError(f"--from_gguf={source!r} does not end in .gguf; give a GGUF file.")
    if kind == "from_hf" and not os.path.isfile(os.path.join(source, "config.json")):
        raise UserError(f"--from_hf={source!r} has no config.json; give a Hugging Face model dir.")
    return load_source(source, mesh=mesh, log=_log)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    app.run(cli.guarded(main))
