"""All settings, in one place. Nothing else in semroute reads ``os.environ``.

Sources, highest priority first: explicit keyword arguments (CLI flags), environment variables
(``SEMROUTE_<SECTION>__<FIELD>``, e.g. ``SEMROUTE_ROUTER__K=10``), a YAML file given with
``--config`` (same nesting as the sections below), then the defaults here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from semroute.errors import ConfigError

# Served by default: the int8 export (see semroute.export._quantize for why). The fp32 export is
# the reference it is checked against (parity with sentence-transformers) and stays an option.
DEFAULT_ENCODER_DIR = Path("models/all-MiniLM-L6-v2-int8")
FP32_ENCODER_DIR = Path("models/all-MiniLM-L6-v2-onnx")
DEFAULT_INDEX_DIR = Path("index_data/build/default")
# The two-stage encoder's static model, distilled from the int8 encoder (semroute.static_encoder).
DEFAULT_STATIC_DIR = Path("models/all-MiniLM-L6-v2-int8-static")


class EncoderSettings(BaseModel):
    path: Path = DEFAULT_ENCODER_DIR
    threads: int = Field(2, ge=1, description="onnxruntime intra-op threads")
    spin: bool = Field(
        True,
        description="onnxruntime worker threads spin-wait between runs (lower latency when idle; "
        "off leaves the CPU to other threads under load)",
    )
    spin_us: int = Field(
        500, ge=0, description="how long onnxruntime's worker threads spin-wait, in microseconds "
        "(0: its own default)"
    )
    batch_size: int = Field(64, ge=1, description="texts per encoder batch when building")
    cache_size: int = Field(4096, ge=0, description="LRU cache of query embeddings (0 = off)")
    two_stage: bool = Field(
        True,
        description="let the static model decide alone where the index's leave-one-out gate "
        "says it agrees with the full encoder and, under a threshold, where its estimate of "
        "the full decision's confidence clears the cut fitted for it (semroute.two_stage); "
        "other queries run the full encoder. Only for labelled indexes built with a static "
        "model (`index build` adds one when `make setup` distilled it); otherwise no effect",
    )
    static_path: Path = Field(
        DEFAULT_STATIC_DIR,
        description="the static model (semroute.static_encoder) index builds embed exemplars "
        "with; at query time the one the index records is loaded if it still exists",
    )


class DecisionSettings(BaseModel):
    k: int = Field(10, ge=1, le=256, description="neighbours consulted per query")
    temperature: float = Field(
        0.05, gt=0, description="softmax temperature turning similarities into vote weights"
    )
    shrinkage: float = Field(
        1.0, ge=0, description="pseudo-count pulling outcome estimates toward each target's mean"
    )
    null_similarity: float | None = Field(
        0.35, description="similarity of the null pseudo-neighbour (far queries lose confidence)"
    )
    cost_weight: float = Field(
        0.0, ge=0, description="outcomes: utility = quality - cost_weight * cost / max cost"
    )
    local_k: int = Field(
        0,
        ge=0,
        le=256,
        description="outcomes: the closest local_k of the k neighbours are shrunk toward the "
        "whole neighbourhood's estimate (0 = off)",
    )
    local_shrinkage: float = Field(
        100.0, ge=0, description="outcomes: pseudo-count of the neighbourhood prior for local_k"
    )
    feedback_shrinkage: float | None = Field(
        None, ge=0, description="outcomes with rows learnt from feedback (one score each): "
        "pseudo-count of the fully scored rows' estimate against their evidence; None ignores "
        "them (a build with such rows tunes it)"
    )
    feedback_temperature: float = Field(
        0.05, gt=0, description="outcomes: how fast a feedback row's weight falls with its "
        "distance (a build with such rows tunes it)"
    )
    history_weight: float = Field(
        1.0, ge=0, description="weight of the most recent earlier turn (the query weighs 1)"
    )
    history_decay: float = Field(
        0.5, ge=0, le=1, description="each older turn weighs this much of the next newer one"
    )
    history_turns: int = Field(3, ge=0, description="earlier turns used at most")
    max_explain: int = Field(5, ge=0, description="neighbours returned when explain is asked")


class IndexSettings(BaseModel):
    # A flat search reads every vector per query (15 MB at 10k x 384 fp32, past the CPU caches):
    # ~0.8 ms at 10k here, while HNSW visits a few hundred vectors. On Banking77 (10k) HNSW32
    # with efSearch 64 gave 0.9237 vs 0.9240 exact (scripts/bench_route.py, docs/BENCHMARKS.md).
    exact_max: int = Field(
        5_000, ge=1, description="up to this many exemplars the index is exact (flat)"
    )
    approx_factory: str = Field(
        "HNSW32", description="FAISS factory string for larger indexes (inner product)"
    )
    hnsw_ef_search: int = Field(64, ge=1)
    faiss: Literal["auto", "flat", "hnsw-sq", "ivf-sq", "ivfpq"] = Field(
        "auto", description="FAISS index type (semroute.index_types): 'auto' is flat up to "
        "exact_max, approx_factory above; the others are opt-in for very large indexes, "
        "quantised and read memory-mapped (docs/BENCHMARKS.md, bench:scale)",
    )
    ivf_nprobe: int = Field(
        8, ge=1, description="inverted lists scanned per query by the ivf-sq and ivfpq types "
        "(at 1M ivf-sq exemplars, 8 of 1,024: recall@10 0.97; docs/BENCHMARKS.md, bench:scale)"
    )
    projection: Literal["auto", "none", "learned"] = Field(
        "auto",
        description="labelled indexes: 'learned' fits a linear projection on the exemplars at "
        "build time (stored in the index, applied to queries before the FAISS lookup); 'auto' "
        "lets the build's cross-validation decide (off when tuning is skipped)",
    )
    projection_epochs: int = Field(10, ge=1, description="training epochs of the projection")


class LimitSettings(BaseModel):
    max_query_chars: int = Field(8192, ge=1)
    max_history_turns: int = Field(16, ge=0)
    max_batch: int = Field(256, ge=1, description="queries per RouteBatch call")
    # Chat requests (both doors, one validator: semroute.dispatch.validate).
    max_messages: int = Field(256, ge=1, description="messages in one chat request")
    max_message_chars: int = Field(
        200_000, ge=1, description="characters in one chat message's content"
    )
    max_stop: int = Field(4, ge=0, description="stop sequences in one chat request")
    max_stop_chars: int = Field(256, ge=1, description="characters in one stop sequence")
    max_tokens: int = Field(
        131_072, ge=1, description="cap on a chat's max_tokens (a backend's own context, when "
        "configured, is checked as well)"
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="HTTP door: largest request body (413 above it)"
    )
    max_json_depth: int = Field(
        64, ge=4, description="HTTP door: deepest nesting of a JSON body (400 above it)"
    )
    batch_slice_tokens: int = Field(
        2048, ge=1, description="RouteBatch: work per slice (estimated tokens); slices of a big "
        "batch interleave with single Route calls so batches cannot starve them"
    )


def _split_commas(value: Any) -> Any:
    # SEMROUTE_AUTH__TOKENS=a,b is how operators write lists in env files; JSON lists also work.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


TokenList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


class AuthSettings(BaseModel):
    """Bearer tokens. Tokens come from env (comma-separated) or files (one per line)."""

    tokens: TokenList = Field(default_factory=list)
    tokens_file: Path | None = None
    admin_tokens: TokenList = Field(default_factory=list)
    admin_tokens_file: Path | None = None


class TlsSettings(BaseModel):
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = Field(None, description="set to require client certificates")


class RouterServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = Field(9464, description="0 disables the Prometheus endpoint")
    batch_max: int = Field(32, ge=1, description="concurrent Route calls coalesced per encoder run")
    batch_wait_ms: float = Field(1.0, ge=0, description="how long a batch waits to fill")
    workers: int = Field(2, ge=1, description="threads running encoder + FAISS")
    inline_when_idle: bool = Field(
        True, description="a lone call on an idle server runs on the event loop, skipping the "
        "hop to a worker thread (semroute.grpc.coalescer)"
    )
    processes: int = Field(
        1, ge=1, description="router processes on one port (SO_REUSEPORT), each with its own "
        "encoder; the index is memory-mapped and shared"
    )
    watch_interval_s: float = Field(2.0, ge=0, description="poll of DIR/current; 0 disables")
    grace_s: float = Field(10.0, ge=0, description="drain time on SIGTERM")
    # A candidate index beside the serving one (semroute.grpc.router_arms; docs/LOOP.md).
    candidate: Path | None = Field(None, description="candidate index root or version dir")
    candidate_mode: Literal["off", "shadow", "ab"] = Field(
        "shadow", description="shadow: decide every query off the response path; ab: serve a share"
    )
    candidate_share: float = Field(0.1, ge=0, le=1, description="ab: share of keys served by it")
    shadow_share: float = Field(
        1.0, ge=0, le=1, description="share of requests the shadow candidate also decides"
    )
    shadow_log_share: float = Field(
        0.1, ge=0, le=1, description="share of differing shadow decisions written to the log"
    )
    shadow_max_pending: int = Field(256, ge=1, description="shadow jobs queued before dropping")
    drift_window: int = Field(1000, ge=0, description="decisions in the live drift metrics; 0 off")


class DispatcherSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 50052
    metrics_port: int = 9465
    http_port: int = Field(0, description="OpenAI-compatible HTTP door; 0 = off (8000 in `serve`)")
    router: str = Field(
        "127.0.0.1:50051", description="router address: host:port, or several replicas as "
        "dns:///host:port or ipv4:a:port,b:port (see router_lb_policy)"
    )
    router_lb_policy: Literal["auto", "round_robin", "pick_first"] = Field(
        "auto", description="how router calls spread over the addresses `router` resolves to "
        "(semroute.grpc.balancing): auto is round_robin for dns: and multi-address ipv4:/ipv6: "
        "targets, gRPC's pick_first otherwise"
    )
    backends_file: Path = Path("deploy/backends.yaml")
    retries: int = Field(1, ge=0, description="extra attempts on the same target before the next")
    backoff_s: float = Field(0.1, ge=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(10.0, gt=0)
    explore_rate: float = Field(
        0.0, ge=0, le=1, description="share of routed requests served by another target of "
        "their chain (Thompson-drawn, within explore_tolerance; semroute.explore), recorded as "
        "explored in the decision log so `semroute learn` gets feedback on rarely chosen "
        "targets; 0 = off"
    )
    explore_tolerance: float = Field(
        0.1, ge=0, le=1, description="exploration serves only targets whose predicted quality "
        "is within this of the chosen one's (outcome indexes)"
    )
    rules_file: Path | None = None
    router_token: str | None = Field(
        None, description="bearer token for the router's auth (prefer router_token_file or the "
        "SEMROUTE_DISPATCHER__ROUTER_TOKEN variable: a command-line value shows in `ps`)"
    )
    router_token_file: Path | None = Field(
        None, description="file holding the router's bearer token (first non-comment line)"
    )
    router_tls_ca: Path | None = Field(None, description="CA file: reach the router over TLS")
    router_timeout_s: float = Field(5.0, gt=0, description="deadline of each router call")
    router_retry_backoff_s: float = Field(
        0.05, ge=0, description="wait before the one retry of a router call that could not "
        "connect or found its replica not ready (jittered)"
    )
    router_breaker_failures: int = Field(
        3, ge=1, description="consecutive unreachable router calls that open its breaker"
    )
    router_breaker_cooldown_s: float = Field(
        2.0, gt=0, description="while the router's breaker is open, chats use fallback_targets "
        "without trying the router; then one probe call"
    )
    fallback_targets: list[str] = Field(
        default_factory=list, description="the chain used when the router cannot be reached "
        "(empty: every local backend, then the others, in backends-file order)"
    )
    first_token_budget_s: float = Field(
        60.0, gt=0, description="total time to the first token across the whole chain "
        "(retries and failovers included); the client's deadline when shorter"
    )
    max_retry_after_s: float = Field(
        10.0, ge=0, description="longest backend Retry-After waited for on the same target "
        "(longer: next target, and the backend is held off for that long)"
    )
    grace_s: float = Field(10.0, ge=0, description="drain time on SIGTERM")
    route_max_chars: int = Field(
        2048, ge=1, description="characters of each user turn sent to the router (the encoder "
        "reads about 256 tokens anyway): long prompts are routed on their beginning"
    )
    route_history_turns: int = Field(8, ge=0, description="earlier user turns sent to the router")


class LoopSettings(BaseModel):
    decision_log: str = Field(
        "sqlite:state/decisions.db",
        description="where the dispatcher records every routed request and its feedback: "
        "sqlite:PATH (embedded, one machine), postgresql://... (shared by replicas), '' = off",
    )
    retention_days: float = Field(30.0, ge=0, description="log rows older than this are purged")
    queue: int = Field(
        10_000, ge=1, description="rows waiting for the writer; past this, rows are dropped "
        "and counted (a slow database never blocks a request)"
    )


class LogSettings(BaseModel):
    level: str = "INFO"
    json_logs: bool = Field(True, alias="json")
    log_query_text: bool = Field(False, description="log query text (off: hash + length only)")


class CacheSettings(BaseModel):
    """The dispatcher's response cache (exact tier): identical requests of one tenant get the
    stored answer replayed instead of a backend call."""

    model_config = {"extra": "forbid"}  # a misspelt key is an error, not silently ignored

    exact: bool = Field(False, description="cache answers by the normalised request (the "
                        "stack `make serve` / `make demo` start turns it on)")
    ttl_s: float = Field(3600.0, gt=0, description="how long an answer is served from cache")
    max_entries: int = Field(
        10_000, ge=1, description="in process: entries kept, least recently used evicted "
        "(with Redis: bound it with Redis's maxmemory + allkeys-lru)"
    )
    max_answer_chars: int = Field(
        100_000, ge=1, description="longer answers are not stored"
    )
    sampled: bool = Field(
        False, description="also cache requests with temperature > 0 (a sampled answer "
        "replayed is no longer a sample); unset temperature and 0 are cached"
    )
    semantic: bool = Field(
        False, description="semantic tier: a single-turn question close enough to a cached one "
        "gets its answer; needs the router's query embedding (an in-process router gives it)"
    )
    semantic_threshold: float = Field(
        0.95, ge=0.5, le=1.0, description="cosine similarity a semantic hit needs (0.95: false "
        "hits under 1% with 95% confidence on the pairs in docs/CACHE.md)"
    )
    semantic_route_thresholds: dict[str, Annotated[float, Field(ge=0.5, le=1.0)]] = Field(
        default_factory=dict, description="per-route thresholds (route name -> similarity)"
    )


class TenantLimits(BaseModel):
    """One tenant's limits; None = no limit."""

    model_config = {"extra": "forbid"}

    usd_per_day: float | None = Field(None, gt=0, description="spend per UTC day")
    usd_per_month: float | None = Field(None, gt=0, description="spend per UTC calendar month")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens")


