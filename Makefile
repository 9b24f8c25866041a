# The two commands: `make run` and `make test`.
PYTHON  ?= /usr/bin/python3
SHARED  := .venv/shared
BUNDLED := .venv/bundled
PYTEST_ARGS ?=
PIP_FLAGS := -q --disable-pip-version-check --config-settings editable_mode=compat

.PHONY: run test test-shared test-bundled typecheck bench bench-quick deps clean

deps: $(SHARED)/.ready $(BUNDLED)/.ready

# Shared-OpenSSL runtime: Debian's pyOpenSSL/cryptography on the system libssl.
$(SHARED)/.ready: pyproject.toml constraints-shared.txt scripts/install-system-deps.sh
	scripts/install-system-deps.sh
	$(PYTHON) -m venv --system-site-packages $(SHARED)
	$(SHARED)/bin/pip install $(PIP_FLAGS) -c constraints-shared.txt -e '.[test,typecheck]'
	@# txredisapi requires twisted[tls], which would replace the distribution's pyOpenSSL.
	$(SHARED)/bin/pip install $(PIP_FLAGS) --no-deps 'txredisapi>=1.4.10'
	touch $@

# Bundled-OpenSSL runtime: plain PyPI wheels, as `pip install` gives anyone.
$(BUNDLED)/.ready: pyproject.toml scripts/install-system-deps.sh
	scripts/install-system-deps.sh
	$(PYTHON) -m venv $(BUNDLED)
	$(BUNDLED)/bin/pip install $(PIP_FLAGS) -e '.[test,redis]'
	touch $@

run: $(SHARED)/.ready
	@scripts/run-demo.sh $(SHARED)

# Both runtimes, then the type check (once: it reads the code, not a runtime).
# PYTEST_ARGS='-m "not slow"' leaves out the tests of many seconds (fleets, an outage, the bench).
test: test-shared test-bundled typecheck

test-shared: $(SHARED)/.ready
	SESSCACHE_EXPECT_RUNTIME=shared-openssl $(SHARED)/bin/python -m pytest $(PYTEST_ARGS)

test-bundled: $(BUNDLED)/.ready
	SESSCACHE_EXPECT_RUNTIME=bundled-openssl $(BUNDLED)/bin/python -m pytest $(PYTEST_ARGS)

# mypy with mypy-zope over the package, the plugin, bench/ and tests/ ([tool.mypy] in pyproject.toml).
typecheck: $(SHARED)/.ready
	$(SHARED)/bin/python -m mypy

$(SHARED)/.bench: $(SHARED)/.ready
	$(SHARED)/bin/pip install $(PIP_FLAGS) -c constraints-shared.txt -e '.[bench]'
	touch $@

# The full run rewrites docs/benchmarks.md (and its chart); the quick one writes build/bench-quick/.
bench: $(SHARED)/.bench
	$(SHARED)/bin/python -m bench --json docs/benchmarks.json

bench-quick: $(SHARED)/.bench
	$(SHARED)/bin/python -m bench --quick

# Everything the build, the tests and the tools leave behind.
clean:
	rm -rf .venv build dist *.egg-info .hypothesis .pytest_cache .mypy_cache twisted/plugins/dropin.cache
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
