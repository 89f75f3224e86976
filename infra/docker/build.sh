#!/usr/bin/env bash
# Build the vitok image as ${VITOK_REGISTRY}/vitok:<version in pyproject.toml>; with --push, push it too.
#   VITOK_REGISTRY=123456789012.dkr.ecr.us-west-2.amazonaws.com infra/docker/build.sh --push
# Every manifest in infra/ names exactly this image (tests/test_infra.py checks it). Registry login (e.g.
# `aws ecr get-login-password | docker login ...`) is done beforehand and stores nothing in this repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${VITOK_REGISTRY:?set VITOK_REGISTRY to the image registry, e.g. <account>.dkr.ecr.<region>.amazonaws.com}"
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image="${VITOK_REGISTRY}/vitok:${version}"
DOCKER_BUILDKIT=1 docker build -f infra/docker/Dockerfile -t "${image}" .
if [[ "${1:-}" == "--push" ]]; then
  docker push "${image}"
fi
echo "${image}"
