#!/usr/bin/env bash
# Makes sure iptables is installed and usable (for tests/cluster_partition.rs, which cuts a
# node off by dropping its loopback address's packets): installs Debian's `iptables` with apt
# when missing (needs root, as on CI), then checks that the filter table can be listed.
# Exits non-zero, with the reason on stderr, when iptables cannot be had or used.
set -euo pipefail
if ! command -v iptables >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "iptables missing and not root: run 'apt-get install iptables' as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null
fi
if ! iptables -w -L INPUT -n >/dev/null; then
  echo "iptables is installed but cannot list the filter table (no CAP_NET_ADMIN?)" >&2
  exit 1
fi
iptables --version
