#!/usr/bin/env bash
# Builds the ringtrain container image (deploy/Dockerfile) on a Docker Engine that has no
# registry to pull from. The Dockerfile names standard base images (rust:1-bookworm,
# debian:bookworm-slim), so it builds unchanged wherever those can be pulled; here this
# script makes them locally first, under those names, and reuses them once they exist:
#
#   debian:bookworm-slim   a debootstrap'd minimal Debian bookworm (`--variant=minbase`),
#                          imported with `docker import`
#   rust:1-bookworm        the same plus gcc and libc6-dev, and this host's Rust toolchain
#                          (the one `rustc` on PATH belongs to) under /usr/local/rust
#   ringtrain-etcd:dev     debian:bookworm-slim plus the etcd binary of Debian's etcd-server
#                          (for deploy/compose.yaml)
#   ringtrain:dev          deploy/Dockerfile
#
# Debootstrapped root filesystems are cached as tarballs in $RINGTRAIN_IMAGE_CACHE
# (default /var/cache/ringtrain-images), so a rerun after `docker image rm` is quick.
# Needs root (debootstrap) or passwordless sudo, and network access to a Debian mirror
# the first time (the host's apt mirror; override with RINGTRAIN_DEBIAN_MIRROR).
#
# Usage: deploy/build-image.sh [IMAGE_TAG]   (default ringtrain:dev)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-ringtrain:dev}
cache=${RINGTRAIN_IMAGE_CACHE:-/var/cache/ringtrain-images}
suite=bookworm
runtime_image=debian:bookworm-slim
rust_image=rust:1-bookworm
etcd_image=${RINGTRAIN_ETCD_IMAGE:-ringtrain-etcd:dev}

log() { echo "build-image: $*" >&2; }
die() { echo "build-image: error: $*" >&2; exit 1; }

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi

