# Gate's container image: `make image` (podman or buildah, no daemon) or `docker build -t gate .`.
#
# BASE_IMAGE is any Debian bookworm with python3, python3-venv and binutils; it serves the build stage only. With no
# registry in reach, `make image` makes localhost/gate-base:bookworm with debootstrap (deploy/image/base.sh).
# The final stage is FROM scratch: python, the libraries it loads, the virtualenv and nothing else (no shell,
# no package manager, no pip, no compiler, no dev dependency).
ARG BASE_IMAGE=localhost/gate-base:bookworm

# ---------------------------------------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /build

# Dependencies first, from the lock alone (exact pins, --no-deps): this layer is rebuilt only when the lock or
# pyproject.toml change, not on every source edit. Their shared objects lose their debug symbols (about 20 MB).
COPY pyproject.toml requirements.lock ./
COPY deploy/image/runtime_requirements.py ./
RUN python3 runtime_requirements.py pyproject.toml requirements.lock > runtime.txt \
 && python3 -m venv /opt/gate \
 && /opt/gate/bin/pip install --no-deps --only-binary=:all: -r runtime.txt \
 && /opt/gate/bin/pip check \
 && /opt/gate/bin/pip uninstall --yes --quiet pip setuptools \
 && find /opt/gate -name '*.so*' -type f -exec strip --strip-unneeded {} +

# Gate itself: the package's files into the virtualenv (no build backend needed), the `gate` command beside
# python, every module compiled once here rather than at each start (unchecked-hash: valid whatever the files'
# times, and the read-only /opt never needs a write), then the final image's file system under /runtime.
COPY src/gate /build/gate
COPY deploy/image/runtime_root.sh ./
RUN site="$(/opt/gate/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && cp -r /build/gate "$site/gate" \
 && printf '#!/opt/gate/bin/python\nimport sys\nfrom gate.cli import main\nsys.exit(main())\n' > /opt/gate/bin/gate \
 && chmod 0755 /opt/gate/bin/gate \
 && find /opt/gate -depth -type d -name __pycache__ -exec rm -rf {} + \
 && /opt/gate/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/gate \
 && /opt/gate/bin/python -c 'import gate.app, gate.cli' \
 && sh runtime_root.sh /runtime /opt/gate

# ---------------------------------------------------------------------------------------------- runtime
FROM scratch
COPY --from=build /runtime /

# Container defaults; each is an ordinary setting (README, "Configuration") that env or /app/config overrides.
ENV PATH=/opt/gate/bin:/usr/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATE_HOST=0.0.0.0 \
    GATE_PORT=8080 \
    XDG_DATA_HOME=/app/data \
    USAGE_OUTBOX_PATH=/app/data/usage-outbox.sqlite3 \
    USAGE_FILE_PATH=/app/data/usage-events.jsonl \
    GATE_HEALTH_URL=http://127.0.0.1:8080/actuator/health/liveness

# ./config/application-{profile}.yaml is read from the working directory: mount a ConfigMap on /app/config.
WORKDIR /app
VOLUME ["/app/data"]
# Numeric, so Kubernetes' runAsNonRoot can check it; /app/data (the outbox) belongs to it.
USER 10001:10001
EXPOSE 8080 8081

# Gate drains in-flight requests and flushes the outbox on SIGTERM (server.shutdown.*).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATE_HEALTH_URL'], timeout=2)"]

ENTRYPOINT ["gate"]
CMD ["serve"]
