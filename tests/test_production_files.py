"""The production files (docker-compose.yml, ollama/Modelfile, Dockerfile, .env.example) agree with kefu.

Docker is not available where the tests run, so these checks are what stands between a typo and a
stack that does not start (or a model that silently runs with the wrong context window).
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
FIELDS = set(Settings.model_fields)
KEFU_SERVICES = ("migrate", "kefu", "worker")
ONE_SHOT = "service_completed_successfully"
HEALTHY = "service_healthy"
VAR = re.compile(r"KEFU_[A-Z0-9_]+")
ENV_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<name>KEFU_[A-Z0-9_]+)=(?P<value>.*)$")


@dataclass
class Modelfile:
    """The instructions of an Ollama Modelfile that kefu depends on."""

    base: str
    parameters: dict[str, list[str]] = field(default_factory=dict)
    system: str | None = None


def parse_modelfile(text: str) -> Modelfile:
    """Parse FROM, PARAMETER and SYSTEM (one-line or triple-quoted) the way Ollama reads them."""
    base = ""
    parameters: dict[str, list[str]] = {}
    system: str | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if rest.startswith('"""'):
            body = rest[3:]
            while not body.endswith('"""'):
                body += "\n" + next(lines)
            rest = body[:-3]
        if instruction == "FROM":
            base = rest
        elif instruction == "PARAMETER":
            name, _, value = rest.partition(" ")
            parameters.setdefault(name.lower(), []).append(value.strip())
        elif instruction == "SYSTEM":
            system = rest
    return Modelfile(base=base, parameters=parameters, system=system)


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    data = yaml.safe_load(compose_text)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


@pytest.fixture(scope="module")
def modelfile() -> Modelfile:
    return parse_modelfile((ROOT / "ollama" / "Modelfile").read_text(encoding="utf-8"))


def env_example_lines() -> list[tuple[str, str, bool, int]]:
    """(name, value, commented_out, line index) for every KEFU_ line of .env.example."""
    found = []
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        match = ENV_LINE.match(line.strip())
        if match:
            found.append((match["name"], match["value"], bool(match["comment"]), index))
    return found


def init_command(services: dict[str, dict[str, Any]]) -> str:
    """The shell script the one-shot ollama-init service runs."""
    command = services["ollama-init"]["command"]
    return " ".join(command) if isinstance(command, list) else str(command)


# --- docker-compose.yml ------------------------------------------------------------------------------


def test_compose_defines_the_whole_stack(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"ollama", "ollama-init", "redis", "postgres", "migrate", "kefu", "worker"}
    assert services["kefu"]["command"][:2] == ["kefu", "serve"]
    assert "0.0.0.0" in services["kefu"]["command"]
    assert services["worker"]["command"] == ["kefu", "worker"]
    assert services["migrate"]["command"] == ["kefu", "db", "upgrade"]
    assert any(str(port).endswith(":8000") for port in services["kefu"]["ports"])


