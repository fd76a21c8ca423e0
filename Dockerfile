# syntax=docker/dockerfile:1
# kefu gateway / worker image. The model runs in the ollama service (docker-compose.yml), so the
# `embedded` extra (llama.cpp + a bundled GGUF) is deliberately not installed.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kefu
WORKDIR /src
# .dockerignore keeps .env, .venv, .git, tests and local databases out of the build context.
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip /opt/kefu/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/kefu/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed uid so volumes and orchestrators can reason about file ownership.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/kefu kefu \
    && mkdir -p /var/lib/kefu \
    && chown kefu:kefu /var/lib/kefu
COPY --from=build /opt/kefu /opt/kefu
# Working directory for the embedded SQLite default when the image runs without PostgreSQL.
WORKDIR /var/lib/kefu
USER kefu
EXPOSE 8000
# The slim image has no curl; the standard library is enough (non-2xx or no answer -> exit 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["kefu", "serve", "--host", "0.0.0.0", "--port", "8000"]
