"""``python -m bench``: twisted-sesscache side by side with plain Twisted, nginx and s_server.

Modules: servers (the configurations and their processes), tlsserver (the
Twisted server they start), load (the one load generator), stall (flush
stalls and memory per session), profiling (py-spy, ours or not ours),
report (Markdown and PNG). See docs/benchmarks.md for the latest results.
"""
