# pytest-twisted installs the default reactor; tests that need a real reactor take the
# ``reactor`` fixture below instead of importing it.
import pytest


@pytest.fixture
def reactor():
    from twisted.internet import reactor as global_reactor

    return global_reactor
