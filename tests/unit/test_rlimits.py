"""raise_open_file_limit: the soft RLIMIT_NOFILE goes up to the hard one, and failures are only logged."""

import resource as real_resource

from twisted.logger import capturedLogs

from bai_agent.runtime.rlimits import raise_open_file_limit


class FakeResource:
    RLIMIT_NOFILE = real_resource.RLIMIT_NOFILE
    RLIM_INFINITY = real_resource.RLIM_INFINITY

    def __init__(self, soft, hard, refuse=False):
        self.limits = (soft, hard)
        self.refuse = refuse
        self.calls = []

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


def test_the_soft_limit_is_raised_to_the_hard_one():
    fake = FakeResource(1024, 524288)
    with capturedLogs() as events:
        assert raise_open_file_limit(fake) == (1024, 524288, 524288)
    assert fake.limits == (524288, 524288)
    assert any("raised the open-file limit" in event["log_format"] for event in events)


def test_a_limit_already_at_the_hard_one_is_left_alone():
    fake = FakeResource(4096, 4096)
    assert raise_open_file_limit(fake) == (4096, 4096, 4096)
    assert fake.calls == []


def test_an_unlimited_hard_limit_raises_to_nr_open(tmp_path):
    nr_open = tmp_path / "nr_open"
    nr_open.write_text("1048576\n")
    fake = FakeResource(1024, FakeResource.RLIM_INFINITY)
    assert raise_open_file_limit(fake, str(nr_open)) == (1024, 1048576, FakeResource.RLIM_INFINITY)
    assert fake.limits == (1048576, FakeResource.RLIM_INFINITY)


def test_a_refusal_is_logged_not_raised():
    fake = FakeResource(1024, 4096, refuse=True)
    with capturedLogs() as events:
        assert raise_open_file_limit(fake) == (1024, 1024, 4096)
    assert any("could not raise" in event["log_format"] for event in events)


def test_the_real_process_limit_can_be_raised():
    soft, hard = real_resource.getrlimit(real_resource.RLIMIT_NOFILE)
    try:
        before, after, _ = raise_open_file_limit()
        assert after == real_resource.getrlimit(real_resource.RLIMIT_NOFILE)[0]
        assert after >= before
    finally:
        real_resource.setrlimit(real_resource.RLIMIT_NOFILE, (soft, hard))
