"""Which OpenSSL this process runs on, and the clear error the bundled one gives."""

from __future__ import annotations

import os

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


@pytest.mark.skipif(RUNTIME.shared, reason="the shared-OpenSSL runtime can do all of these")
@pytest.mark.parametrize("kwargs", [{"size": 10}, {"flush_interval": 5}])
def test_bundled_refuses_settings_it_cannot_honour(kwargs: dict[str, int]) -> None:
    with pytest.raises(NeedsSharedOpenSSL, match="shared-OpenSSL runtime.*python3-openssl"):
        SessionCache(**kwargs)
