#!/bin/sh
# pgsni container entrypoint (also runs outside a container: every path comes from the
# environment). It prepares what `pgsni serve` cannot do for itself, then execs it:
#   1. Tigris/AWS conveniences: BUCKET_NAME and AWS_ENDPOINT_URL_S3 (as `fly storage create`
#      sets them) fill PGSNI_S3_BUCKET and PGSNI_S3_ENDPOINT when those are unset. Fly.io
#      fleets: with PGSNI_CLUSTER_LISTEN set and PGSNI_ADVERTISE_ADDRESS unset, the machine
#      advertises its own 6PN address, [FLY_PRIVATE_IP]:<cluster_listen's port>.
#   2. storage=s3fs with s3fs_mount: checks that s3fs and /dev/fuse are usable. The gateway
#      itself mounts the bucket (and unmounts it on shutdown); credentials never reach argv.
#   3. TLS: storage (tls_from_storage), PEM text in PGSNI_TLS_CERT_PEM/PGSNI_TLS_KEY_PEM,
#      the files PGSNI_TLS_CERT/PGSNI_TLS_KEY, or, with PGSNI_DEV_CERTS=1, a development CA
#      and wildcard certificate generated once into PGSNI_DEV_CERTS_DIR.
#      The cluster key (PGSNI_CLUSTER_KEY), if others may read it, is made 0600.
#   4. exec pgsni serve, so the gateway gets the signals (tini forwards them as PID 1).
# Usage: entrypoint.sh [serve] [pgsni serve flags...] | entrypoint.sh COMMAND [ARGS...]
# (a COMMAND other than serve gets step 1 only, then runs as given)
# Every variable read here is described in docs/deploy.md.
set -eu

PGSNI_BIN=${PGSNI_BIN:-pgsni}

say() { printf 'entrypoint: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 64; }

is_true() {
  case $(printf '%s' "${1:-}" | tr '[:upper:]' '[:lower:]') in
    1 | true | yes | on) return 0 ;;
    *) return 1 ;;
  esac
}

# --- 1. S3 settings from the provider's standard variables -------------------------------------
if [ -z "${PGSNI_S3_BUCKET:-}" ] && [ -n "${BUCKET_NAME:-}" ]; then
  PGSNI_S3_BUCKET=$BUCKET_NAME
  export PGSNI_S3_BUCKET
fi
if [ -z "${PGSNI_S3_ENDPOINT:-}" ] && [ -n "${AWS_ENDPOINT_URL_S3:-}" ]; then
  PGSNI_S3_ENDPOINT=$AWS_ENDPOINT_URL_S3
  export PGSNI_S3_ENDPOINT
fi

# The links between gateways (docs/fleet.md): a Fly machine learns its 6PN address only at
# start, so the address the others reach it at is made here, for every command (the CLI loads
# the same settings, and refuses cluster_listen without advertise_address).
if [ -z "${PGSNI_ADVERTISE_ADDRESS:-}" ] && [ -n "${PGSNI_CLUSTER_LISTEN:-}" ] && [ -n "${FLY_PRIVATE_IP:-}" ]; then
  cluster_port=${PGSNI_CLUSTER_LISTEN##*:}
  case $cluster_port in
    '' | *[!0-9]*) die "PGSNI_CLUSTER_LISTEN is $PGSNI_CLUSTER_LISTEN, not HOST:PORT: no port to advertise with FLY_PRIVATE_IP" ;;
  esac
  case $FLY_PRIVATE_IP in
    *:*) PGSNI_ADVERTISE_ADDRESS="[$FLY_PRIVATE_IP]:$cluster_port" ;;  # IPv6, as Fly's 6PN
    *) PGSNI_ADVERTISE_ADDRESS="$FLY_PRIVATE_IP:$cluster_port" ;;
  esac
  export PGSNI_ADVERTISE_ADDRESS
  say "advertise_address: $PGSNI_ADVERTISE_ADDRESS (FLY_PRIVATE_IP and the port of cluster_listen)"
fi

# Anything but `serve` or a flag runs as given, with the S3 settings above (e.g.
# `pgsni db list`, `psql ...`, `sh`): no certificate or mount preparation.
case "${1:-serve}" in
  serve) [ $# -gt 0 ] && shift ;;
  -*) ;;
  *) exec "$@" ;;
esac

# --- 2. mount mode: fail early with a container-sized hint ---------------------------------------
if [ "${PGSNI_STORAGE:-local}" = s3fs ] && is_true "${PGSNI_S3FS_MOUNT:-0}"; then
  command -v s3fs >/dev/null 2>&1 || die "storage=s3fs with s3fs_mount needs s3fs-fuse (apt-get install s3fs)"
  [ -c "${PGSNI_FUSE_DEVICE:-/dev/fuse}" ] ||
    die "storage=s3fs with s3fs_mount needs ${PGSNI_FUSE_DEVICE:-/dev/fuse}: run the container with --device /dev/fuse --cap-add SYS_ADMIN, or use storage=s3"
