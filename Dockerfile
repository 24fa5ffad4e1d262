# poolwatch container image: PgBouncer + PostgreSQL pool health for Prometheus on :9127.
#
#   docker build -t poolwatch .            (BuildKit, Docker's default builder since 23.0; or podman)
#   docker run --rm -p 9127:9127 \
#     -v ./poolwatch.yaml:/etc/poolwatch/poolwatch.yaml:ro \
#     -v ./pgbouncer-password:/run/secrets/pgbouncer-password:ro \
#     poolwatch
# (mounted files must be readable by UID 10001; poolwatch.yaml names the secret in password_file)
#
# Configuration: a file mounted over /etc/poolwatch/poolwatch.yaml (the image's own one watches
# nothing), then environment overrides on top: POOLWATCH_PGBOUNCER_DSN, POOLWATCH_POSTGRES_DSN,
# POOLWATCH_LISTEN, POOLWATCH_CONFIG (another file); passwords through password_file (a mounted
# secret) or password_env in the config, or PGPASSWORD / PGPASSFILE for a DSN given alone.
# Runs as UID/GID 10001, needs no shell and no writable root filesystem; stops on SIGTERM.
#
# Build stage: pip reaches the package index as usual. Behind a private index or a
# TLS-intercepting proxy, pass pip's settings as optional build secrets (never stored in a layer):
#   --secret id=pipconf,src=/path/to/pip.conf   --secret id=pipcert,src=/path/to/ca-bundle.crt
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

############################ build: the venv, poolwatch installed from its wheel ############
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/poolwatch
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=pipcert \
    set -eu; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt; \
    /opt/poolwatch/bin/pip install --requirement /tmp/requirements.txt
# Then poolwatch itself: built as a wheel, installed from it (no source tree in the image).
COPY . ./
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=pipcert \
    set -eu; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi; \
    /opt/poolwatch/bin/pip wheel --no-deps --wheel-dir /tmp/dist . ; \
    /opt/poolwatch/bin/pip install --no-deps --no-index /tmp/dist/poolwatch-*.whl; \
    /opt/poolwatch/bin/pip check; \
    /opt/poolwatch/bin/poolwatch --version; \
    /opt/poolwatch/bin/poolwatch check-config deploy/container/poolwatch.yaml; \
    /opt/poolwatch/bin/pip uninstall --yes --quiet pip setuptools

############################ runtime ######################################################
FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 poolwatch \
 && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin poolwatch
COPY --from=build /opt/poolwatch /opt/poolwatch
COPY deploy/container/poolwatch.yaml /etc/poolwatch/poolwatch.yaml
ENV PATH=/opt/poolwatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    POOLWATCH_CONFIG=/etc/poolwatch/poolwatch.yaml
USER 10001:10001
EXPOSE 9127
# Labels last, so a new revision changes no layer above (tests/container/build.sh passes them).
ARG VERSION=unknown
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="poolwatch" \
      org.opencontainers.image.description="Watches PgBouncer and PostgreSQL connection pooling health and exports it to Prometheus" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
STOPSIGNAL SIGTERM
# Exec form, the venv's python, no curl and no shell. The port follows POOLWATCH_LISTEN when it
# is set; POOLWATCH_HEALTHCHECK_URL overrides the whole URL (a config file listening elsewhere).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/opt/poolwatch/bin/python", "-c", "import os, urllib.request as u; p = os.environ.get('POOLWATCH_LISTEN', '').rpartition(':')[2] or '9127'; u.urlopen(os.environ.get('POOLWATCH_HEALTHCHECK_URL') or 'http://127.0.0.1:%s/healthz' % p, timeout=4)"]
ENTRYPOINT ["/opt/poolwatch/bin/poolwatch"]
CMD ["run"]