def test_every_dependency_is_waited_for_properly(services: dict[str, dict[str, Any]]) -> None:
    """kefu must not start against a database that is not ready or a model that is not built yet."""
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            condition = spec["condition"]
            target = services[dependency]
            if condition == HEALTHY:
                check = target.get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dependency} to be healthy, but {dependency} has no healthcheck"
                )
            else:
                assert condition == ONE_SHOT, f"{name} starts without waiting for {dependency}"
                assert str(target.get("restart")) == "no", f"{dependency} is not a one-shot service"
    for name in KEFU_SERVICES:
        assert services[name]["depends_on"]["postgres"]["condition"] == HEALTHY
    for name in ("kefu", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == HEALTHY
        assert deps["migrate"]["condition"] == ONE_SHOT
        assert deps["ollama-init"]["condition"] == ONE_SHOT


def test_long_running_services_restart_and_kefu_is_health_checked(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("ollama", "redis", "postgres", "kefu", "worker"):
        assert services[name]["restart"] == "unless-stopped", name
    assert any("/healthz" in part for part in services["kefu"]["healthcheck"]["test"])


def test_redis_persists_with_aof(services: dict[str, dict[str, Any]]) -> None:
    command = services["redis"]["command"]
    args = command if isinstance(command, list) else shlex.split(command)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert any(str(volume).endswith(":/data") for volume in services["redis"]["volumes"])


def test_state_lives_in_declared_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name in ("ollama", "redis", "postgres"):
        sources = [str(volume).split(":")[0] for volume in services[name]["volumes"]]
        assert any(source in declared for source in sources), f"{name} keeps its data in no named volume"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
            else:
                assert (ROOT / source).exists(), f"{name} mounts missing file {source}"


def test_compose_only_uses_real_kefu_settings(compose_text: str) -> None:
    used = set(VAR.findall(compose_text))
    assert used, "docker-compose.yml configures no KEFU_* variable"
    unknown = {name for name in used if name.removeprefix("KEFU_").lower() not in FIELDS}
    assert not unknown, f"not Settings fields: {sorted(unknown)}"


def test_compose_keeps_secrets_in_the_env_file(
    compose_text: str, services: dict[str, dict[str, Any]]
) -> None:
    for name in KEFU_SERVICES:
        assert services[name]["env_file"] in (".env", [".env"])
        for variable in services[name]["environment"]:
            assert not re.search(r"TOKEN|SECRET|_KEY$|PASSWORD", variable), f"{variable} is hard-coded"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    assert "${POSTGRES_PASSWORD" in services["kefu"]["environment"]["KEFU_DATABASE_URL"]


def test_compose_environment_is_valid_production_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What kefu and the workers actually start with inside the stack."""
    monkeypatch.chdir(tmp_path)
    environments = [services[name]["environment"] for name in KEFU_SERVICES]
    assert all(env == environments[0] for env in environments), "kefu, worker and migrate differ"
    for variable, value in environments[0].items():
        value = re.sub(r"\$\{POSTGRES_PASSWORD[^}]*\}", "s3cret", str(value))
        monkeypatch.setenv(variable, value)
    settings = load_settings()
    assert settings.llm_backend == "ollama"
    assert settings.ollama_host == "http://ollama:11434"
    assert settings.database_url == "postgresql+asyncpg://kefu:s3cret@postgres:5432/kefu"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.auto_migrate is False


def test_compose_num_ctx_matches_the_modelfile(
    services: dict[str, dict[str, Any]], modelfile: Modelfile
) -> None:
    assert modelfile.parameters["num_ctx"] == [str(Settings.model_fields["num_ctx"].default)]
    for name in KEFU_SERVICES:
        assert str(services[name]["environment"]["KEFU_NUM_CTX"]) == modelfile.parameters["num_ctx"][0]


def test_compose_serves_the_model_that_ollama_init_creates(
    services: dict[str, dict[str, Any]], modelfile: Modelfile
) -> None:
    script = init_command(services)
    create = re.search(r"ollama create ([\w.:/-]+) -f ([\w./-]+)", script)
    assert create, script
    model, modelfile_path = create.groups()
    for name in KEFU_SERVICES:
        assert services[name]["environment"]["KEFU_OLLAMA_MODEL"] == model
    assert Settings.model_fields["ollama_model"].default == model
    # The Modelfile mounted at the path `ollama create -f` reads is ours.
    assert f"./ollama/Modelfile:{modelfile_path}:ro" in services["ollama-init"]["volumes"]
    # The base model is pulled before it is used, and it is the one FROM names.
    pulls = re.findall(r"ollama (?:pull|show) ([\w.:/-]+)", script)
    assert pulls and set(pulls) == {modelfile.base}
    assert script.index("ollama pull") < script.index("ollama create")
    assert services["ollama-init"]["environment"]["OLLAMA_HOST"] == "http://ollama:11434"


# --- ollama/Modelfile --------------------------------------------------------------------------------


def test_modelfile_is_qwen25_7b_q4_k_m_with_kefu_sampling(modelfile: Modelfile) -> None:
    assert modelfile.base == "qwen2.5:7b-instruct-q4_K_M"
    assert float(modelfile.parameters["temperature"][0]) == Settings.model_fields["temperature"].default


def test_modelfile_system_prompt_is_kefus_prompt(modelfile: Modelfile) -> None:
    prompt = (ROOT / "core" / "prompts" / "system.txt").read_text(encoding="utf-8")
    assert modelfile.system == prompt.strip()


def test_modelfile_parser_reads_triple_quoted_blocks() -> None:
    parsed = parse_modelfile('FROM x\nPARAMETER num_ctx 4096\nSYSTEM """line one\n\nline "two""""\n')
    assert parsed == Modelfile(base="x", parameters={"num_ctx": ["4096"]}, system='line one\n\nline "two"')


# --- .env.example ------------------------------------------------------------------------------------


def test_env_example_lists_every_setting_exactly_once() -> None:
    counts = Counter(name for name, _, _, _ in env_example_lines())
    assert [name for name, count in counts.items() if count > 1] == []
    listed = {name.removeprefix("KEFU_").lower() for name in counts}
    assert sorted(FIELDS - listed) == [], "settings missing from .env.example"
    assert sorted(listed - FIELDS) == [], ".env.example lists variables kefu does not read"


def test_env_example_explains_every_setting() -> None:
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    for name, _, _, index in env_example_lines():
        above = lines[index - 1].strip()
        assert above.startswith("#") and not ENV_LINE.match(above), f"{name} has no comment above it"


def test_env_example_uncommented_is_a_valid_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An operator who uncomments every line gets a configuration that loads, with the values shown."""
    entries = env_example_lines()
    (tmp_path / ".env").write_text(
        "".join(f"{name}={value}\n" for name, value, _, _ in entries), encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    for name, value, _, _ in entries:
        current = getattr(settings, name.removeprefix("KEFU_").lower())
        if value:
            assert current not in (None, [], ""), f"{name}={value} was not applied"
        else:
            assert current is None, f"blank {name} should mean unset"
    assert settings.num_ctx == 8192
    assert settings.telegram_enabled and settings.slack_enabled and settings.wechat_enabled


def test_env_example_as_copied_runs_with_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cp .env.example .env` alone gives the documented defaults, no platform switched on by blanks."""
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEFU_FAQ_EMBEDDINGS", raising=False)  # set for the whole test run
    settings = load_settings()
    assert settings.model_dump() == Settings.model_construct().model_dump()
    assert not (settings.telegram_enabled or settings.slack_enabled or settings.wechat_enabled)


def test_env_example_shows_the_real_defaults() -> None:
    """A commented-out line is documentation of the default: it must not lie."""
    for name, value, commented, _ in env_example_lines():
        default = Settings.model_fields[name.removeprefix("KEFU_").lower()].default
        if commented and isinstance(default, (int, float, str)) and not isinstance(default, bool):
            assert value == str(default), f"{name}: .env.example shows {value!r}, default is {default!r}"


# --- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_builds_a_lean_non_root_image() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert bases and set(bases) == {"python:3.11-slim"}
    install = re.search(r"pip install (\S+)", text)
    assert install and install.group(1) == ".", "the production image installs no extras"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, flags=re.MULTILINE)
    cmd = re.search(r"^CMD\s+(\[.*\])$", text, flags=re.MULTILINE)
    assert cmd and yaml.safe_load(cmd.group(1))[:5] == ["kefu", "serve", "--host", "0.0.0.0", "--port"]


def test_secrets_and_local_state_stay_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for pattern in (".env", ".venv", ".git", "*.db"):
        assert pattern in ignored, pattern
