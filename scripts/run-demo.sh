#!/usr/bin/env bash
# make run: twistd sesscache on https://127.0.0.1:8443 with a throwaway certificate.
set -euo pipefail
venv=${1:-.venv/shared}
port=${SESSCACHE_PORT:-8443}
stats=${SESSCACHE_STATS_PORT:-9100}
cat <<MSG
twistd sesscache on https://127.0.0.1:$port (self-signed certificate), statistics on
http://127.0.0.1:$stats/stats.json and /metrics. Watch resumption happen:

  printf 'GET / HTTP/1.0\r\n\r\n' | openssl s_client -connect 127.0.0.1:$port -ign_eof -sess_out /tmp/sesscache.pem | grep -E '^(New|Reused)'
  printf 'GET / HTTP/1.0\r\n\r\n' | openssl s_client -connect 127.0.0.1:$port -ign_eof -sess_in /tmp/sesscache.pem | grep -E '^(New|Reused)'

or open https://127.0.0.1:$port/ in a browser and reload. Ctrl-C stops it.
MSG
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/twistd" -n --pidfile= sesscache --generate-certificate \
  --listen "tcp:$port:interface=127.0.0.1" --stats "tcp:$stats:interface=127.0.0.1" \
  --flush-interval 60
