"""Which OpenSSL this process runs on, and the clear error the bundled one gives."""

from __future__ import annotations

import os
from typing import Any

import pytest

from twisted_sesscache import RUNTIME, NeedsSharedOpenSSL, SessionCache
from twisted_sesscache._openssl import BUNDLED, SHARED


def test_runtime_is_the_one_this_run_asked_for() -> None:
    expected = os.environ.get("SESSCACHE_EXPECT_RUNTIME")
    if expected is None:
        pytest.skip("SESSCACHE_EXPECT_RUNTIME is not set: `make test` sets it per runtime")
    assert RUNTIME.name == expected, RUNTIME.describe()


def test_describe_names_runtime_and_version() -> None:
    line = RUNTIME.describe()
    assert RUNTIME.name in line and RUNTIME.version in line
    assert RUNTIME.name in (SHARED, BUNDLED)


@pytest.mark.bundled_only("the shared-OpenSSL runtime can do all of these")
@pytest.mark.parametrize("kwargs", [{"size": 10}, {"flush_interval": 5}])
def test_bundled_refuses_settings_it_cannot_honour(kwargs: dict[str, Any]) -> None:
    with pytest.raises(NeedsSharedOpenSSL, match="shared-OpenSSL runtime.*python3-openssl"):
        SessionCache(**kwargs)


def test_libssl_is_looked_up_once_and_shared_with_the_runtime() -> None:
    from twisted_sesscache._openssl import binding, runtime

    assert runtime() is runtime() is RUNTIME
    handles = binding.shared()
    assert binding.looked_up() and binding.shared() is handles
    assert (handles is not None) == RUNTIME.shared
    if handles is not None:  # the runtime calls through these very handles
        assert RUNTIME._lib is handles.lib


def test_identity_check_tells_the_runtimes_apart() -> None:
    """A fresh lookup agrees with the one made at first use: same string address, same library."""
    from twisted_sesscache._openssl import binding

    fresh = binding.open_shared()
    assert (fresh is not None) == RUNTIME.shared
    if fresh is not None:
        ours = binding.address(binding.pylib.OpenSSL_version(0))
        assert binding.address(fresh.lib.OpenSSL_version(0)) == ours
        assert fresh.ffi.string(fresh.lib.OpenSSL_version(0)).decode() == RUNTIME.version


def test_counters_are_openssls_ctrl_commands() -> None:
    from twisted_sesscache._openssl import COUNTERS

    assert COUNTERS["number"] == 20 and COUNTERS["cache_full"] == 31
    assert sorted(COUNTERS.values()) == list(range(20, 32))
