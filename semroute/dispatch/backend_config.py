"""LLM backends' configuration: ``backends.yaml`` read and checked into ``BackendConfig`` records.

``backends.yaml`` names each target the router may pick and says how to reach it::

    backends:
      local-small:
        base_url: http://127.0.0.1:8081/v1   # what the OpenAI SDK calls base_url (ends in /v1)
        model: smollm2                        # the "model" field sent upstream
        local: true                           # runs on our machines: allowed for sensitive prompts
        max_concurrency: 4                    # in-flight requests to this backend
        input_cost: 0.0                       # USD per 1M prompt tokens
        output_cost: 0.0                      # USD per 1M completion tokens
        timeouts: {connect: 2, first_token: 30, idle: 30, total: 300}   # seconds
        context_tokens: 2048                  # optional: the model's context window; longer
                                              # requests are refused (400) before the call
      gpt-4o-mini:
        base_url: https://api.openai.com/v1
        model: gpt-4o-mini
        api_key_env: OPENAI_API_KEY           # the variable's NAME; never the key itself
        input_cost: 0.15
        output_cost: 0.60

A target whose ``api_key_env`` variable is unset is skipped (``BackendPool.skipped`` says why);
the dispatcher moves past it like any other unavailable target.

Every problem in the file is reported at once, each naming the backend and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from semroute.errors import (
    ConfigError,
)
from semroute.types import Target
from semroute.yamlfile import StrictModel, line_of, read_yaml, validate


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``first_token``: request sent -> first content token; ``idle``: between chunks;
    ``total``: the whole attempt."""

    connect: float = 2.0
    first_token: float = 30.0
    idle: float = 30.0
    total: float = 300.0


@dataclass(frozen=True)
class BackendConfig:
    """One entry of backends.yaml (see the module docstring)."""

    name: str
    base_url: str
    model: str
    api_key_env: str | None = None
    timeouts: Timeouts = Timeouts()
    max_concurrency: int = 8
    input_cost: float = 0.0
    output_cost: float = 0.0
    local: bool = False
    stream_usage: bool = True  # send stream_options.include_usage (some servers reject it)
    context_tokens: int | None = None  # the model's context window: requests checked before
    source: str = ""  # file the entry came from, for messages

    @property
    def target(self) -> Target:
        return Target(self.name, self.input_cost, self.output_cost, self.local)

    @property
    def cost(self) -> float:
        """Blended USD per 1M tokens, as ``Target.cost`` (used for ``max_cost``)."""
        return self.target.cost

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_cost + completion_tokens * self.output_cost) / 1e6


class _TimeoutsModel(StrictModel):
    connect: float = Field(2.0, gt=0, allow_inf_nan=False)
    first_token: float = Field(30.0, gt=0, allow_inf_nan=False)
    idle: float = Field(30.0, gt=0, allow_inf_nan=False)
    total: float = Field(300.0, gt=0, allow_inf_nan=False)


class _BackendModel(StrictModel):
    base_url: str = Field(min_length=1)
    model: str = Field(min_length=1)
    api_key_env: str | None = None
    timeouts: _TimeoutsModel = _TimeoutsModel()
    max_concurrency: int = Field(8, ge=1)
    input_cost: float = Field(0.0, ge=0, allow_inf_nan=False)
    output_cost: float = Field(0.0, ge=0, allow_inf_nan=False)
    local: bool = False
    stream_usage: bool = True
    context_tokens: int | None = Field(None, ge=16)

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.strip().startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.strip().rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "").isalnum():
            raise ValueError(
                "must be an environment variable NAME (letters, digits, _), never the key itself"
            )
        return value or None


class _BackendsFile(StrictModel):
    backends: dict[str, _BackendModel] = Field(min_length=1)


def load_backends(path: Path) -> dict[str, BackendConfig]:
    """Read backends.yaml. Raises ConfigError naming the file, the line and the field
    (``backends.X.Y``) for every problem found, not just the first. Order of the file is kept."""
    data, node = read_yaml(path, "backends file")
    if not isinstance(data, dict) or "backends" not in data:
        raise ConfigError(f"{path}: expected a top-level mapping `backends:` of target -> settings")
    if data["backends"] == {}:
        raise ConfigError(f"{path}:{line_of(node, ['backends'])}: backends: no backend defined")
    checked = validate(data, node, _BackendsFile, path, "backends file")
    out: dict[str, BackendConfig] = {}
    for name, entry in checked.backends.items():
        out[name] = BackendConfig(
            name=name,
            base_url=entry.base_url,
            model=entry.model,
            api_key_env=entry.api_key_env,
            timeouts=Timeouts(**entry.timeouts.model_dump()),
            max_concurrency=entry.max_concurrency,
            input_cost=entry.input_cost,
            output_cost=entry.output_cost,
            local=entry.local,
            stream_usage=entry.stream_usage,
            context_tokens=entry.context_tokens,
            source=str(path),
        )
    return out
