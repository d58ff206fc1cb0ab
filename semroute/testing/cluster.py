"""A local multi-replica semroute cluster for ``make cluster`` and the e2e scale-out test.

On 127.0.0.1, every part a real process on a free port (or the port asked for):

- one Redis (``semroute.testing.redis``): the dispatchers' shared cache, budgets, rate limits;
- the LLM backends: fault servers (``semroute.testing.faultserver``, canned answers, no model)
  or one llama.cpp server serving every local target (``fake_llm=False``);
- ``routers`` router replicas (``semroute serve router``) on one index;
- nginx (Debian package) in front of them as the L7 gRPC load balancer, and in front of the
  dispatchers' gRPC and OpenAI HTTP doors (``semroute.testing.cluster_config`` says how it
  retries and takes failed replicas out);
- ``dispatchers`` dispatchers whose router is nginx, with their state in the Redis;
- Prometheus (Debian package) scraping every process: the routers', the dispatchers' and its own
  metrics ports, nginx and Redis through their exporters (Debian packages
  ``prometheus-nginx-exporter``, ``prometheus-redis-exporter``).

Process handling is ``semroute.testing.devstack``'s: each child is started from the calling
thread in its own session with PR_SET_PDEATHSIG (nothing outlives the parent, even a SIGKILLed
one), logs to a file in ``log_dir`` (generated configuration is there too), and a child that dies
while starting raises ``StackError`` with its log's tail. ``stop()`` stops the dispatchers first,
then everything else, within ``STOP_TIMEOUT_S``. nginx is the exception to plain PDEATHSIG: see
``semroute.testing.nginx``.

For tests: ``kill_router`` / ``kill_dispatcher`` (SIGKILL) and ``replace_router`` (a rolling
replacement, e.g. onto a new index version).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from semroute.errors import StackError
from semroute.testing import cluster_config as conf
from semroute.testing.devstack import (
    DEFAULT_BACKENDS_TEMPLATE,
    LOCAL_TARGETS,
    LOOPBACK,
    STOP_TIMEOUT_S,
    GrpcService,
    LlamaServer,
    ManagedProcess,
    _grpc_serving,
    _http_ok,
    _semroute_cli,
    child_env,
    free_port,
    start_llama,
    wait_until,
    write_backends,
)
from semroute.testing.nginx import NginxProcess, can_namespace, nginx_argv
from semroute.testing.redis import RedisServer, start_redis

DEFAULT_SETTINGS_TEMPLATE = Path("deploy/stack.yaml")
PROMETHEUS_LOADED = "Completed loading of configuration file"
# Several replicas share few cores: one onnxruntime thread each, and no spin-waiting.
REPLICA_ENV = {"SEMROUTE_ENCODER__THREADS": "1", "SEMROUTE_ENCODER__SPIN": "false"}
# Where Debian puts the binaries; /usr/sbin is not on every user's PATH.
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
_PACKAGES = {
    "nginx": "nginx",
    "prometheus": "prometheus",
    "prometheus-nginx-exporter": "prometheus-nginx-exporter",
    "prometheus-redis-exporter": "prometheus-redis-exporter",
}


def find_binary(name: str) -> str:
    """Absolute path of ``name``; StackError naming the Debian package when it is missing."""
    found = shutil.which(name, path=_SBIN)
    if found is None:
        raise StackError(f"{name} is not installed: run `make setup` (Debian package "
                         f"{_PACKAGES.get(name, name)})")
    return found


@dataclass
class ClusterOptions:
    """The shape of the cluster. Ports of 0 are chosen free at start."""

    routers: int = 3
    dispatchers: int = 2
    fake_llm: bool = True
    llm_delay_s: float = 0.0  # fault servers: time before the first token
    llm_chunks: int = 8  # fault servers: chunks per answer ("tok0 tok1 ... ")
    llm_chunk_delay_s: float = 0.0
    scrape_interval_s: float = 2.0
    router_lb_port: int = 0
    dispatcher_lb_port: int = 0
    http_port: int = 0
    prometheus_port: int = 0
    backends_template: Path = DEFAULT_BACKENDS_TEMPLATE
    settings_template: Path = DEFAULT_SETTINGS_TEMPLATE


@dataclass
class Cluster:
    """A running cluster (see the module docstring). Use as a context manager or ``stop()``."""

    log_dir: Path
    index: Path
    encoder: Path | None
    env: dict[str, str]
    scrape_interval_s: float = 2.0
    ports: dict[str, int] = field(default_factory=dict)
    redis: RedisServer | None = None
    llms: dict[str, LlamaServer] = field(default_factory=dict)
    routers: list[GrpcService] = field(default_factory=list)
    dispatchers: list[GrpcService] = field(default_factory=list)
    nginx: NginxProcess | None = None
    exporters: list[ManagedProcess] = field(default_factory=list)
    prometheus: ManagedProcess | None = None
    killed: set[str] = field(default_factory=set)

    # ---- addresses ----------------------------------------------------------------------------

    @property
    def router_address(self) -> str:
        """The routers behind nginx (gRPC)."""
        return f"{LOOPBACK}:{self.ports['router_lb']}"

    @property
    def dispatcher_address(self) -> str:
        """The dispatchers' gRPC behind nginx."""
        return f"{LOOPBACK}:{self.ports['dispatcher_lb']}"

    @property
    def http_url(self) -> str:
        """The dispatchers' OpenAI doors behind nginx (base URL, ends in ``/v1``)."""
        return f"http://{LOOPBACK}:{self.ports['http']}/v1"

    @property
    def prometheus_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['prometheus']}"

    # ---- start --------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        log_dir: Path,
        *,
        index: Path,
        encoder: Path | None = None,
        options: ClusterOptions | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Cluster:
        """Start the whole cluster and wait until every part is ready. On any failure what was
        started is stopped before the error propagates."""
        opts = options or ClusterOptions()
        say = progress or (lambda _msg: None)
        binaries = {name: find_binary(name) for name in _PACKAGES}  # fail before starting any
        cluster = cls(log_dir=log_dir, index=index, encoder=encoder,
                      env=child_env(extra=REPLICA_ENV), scrape_interval_s=opts.scrape_interval_s)
        try:
            cluster._start(opts, binaries, say)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, opts: ClusterOptions, binaries: dict[str, str],
               say: Callable[[str], None]) -> None:
        self.ports = {
            "router_lb": opts.router_lb_port or free_port(),
            "dispatcher_lb": opts.dispatcher_lb_port or free_port(),
            "http": opts.http_port or free_port(),
            "status": free_port(),
            "prometheus": opts.prometheus_port or free_port(),
        }
        say("starting redis")
        self.redis = start_redis()
        say("starting LLM backends")
        urls = self._start_llms(opts)
        backends = write_backends(opts.backends_template, self.log_dir / "backends.yaml", urls)
        settings = conf.write_yaml(
            self.log_dir / "dispatcher.yaml",
            conf.dispatcher_settings(opts.settings_template, state_url=self.redis.url),
            "semroute.testing.cluster",
        )
        self.routers = [self._router(i, free_port(), free_port(), self.index)
                        for i in range(opts.routers)]
        self.dispatchers = [self._dispatcher(i, backends, settings)
                            for i in range(opts.dispatchers)]
        say("starting nginx")
        self._start_nginx(binaries["nginx"])
        say(f"starting {opts.routers} routers and {opts.dispatchers} dispatchers")
        for service in [*self.routers, *self.dispatchers]:
            service.start()
        for service in [*self.routers, *self.dispatchers]:
            self._await_serving(service)
        for door in self.dispatchers:
            url = f"http://{LOOPBACK}:{door.http_port}/healthz"
            wait_until(door, lambda u=url: _http_ok(u), 60.0, "answering on its HTTP port")
        say("starting Prometheus and the exporters")
        self._start_prometheus(binaries)

    def _start_llms(self, opts: ClusterOptions) -> dict[str, str]:
        if not opts.fake_llm:
            server = start_llama(LOCAL_TARGETS[0], self.log_dir, env=self.env)
            self.llms[LOCAL_TARGETS[0]] = server
            return {alias: server.url for alias in LOCAL_TARGETS}
        for alias in LOCAL_TARGETS:
            port = free_port()
            mode = "slow" if opts.llm_delay_s > 0 else "normal"
            server = LlamaServer(
                name=f"fake-llm[{alias}]",
                argv=[sys.executable, "-m", "semroute.testing.faultserver", "--port", str(port),
                      "--model", alias, "--mode", mode, "--delay", str(opts.llm_delay_s),
                      "--chunks", str(opts.llm_chunks),
                      "--chunk-delay", str(opts.llm_chunk_delay_s)],
                log_path=self.log_dir / f"fake-llm-{alias}.log", env=self.env,
                alias=alias, port=port,
            )
            self.llms[alias] = server
            server.start()
        for server in self.llms.values():
            wait_until(server, lambda s=server: _http_ok(f"{s.url}/models"), 30.0, "ready")
        return {alias: server.url for alias, server in self.llms.items()}

    def _router(self, i: int, port: int, metrics_port: int, index: Path) -> GrpcService:
        argv = [*_semroute_cli(sys.executable), "serve", "router", "--index", str(index),
                "--host", LOOPBACK, "--port", str(port), "--metrics-port", str(metrics_port)]
        if self.encoder is not None:
            argv += ["--encoder", str(self.encoder)]
        return GrpcService(name=f"router-{i}", argv=argv, log_path=self.log_dir / f"router-{i}.log",
                           env=self.env, port=port, metrics_port=metrics_port)

    def _dispatcher(self, i: int, backends: Path, settings: Path) -> GrpcService:
        port, metrics_port, http_port = free_port(), free_port(), free_port()
        argv = [*_semroute_cli(sys.executable), "serve", "dispatcher",
                "--router", self.router_address, "--backends", str(backends),
                "--config", str(settings), "--host", LOOPBACK, "--port", str(port),
                "--metrics-port", str(metrics_port), "--http-port", str(http_port)]
        return GrpcService(name=f"dispatcher-{i}", argv=argv,
                           log_path=self.log_dir / f"dispatcher-{i}.log", env=self.env,
                           port=port, metrics_port=metrics_port, http_port=http_port)

    def _await_serving(self, service: GrpcService) -> None:
        wait_until(service, lambda: _grpc_serving(service.address), 90.0, "SERVING")

    def _write_nginx_conf(self) -> Path:
        prefix = self.log_dir / "nginx"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        path = prefix / "nginx.conf"
        path.write_text(conf.nginx_conf(
            prefix,
            listen={"router": self.ports["router_lb"], "dispatcher": self.ports["dispatcher_lb"],
                    "http": self.ports["http"], "status": self.ports["status"]},
            routers=[r.port for r in self.routers],
            dispatchers=[d.port for d in self.dispatchers],
            doors=[d.http_port for d in self.dispatchers],
            master=can_namespace(),
        ))
        return path

    def _start_nginx(self, binary: str) -> None:
        path = self._write_nginx_conf()
        self.nginx = NginxProcess(
            name="nginx", argv=nginx_argv(binary, path, namespaced=can_namespace()),
            log_path=self.log_dir / "nginx.log", env=self.env,
            error_log=path.parent / "error.log", namespaced=can_namespace(),
        )
        self.nginx.start()
        status = f"http://{LOOPBACK}:{self.ports['status']}/stub_status"
        wait_until(self.nginx, lambda: _http_ok(status), 20.0, "answering")

    def _write_prometheus_conf(self) -> Path:
        jobs = {
            "router": {r.name: r.metrics_port for r in self.routers},
            "dispatcher": {d.name: d.metrics_port for d in self.dispatchers},
            "nginx": {"nginx": self.ports["nginx_exporter"]},
            "redis": {"redis": self.ports["redis_exporter"]},
            "prometheus": {"prometheus": self.ports["prometheus"]},
        }
        return conf.write_yaml(
            self.log_dir / "prometheus.yml",
            conf.prometheus_config(jobs, scrape_interval_s=self.scrape_interval_s),
            "semroute.testing.cluster",
        )

    def _start_prometheus(self, binaries: dict[str, str]) -> None:
        assert self.redis is not None
        nginx_exp = self.ports["nginx_exporter"] = free_port()
        redis_exp = self.ports["redis_exporter"] = free_port()
        self.exporters = [
            ManagedProcess(
                name="nginx-exporter",
                argv=[binaries["prometheus-nginx-exporter"], "-nginx.scrape-uri",
                      f"http://{LOOPBACK}:{self.ports['status']}/stub_status",
                      "-web.listen-address", f"{LOOPBACK}:{nginx_exp}"],
                log_path=self.log_dir / "nginx-exporter.log", env=self.env),
            ManagedProcess(
                name="redis-exporter",
                argv=[binaries["prometheus-redis-exporter"], "-redis.addr",
                      f"redis://{LOOPBACK}:{self.redis.port}",
                      "-web.listen-address", f"{LOOPBACK}:{redis_exp}"],
                log_path=self.log_dir / "redis-exporter.log", env=self.env),
        ]
        path = self._write_prometheus_conf()
        self.prometheus = ManagedProcess(
            name="prometheus",
            argv=[binaries["prometheus"], f"--config.file={path}",
                  f"--storage.tsdb.path={self.log_dir / 'prometheus-data'}",
                  f"--web.listen-address={LOOPBACK}:{self.ports['prometheus']}"],
            log_path=self.log_dir / "prometheus.log", env=self.env,
        )
        for proc in [*self.exporters, self.prometheus]:
            proc.start()
        for proc, port in zip(self.exporters, (nginx_exp, redis_exp), strict=True):
            url = f"http://{LOOPBACK}:{port}/metrics"
            wait_until(proc, lambda u=url: _http_ok(u), 20.0, "serving metrics")
        ready = f"{self.prometheus_url}/-/ready"
        wait_until(self.prometheus, lambda: _http_ok(ready), 60.0, "ready")

    # ---- faults -------------------------------------------------------------------------------

    def kill_router(self, i: int) -> None:
        """SIGKILL router replica ``i`` (no drain); it stays down."""
        self._kill(self.routers[i])

    def kill_dispatcher(self, i: int) -> None:
        """SIGKILL dispatcher ``i``; its streams break mid-way; it stays down."""
        self._kill(self.dispatchers[i])

    def _kill(self, proc: ManagedProcess) -> None:
        self.killed.add(proc.name)
        if proc.popen is not None and proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(10)

    def replace_router(self, i: int, index: Path | None = None) -> GrpcService:
        """Replace router replica ``i`` without losing a call, as a rolling update with one
        surge pod does: start a new replica (on ``index``, e.g. a new version, or the old one's)
        on new ports, wait until it is SERVING, point nginx and Prometheus at it (both reload
        their configuration on SIGHUP), then drain the old one. A replica restarted in place
        would be sent calls while it is still loading its index (nginx has no active health
        checks), and those calls would fail with NotReady. Needs nginx with a master
        (``semroute.testing.nginx``)."""
        old = self.routers[i]
        new = self._router(i, free_port(), free_port(),
                           index or Path(old.argv[old.argv.index("--index") + 1]))
        new.start()
        try:
            self._await_serving(new)
        except BaseException:
            new.stop()
            raise
        self.routers[i] = new
        assert self.nginx is not None
        self._write_nginx_conf()
        self.nginx.reload()
        self._write_prometheus_conf()
        self._reload_prometheus()
        old.stop()
        return new

    def _reload_prometheus(self, timeout: float = 20.0) -> None:
        """SIGHUP Prometheus and wait until its log says it loaded the configuration again."""
        proc = self.prometheus
        assert proc is not None and proc.popen is not None

        def loaded() -> int:
            return proc.log_path.read_text(errors="replace").count(PROMETHEUS_LOADED)

        before = loaded()
        proc.popen.send_signal(signal.SIGHUP)
        wait_until(proc, lambda: loaded() > before, timeout, "reloaded")

    # ---- lifecycle ----------------------------------------------------------------------------

    def processes(self) -> list[ManagedProcess]:
        """Every managed child in start order (Redis is apart: ``self.redis``)."""
        procs: list[ManagedProcess] = [*self.llms.values()]
        procs += [p for p in (self.nginx,) if p is not None]
        procs += [*self.routers, *self.dispatchers, *self.exporters]
        procs += [p for p in (self.prometheus,) if p is not None]
        return procs

    def first_dead(self) -> str | None:
        """What stopped on its own (not through ``kill_*``), with its log's tail; None if
        everything runs."""
        for proc in self.processes():
            if proc.name not in self.killed and not proc.alive():
                return str(proc.fail("stopped unexpectedly"))
        if self.redis is not None and self.redis.process.poll() is not None:
            return f"redis-server stopped unexpectedly (exit code {self.redis.process.poll()})"
        return None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Dispatchers first (up to half the time, so no chat meets a dead router), then the
        rest at once; whatever still runs at the deadline is killed."""
        deadline = time.monotonic() + timeout
        for service in self.dispatchers:
            service.interrupt()
        for service in self.dispatchers:
            service.wait_or_kill(time.monotonic() + timeout / 2)
        rest = list(reversed(self.processes()))
        for proc in rest:
            proc.interrupt()
        for proc in rest:
            proc.wait_or_kill(deadline)
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(cluster: Cluster) -> Sequence[str]:
    """One line per endpoint, for a banner."""
    lines = [
        f"  routers (gRPC, via nginx)      {cluster.router_address}",
        f"  dispatchers (gRPC, via nginx)  {cluster.dispatcher_address}",
        f"  OpenAI HTTP (via nginx)        {cluster.http_url}",
        f"  Prometheus                     {cluster.prometheus_url}",
    ]
    lines += [f"    {r.name:<14} {r.address} (metrics :{r.metrics_port})" for r in cluster.routers]
    lines += [f"    {d.name:<14} {d.address} (metrics :{d.metrics_port}, HTTP :{d.http_port})"
              for d in cluster.dispatchers]
    if cluster.redis is not None:
        lines.append(f"    redis          {cluster.redis.url}")
    lines += [f"    {alias:<14} {s.url}" for alias, s in cluster.llms.items()]
    return lines
