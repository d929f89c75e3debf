#!/usr/bin/env bash
# Prints the directory holding `prometheus` and `promtool`, installing Debian's
# `prometheus` package first when they are missing (as root, or with sudo).
# The tests use the real binaries to check the configuration and alert rules
# under deploy/prometheus and to scrape a running service.
set -euo pipefail
say() { printf '[prometheus] %s\n' "$*" >&2; }
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
  say "installing Debian's prometheus package (first run only)"
  export DEBIAN_FRONTEND=noninteractive
  { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends prometheus; } >&2 \
    || { say "apt-get install prometheus failed; install Debian's prometheus package by hand"; exit 1; }
  # The package starts a server where an init system runs; the tests start their own.
  $sudo service prometheus stop >/dev/null 2>&1 || true
fi
dirname "$(command -v promtool)"
