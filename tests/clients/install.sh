#!/usr/bin/env bash
# Installs what tests/clients needs beyond the virtualenv (whose pg8000, SQLAlchemy and greenlet
# come from pyproject.toml's test extras): node + the npm packages pinned in node/package-lock.json,
# a JDK and Debian's pgjdbc, ruby-pg and DBD::Pg. Idempotent; quick when all is there.
# Runs as root, or as a user with sudo (for apt-get only).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

apt_install() {
  echo "clients: installing $* with apt-get" >&2
  $SUDO apt-get update -qq
  # env: sudo's env_reset would drop a plain DEBIAN_FRONTEND=... prefix
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_debian_packages() {
  local pkgs=()
  command -v node >/dev/null || pkgs+=(nodejs)
  command -v npm >/dev/null || pkgs+=(npm)
  command -v javac >/dev/null || pkgs+=(openjdk-17-jdk-headless)  # `java File.java` needs the compiler
  [ -f /usr/share/java/postgresql.jar ] || pkgs+=(libpostgresql-jdbc-java)
  { command -v ruby >/dev/null && ruby -e "require 'pg'" 2>/dev/null; } || pkgs+=(ruby-pg)
  perl -MDBD::Pg -e1 2>/dev/null || pkgs+=(libdbd-pg-perl)
  [ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}"
}

ensure_npm_packages() {
  # a stamp of the lock file's hash: `npm ci` wipes node_modules, so run it only on a change
  local stamp=node/node_modules/.pgsni-installed want
  want=$(cat node/package.json node/package-lock.json | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "clients: installing npm packages in tests/clients/node (npm ci)" >&2
  (cd node && npm ci --no-audit --no-fund --update-notifier=false --loglevel=error >/dev/null)
  echo "$want" > "$stamp"
}

ensure_debian_packages
ensure_npm_packages