class BudgetSettings(BaseModel):
    """Per-tenant budgets and rate limits (tenants: the names in auth.tokens_file)."""

    model_config = {"extra": "forbid"}  # a misspelt key is an error, not silently ignored

    default: TenantLimits = Field(
        default_factory=TenantLimits, description="limits of every tenant not listed in tenants"
    )
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)
    completion_estimate_tokens: int = Field(
        512, ge=1, description="completion tokens assumed by the pre-call budget check when "
        "the request sets no max_tokens"
    )


class StateSettings(BaseModel):
    """Where the cache, budgets and rate-limit counters live."""

    model_config = {"extra": "forbid"}  # a misspelt key is an error, not silently ignored

    url: str = Field(
        "", description="'' = in this process; redis://host:port/db = shared by replicas"
    )
    timeout_s: float = Field(0.5, gt=0, description="deadline of each Redis call (connect included)")
    retry_s: float = Field(
        2.0, ge=0, description="after a Redis failure, serve from the local view this long "
        "before trying Redis again"
    )
    key_prefix: str = Field("semroute", min_length=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEMROUTE_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    encoder: EncoderSettings = EncoderSettings()
    decision: DecisionSettings = DecisionSettings()
    index: IndexSettings = IndexSettings()
    limits: LimitSettings = LimitSettings()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    router_server: RouterServerSettings = RouterServerSettings()
    dispatcher: DispatcherSettings = DispatcherSettings()
    loop: LoopSettings = LoopSettings()
    log: LogSettings = LogSettings()
    cache: CacheSettings = CacheSettings()
    budgets: BudgetSettings = BudgetSettings()
    state: StateSettings = StateSettings()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from a YAML file (optional), the environment, and explicit overrides.

    Raises ConfigError naming the file and field on any invalid value.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{config_file}: cannot read config file: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_file}: invalid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: top level must be a mapping of sections")
        data = loaded
    explicit: dict[str, Any] = {}
    for dotted, value in overrides.items():
        section, _, name = dotted.partition("__")
        explicit.setdefault(section, {})[name] = value
    try:
        # Environment beats the file and explicit overrides beat both, so merge by hand.
        merged = _merge(_merge(data, _explicit(Settings())), explicit)
        return Settings(**merged)
    except SettingsError as exc:
        raise ConfigError(f"invalid SEMROUTE_* environment variable: {exc}") from exc
    except ValidationError as exc:
        where = f"{config_file}: " if config_file else ""
        lines = [f"{where}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from exc


def _explicit(settings: Settings) -> dict[str, Any]:
    """Only the values that were set from the environment (not defaults)."""
    out: dict[str, Any] = {}
    for name in settings.model_fields_set:
        section = getattr(settings, name)
        out[name] = section.model_dump(exclude_unset=True, by_alias=True)
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
