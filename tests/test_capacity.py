"""The bounded wait for a joined cluster's nodes (pipelines.run.capacity), without Ray: fake nodes and clock."""

from __future__ import annotations

import pytest

from pipelines.run.capacity import CapacityError, bundles_fit, run_bundles, wait_for_capacity


def test_bundles_fit_per_node_not_in_total():
    two_fours = run_bundles(2, 4, gpu=False)
    assert two_fours == [{"CPU": 4.0}, {"CPU": 4.0}]
    assert bundles_fit(two_fours, [{"CPU": 8.0}])
    assert bundles_fit(two_fours, [{"CPU": 4.0}, {"CPU": 4.0}])
    assert not bundles_fit(two_fours, [{"CPU": 6.0}, {"CPU": 2.0}])  # 8 CPUs in all, but no node holds the 2nd
    assert not bundles_fit(run_bundles(1, None, gpu=True), [{"CPU": 64.0}])
    assert bundles_fit(run_bundles(3, None, gpu=False), [{"CPU": 1.0}, {"CPU": 2.0}])  # Ray's default: 1 CPU
    assert not bundles_fit(run_bundles(1, 1, gpu=False), [])


class _Cluster:
    """Nodes that appear after ``grows_after`` polls; a clock that each sleep advances."""

    def __init__(self, start: list[dict], later: list[dict], grows_after: int):
        self.start, self.later, self.grows_after = start, later, grows_after
        self.polls, self.now, self.requests, self.lines = 0, 0.0, [], []

    def capacities(self) -> list[dict]:
        self.polls += 1
        return self.later if self.polls > self.grows_after else self.start

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, bundles, timeout_s):
        return wait_for_capacity(
            bundles,
            timeout_s,
            self.lines.append,
            capacities=self.capacities,
            request=self.requests.append,
            clock=lambda: self.now,
            sleep=self.sleep,
        )


def test_no_wait_and_no_request_when_the_nodes_hold_the_workers():
    cluster = _Cluster([{"CPU": 2.0}], [], grows_after=99)
    assert cluster.wait(run_bundles(2, 1, gpu=False), 60) == 0.0
    assert cluster.requests == [] and cluster.lines == []


def test_waits_for_the_autoscaler_then_clears_its_request():
    cluster = _Cluster([{"CPU": 0.0}], [{"CPU": 0.0}, {"CPU": 4.0}], grows_after=3)
    bundles = run_bundles(1, 4, gpu=False)
    waited = cluster.wait(bundles, 60)
    assert waited == pytest.approx(6.0)  # 3 polls of 2 s found nothing, the 4th found the node
    # asked for the workers at the start and after each poll that found no room (Ray Train's
    # AutoscalingCoordinator overwrites the request every 20 s), then the request is withdrawn
    assert cluster.requests == [bundles, bundles, bundles, []]
    (line,) = cluster.lines
    assert "--resource-timeout" in line and "1 x {CPU: 4}" in line and "1 node(s) {}" in line


def test_gives_up_after_the_timeout_with_the_numbers():
    cluster = _Cluster([{"CPU": 2.0}], [{"CPU": 2.0}], grows_after=0)
    with pytest.raises(CapacityError) as err:
        cluster.wait(run_bundles(2, 2, gpu=False), 5)
    text = str(err.value)
    assert "2 x {CPU: 2}" in text and "--resource-timeout 5 s" in text and "{CPU: 2}" in text
    assert cluster.now == pytest.approx(5.0)  # bounded: the last sleep is cut to the deadline
    assert cluster.requests[-1] == []
