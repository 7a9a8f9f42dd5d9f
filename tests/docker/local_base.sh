#!/usr/bin/env bash
# A local stand-in for python:3.11-slim-bookworm, for machines that cannot pull from Docker
# Hub but reach Debian's apt repositories and a Python package index (this project's CI
# and dev machines); test-only. The Dockerfiles keep `FROM python:3.11-slim-bookworm`; this
# image carries that tag, so they build unchanged.
#
#   tests/docker/local_base.sh [TAG]        # default TAG: python:3.11-slim-bookworm
#
# Needs root, a running docker daemon and debootstrap. Does nothing for an image that
# already exists. Steps:
#   1. local/debian:bookworm: `debootstrap --variant=minbase` from the host's Debian mirror,
#      with the host's apt sources and Acquire:: settings, imported with `docker import`.
#   2. TAG on top: Debian's python3.11 in a venv at /usr/local (python and pip first on
#      PATH, as in the official image; bookworm refuses pip into the system Python), plus
#      the host's extra CA certificates and pip's network settings (cert, timeout, index),
#      so pip in an image build reaches the index the same way as on this host.
# Wheel folders and local indexes in the host's pip configuration are not copied: the
# build helper (tests/docker/dockerhost.py) serves them to each build over 127.0.0.1.
set -euo pipefail

tag="${1:-python:3.11-slim-bookworm}"
debian="local/debian:bookworm"
docker="${DOCKER:-docker}"

have_image() { "$docker" image inspect "$1" >/dev/null 2>&1; }

if have_image "$tag"; then
  echo "local_base: $tag exists"
  exit 0
fi

work="$(mktemp -d /var/tmp/talan-local-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# The first Debian mirror the host's apt uses (deb822 .sources or one-line .list).
mirror() {
  local uri
  uri="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources \
         2>/dev/null | grep -v -- '-security' | head -n1 || true)"
  if [ -z "$uri" ]; then
    uri="$(grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
           | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

if ! have_image "$debian"; then
  command -v debootstrap >/dev/null || { echo "local_base: debootstrap missing" >&2; exit 3; }
  rootfs="$work/rootfs"
  echo "local_base: debootstrap bookworm from $(mirror)"
  debootstrap --variant=minbase bookworm "$rootfs" "$(mirror)" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 4; }
  # The host's apt sources replace debootstrap's one-line list (same mirror, plus updates
  # and security); Acquire:: settings (proxy, snapshot validity) come along.
  rm -f "$rootfs/etc/apt/sources.list"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && cp "$f" "$rootfs$f"
  done
  for f in /etc/apt/apt.conf.d/*; do
    [ -f "$f" ] && grep -q '^Acquire::' "$f" && cp "$f" "$rootfs/etc/apt/apt.conf.d/"
  done
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$docker" import - "$debian" >/dev/null
  rm -rf "$rootfs"
  echo "local_base: imported $debian"
fi

# Build context for the Python layer: the host's CA certificates and pip settings.
ctx="$work/context"
mkdir -p "$ctx/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$ctx/ca-certificates/" 2>/dev/null || true

pip_setting() {  # the host's effective value of one pip option (environment wins)
  local key="$1" env value
  env="PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')"
  value="${!env:-}"
  if [ -z "$value" ] && command -v python3 >/dev/null; then
    value="$(python3 -m pip config list 2>/dev/null \
             | sed -n "s/^[a-z]*\.$key='\(.*\)'$/\1/p" | tail -n1 || true)"
  fi
  echo "$value"
}
{
  echo "[global]"
  if [ -n "$(pip_setting cert)" ] || ls "$ctx"/ca-certificates/*.crt >/dev/null 2>&1; then
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
  fi
  for key in index-url trusted-host default-timeout retries proxy; do
    value="$(pip_setting "$key")"
    case "$value" in file:*|/*) value="" ;; esac  # host paths mean nothing in an image
    [ -n "$value" ] && echo "$key = $value"
  done
  echo "disable-pip-version-check = 1"
} >"$ctx/pip.conf"

cat >"$ctx/Dockerfile" <<EOF
FROM $debian
ARG DEBIAN_FRONTEND=noninteractive
ENV LANG=C.UTF-8
COPY ca-certificates/ /usr/local/share/ca-certificates/
COPY pip.conf /etc/pip.conf
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \\
    && update-ca-certificates \\
    && rm -rf /var/lib/apt/lists/* \\
    && python3.11 -m venv /usr/local \\
    && /usr/local/bin/pip install --no-cache-dir --quiet --upgrade pip
LABEL org.talan-serve.local-base="python:3.11-slim-bookworm stand-in (tests/docker/local_base.sh)"
CMD ["python3"]
EOF
echo "local_base: building $tag"
"$docker" build --network=host -q -t "$tag" "$ctx" >/dev/null
echo "local_base: built $tag ($("$docker" run --rm "$tag" python --version))"
