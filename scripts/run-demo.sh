#!/usr/bin/env bash
# make run: twistd sesscache on https://127.0.0.1:8443 with a throwaway certificate.
set -euo pipefail
venv=${1:-.venv/shared}
port=${SESSCACHE_PORT:-8443}
stats=${SESSCACHE_STATS_PORT:-9100}
cat <<MSG
twistd sesscache on https://127.0.0.1:$port (self-signed certificate, loopback only), statistics on
http://127.0.0.1:$stats/stats.json and /metrics. Watch resumption happen: open
https://127.0.0.1:$port/ in a browser and reload, or run these two; the second says Reused:

MSG
"$venv/bin/python" -c "from twisted_sesscache.status import watch_commands; print('\n'.join('  ' + c for c in watch_commands('127.0.0.1', $port)))"
echo
echo "Ctrl-C stops it."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/twistd" -n --pidfile= sesscache --generate-certificate \
  --listen "tcp:$port:interface=127.0.0.1" --stats "tcp:$stats:interface=127.0.0.1" \
  --flush-interval 60
