#!/usr/bin/env bash
# make run: twistd sesscache on https://127.0.0.1:8443 with a throwaway certificate, two worker
# processes sharing their sessions through an LMDB store, and the statistics of both on one port.
set -euo pipefail
venv=${1:-.venv/shared}
port=${SESSCACHE_PORT:-8443}
stats=${SESSCACHE_STATS_PORT:-9100}
workers=${SESSCACHE_WORKERS:-2}
cat <<MSG
twistd sesscache on https://127.0.0.1:$port (self-signed certificate, loopback only), $workers worker
processes on that one port, sharing sessions through an LMDB store. Watch resumption happen: open
https://127.0.0.1:$port/ in a browser and reload, or run these two; the second says Reused, whichever
worker answers it:

MSG
"$venv/bin/python" -c "from twisted_sesscache.status import watch_commands; print('\n'.join('  ' + c for c in watch_commands('127.0.0.1', $port)))"
cat <<MSG

Statistics over all workers: http://127.0.0.1:$stats/stats.json (and /metrics for Prometheus).
The counters at the top are the sum of the workers; "workers" says how many there are and
"per_worker" lists each one: "pid", "accept" (connections it took), "hits" (resumptions it
answered) and "cb_hits" (of those, sessions it did not make itself: found in the shared store,
made by another worker). One line per worker:

  curl -s http://127.0.0.1:$stats/stats.json | $venv/bin/python -c 'import json, sys; s = json.load(sys.stdin); print(s.get("workers", 1), "workers,", s["hits"], "resumed,", s["cb_hits"], "from another worker"); [print("  worker", w.get("worker", 0), "pid", w.get("pid", "-"), "accepted", w["accept"], "resumed", w["hits"], "from another worker", w["cb_hits"]) for w in s.get("per_worker", [s])]'

Ctrl-C stops it.
MSG
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/twistd" -n --pidfile= sesscache --generate-certificate \
  --listen "tcp:$port:interface=127.0.0.1" --stats "tcp:$stats:interface=127.0.0.1" \
  --workers "$workers" --flush-interval 60
