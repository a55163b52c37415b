# The build stage's base where a registry is reachable (Docker Hub's debian image), the same packages as
# deploy/image/base.sh makes with debootstrap:
#   docker build -t localhost/gate-base:bookworm -f deploy/image/base.Dockerfile deploy/image && docker build -t gate .
FROM docker.io/library/debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 python3-venv ca-certificates binutils \
 && rm -rf /var/lib/apt/lists/*
LABEL gate.base.version=2