fi

# --- 3. TLS certificate --------------------------------------------------------------------------
write_private() {  # write_private FILE TEXT: a 0600 file, never world-readable even briefly
  (umask 077 && printf '%s\n' "$2" >"$1")
}

if is_true "${PGSNI_TLS_FROM_STORAGE:-0}"; then
  say "TLS certificate: from storage (tls/cert.pem, tls/key.pem)"
elif [ -n "${PGSNI_TLS_CERT_PEM:-}" ] || [ -n "${PGSNI_TLS_KEY_PEM:-}" ]; then
  if [ -z "${PGSNI_TLS_CERT_PEM:-}" ] || [ -z "${PGSNI_TLS_KEY_PEM:-}" ]; then
    die "set both PGSNI_TLS_CERT_PEM and PGSNI_TLS_KEY_PEM, or neither"
  fi
  if [ -n "${PGSNI_TLS_PEM_DIR:-}" ]; then
    pem_dir=$PGSNI_TLS_PEM_DIR
    (umask 077 && mkdir -p "$pem_dir")
    # never write a key into a directory someone else controls (or through a symlink)
    { [ -d "$pem_dir" ] && [ ! -L "$pem_dir" ] && [ -O "$pem_dir" ]; } ||
      die "PGSNI_TLS_PEM_DIR $pem_dir must be a directory owned by $(id -un)"
    chmod 700 "$pem_dir"
  else
    pem_dir=$(mktemp -d "${TMPDIR:-/tmp}/pgsni-tls-XXXXXX")
  fi
  write_private "$pem_dir/server.pem" "$PGSNI_TLS_CERT_PEM"
  write_private "$pem_dir/server-key.pem" "$PGSNI_TLS_KEY_PEM"
  PGSNI_TLS_CERT=$pem_dir/server.pem
  PGSNI_TLS_KEY=$pem_dir/server-key.pem
  export PGSNI_TLS_CERT PGSNI_TLS_KEY
  unset PGSNI_TLS_CERT_PEM PGSNI_TLS_KEY_PEM  # the gateway needs only the files
  say "TLS certificate: from PGSNI_TLS_CERT_PEM, written to $pem_dir"
elif [ -n "${PGSNI_TLS_CERT:-}" ]; then
  [ -f "$PGSNI_TLS_CERT" ] || die "PGSNI_TLS_CERT is $PGSNI_TLS_CERT, which is not a file"
  [ -f "${PGSNI_TLS_KEY:-}" ] || die "PGSNI_TLS_CERT is $PGSNI_TLS_CERT but PGSNI_TLS_KEY (${PGSNI_TLS_KEY:-unset}) is not a file"
  say "TLS certificate: $PGSNI_TLS_CERT"
elif is_true "${PGSNI_DEV_CERTS:-0}"; then
  dir=${PGSNI_DEV_CERTS_DIR:-certs/dev}
  if [ ! -f "$dir/server.pem" ] || [ ! -f "$dir/server-key.pem" ]; then
    domains=$(printf '%s' "${PGSNI_DOMAINS:-db.example.com}" | tr ',' ' ')
    flags=""
    for d in $domains; do flags="$flags --domain $d"; done
    # shellcheck disable=SC2086  # word splitting of the domain flags is intended
    "$PGSNI_BIN" certs generate $flags --out "$dir" --force >&2
  fi
  PGSNI_TLS_CERT=$dir/server.pem
  PGSNI_TLS_KEY=$dir/server-key.pem
  export PGSNI_TLS_CERT PGSNI_TLS_KEY
  say "TLS certificate: DEVELOPMENT certificate in $dir (clients trust $dir/ca.pem)"
else
  die "no TLS certificate: set PGSNI_TLS_CERT and PGSNI_TLS_KEY to PEM files, PGSNI_TLS_CERT_PEM and PGSNI_TLS_KEY_PEM to PEM text, PGSNI_TLS_FROM_STORAGE=true (upload with \`pgsni certs upload\`), or PGSNI_DEV_CERTS=1 for a development certificate"
fi

# --- 3b. the cluster key (links between gateways) -----------------------------------------------
# Fly.io writes [[files]] with a mode of its own: the key must not stay readable by the uids
# Postgres runs as. A key that is already private is not touched (it may be on a read-only mount).
key=${PGSNI_CLUSTER_KEY:-}
if [ -n "$key" ] && [ -f "$key" ] && [ -n "$(find "$key" -prune -perm /077)" ]; then
  [ -O "$key" ] || die "PGSNI_CLUSTER_KEY $key is readable by others and not owned by $(id -un): make it 0600"
  chmod 600 "$key" || die "PGSNI_CLUSTER_KEY $key is readable by others and cannot be made 0600"
  say "cluster key: $key made private (0600)"
fi

# --- 4. the gateway ------------------------------------------------------------------------------
exec "$PGSNI_BIN" serve "$@"
