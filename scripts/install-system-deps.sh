#!/usr/bin/env bash
# Debian/Ubuntu packages the project needs: the shared-OpenSSL runtime
# (pyOpenSSL and cryptography linked against the system libssl), the openssl
# CLI the tests use as an outside peer, redis-server and nginx, haproxy (a bench
# anchor beside nginx), valgrind (the bench counts instructions per connection with callgrind),
# and the real clients the tests drive: curl and headless Chromium.
set -euo pipefail
packages=(python3 python3-venv python3-openssl python3-cryptography python3-cffi
          python3-service-identity python3-lmdb openssl redis-server nginx haproxy curl chromium valgrind)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]}; run: sudo $0" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packaged services are not wanted running: tests start their own.
for service in redis-server nginx haproxy; do
  (systemctl disable --now "$service" || service "$service" stop) >/dev/null 2>&1 || true
done
