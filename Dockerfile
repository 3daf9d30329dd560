# syntax=docker/dockerfile:1
# aoai-batch-worker: keyless asyncio batch worker for Azure OpenAI.
#   docker build -t aoai-batch-worker .          (or: azd deploy / az acr build, no local engine needed)
#   docker run --rm -e WORKER_SOURCE=... -e WORKER_SINK=... aoai-batch-worker   # runs `worker run`
#   docker run --rm aoai-batch-worker doctor                                       # explains misconfiguration

# A specific Python release on a specific Debian release, so a rebuild does not move to the next one on
# its own; the same image for both stages (the venv is copied across, its interpreter must be there).
# requirements/lock.txt is resolved for this Python (3.11, Linux x86-64): change them together. For a
# byte-identical base, append its digest: docker buildx imagetools inspect python:3.11.16-slim-trixie
ARG PYTHON_IMAGE=python:3.11.16-slim-trixie

# ---- builder: a self-contained virtual environment in /opt/venv -------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies get their own layer, from the hash-locked list (`make lock`): exactly those versions and
# files, the same on every build; the layer is rebuilt only when the lock changes, not on every code edit.
COPY requirements/lock.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements/lock.txt

# Then the package itself, without touching the dependency layer (README.md is the package's readme);
# `pip check` fails the build if the lock no longer satisfies the package's declared ranges.
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && worker --help > /dev/null

# ---- runtime: the venv, the example job files, a non-root user ---------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="aoai-batch-worker" \
      org.opencontainers.image.description="Keyless, resumable asyncio batch worker for Azure OpenAI: Blob Storage in, Batch-API-format results out." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/worker \
        --shell /usr/sbin/nologin worker

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY jobs ./jobs

USER 10001:10001

# Exec form: `worker` is PID 1 and receives SIGTERM itself (it installs its own handlers and drains
# within the platform's 30 s grace period). No shell in between, so no signal is lost.
STOPSIGNAL SIGTERM
ENTRYPOINT ["worker"]
CMD ["run"]