command -v docker >/dev/null || die "docker is not installed; install Docker Engine (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "the Docker Engine is not reachable (docker info failed); start it (systemctl start docker) or set DOCKER_HOST"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The mirror the host's apt uses for $suite (deb822 .sources or one-line sources.list).
debian_mirror() {
  if [ -n "${RINGTRAIN_DEBIAN_MIRROR:-}" ]; then echo "$RINGTRAIN_DEBIAN_MIRROR"; return; fi
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$suite" '
      /^URIs:/ { uris = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
      /^$/ { if (hit && uris != "") { print uris; done = 1; exit } uris = ""; hit = 0 }
      END { if (!done && hit && uris != "") print uris }
    ' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$suite" '$1 == "deb" && $0 !~ /\[/ && $3 == suite { print $2; exit }
      $1 == "deb" && $3 ~ /\]$/ && $4 == suite { print $3; exit }' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  echo "http://deb.debian.org/debian"
}

ensure_debootstrap() {
  command -v debootstrap >/dev/null && return
  log "installing debootstrap"
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q debootstrap
}

# rootfs_tarball NAME [PACKAGES]: a cached tarball of a minbase bookworm with PACKAGES.
# Its stdout is the tarball's path and nothing else (callers capture it), so everything it
# runs writes to stderr.
rootfs_tarball() {
  local name=$1 include=${2:-} tarball="$cache/$1.tar"
  if [ -s "$tarball" ]; then echo "$tarball"; return; fi
  ensure_debootstrap >&2
  "${sudo_cmd[@]}" mkdir -p "$cache" >&2
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-rootfs.XXXXXX")
  local mirror
  mirror=$(debian_mirror)
  log "debootstrap $suite ($name) from $mirror"
  "${sudo_cmd[@]}" debootstrap --variant=minbase ${include:+--include="$include"} \
    "$suite" "$dir" "$mirror" >&2 || die "debootstrap failed (mirror $mirror); set RINGTRAIN_DEBIAN_MIRROR to a reachable Debian mirror"
  # What a slim image leaves out: package lists, caches, docs and man pages.
  "${sudo_cmd[@]}" rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin \
    "$dir"/var/cache/apt/archives/*.deb "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
    "$dir"/usr/share/info/* "$dir"/usr/share/locale/*
  "${sudo_cmd[@]}" tar --numeric-owner -C "$dir" -cf "$tarball.tmp" .
  "${sudo_cmd[@]}" mv "$tarball.tmp" "$tarball"
  "${sudo_cmd[@]}" rm -rf "$dir"
  echo "$tarball"
}

# The runtime base.
if have_image "$runtime_image"; then
  log "reusing $runtime_image"
else
  tarball=$(rootfs_tarball "$suite-minbase")
  log "importing $tarball as $runtime_image"
  docker import --change 'CMD ["bash"]' "$tarball" "$runtime_image" >/dev/null
fi

# The builder: gcc and libc6-dev from Debian, the Rust toolchain from this host, so the
# image compiles with exactly the compiler the tests here use.
if have_image "$rust_image"; then
  log "reusing $rust_image"
else
  command -v rustc >/dev/null || die "no rustc on PATH to copy into $rust_image; install Rust (rustup) first"
  sysroot=$(rustc --print sysroot)
  [ -x "$sysroot/bin/cargo" ] || die "$sysroot/bin/cargo is missing; the builder image needs cargo beside rustc (rustup component add cargo)"
  tarball=$(rootfs_tarball "$suite-build" "gcc,libc6-dev,ca-certificates")
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-rust.XXXXXX")
  log "assembling $rust_image: $tarball + $(rustc --version) from $sysroot"
  "${sudo_cmd[@]}" tar --numeric-owner -C "$dir" -xf "$tarball"
  "${sudo_cmd[@]}" mkdir -p "$dir/usr/local/rust" "$dir/usr/local/cargo"
  # bin/ and lib/ only: share/ is documentation.
  "${sudo_cmd[@]}" cp -a "$sysroot/bin" "$sysroot/lib" "$dir/usr/local/rust/"
  # cargo downloads crates inside the build: trust what this host trusts (a network may
  # reach crates.io only through a TLS-inspecting proxy whose CA the host has added).
  host_ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  if [ -s "$host_ca" ]; then
    "${sudo_cmd[@]}" cp "$host_ca" "$dir/etc/ssl/certs/ca-certificates.crt"
  fi
  "${sudo_cmd[@]}" tar --numeric-owner -C "$dir" -c . | docker import \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$rust_image" >/dev/null
  "${sudo_cmd[@]}" rm -rf "$dir"
fi

# etcd for compose: Debian's etcd-server binary (dynamically linked against glibc only)
# on the runtime base.
if have_image "$etcd_image"; then
  log "reusing $etcd_image"
else
  if ! command -v etcd >/dev/null; then
    log "installing etcd-server"
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q etcd-server
  fi
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-etcd.XXXXXX")
  cp "$(command -v etcd)" "$dir/etcd"
  cat >"$dir/Dockerfile" <<DOCKERFILE
FROM $runtime_image
COPY etcd /usr/local/bin/etcd
RUN groupadd --gid 10001 etcd && useradd --uid 10001 --gid 10001 --no-create-home etcd \\
 && mkdir -p /var/lib/etcd && chown 10001:10001 /var/lib/etcd
USER 10001
EXPOSE 2379 2380
ENTRYPOINT ["etcd"]
DOCKERFILE
  log "building $etcd_image from $(etcd --version | head -1)"
  DOCKER_BUILDKIT=0 docker build -q -t "$etcd_image" "$dir" >/dev/null
  rm -rf "$dir"
fi

log "building $tag from deploy/Dockerfile"
start=$(date +%s)
# The legacy builder: this engine's client has no buildx, and the Dockerfile needs nothing
# BuildKit-only. Its layer cache keeps the dependency layer across source edits.
DOCKER_BUILDKIT=0 docker build -f "$root/deploy/Dockerfile" -t "$tag" "$root" >&2
log "built $tag in $(($(date +%s) - start))s"
