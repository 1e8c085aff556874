"""Outlier ejection (addon/health.py): which failures eject, for how long, and the cap."""

from __future__ import annotations

from addon.health import Health, OutlierSettings

IDS = ["e1", "e2", "e3", "e4"]


def make(**kw: float) -> tuple[Health, list[float]]:
    t = [100.0]
    return Health(IDS, OutlierSettings(**kw), clock=lambda: t[0]), t


def test_refused_connect_ejects_at_once() -> None:
    h, _ = make()
    assert h.failure("e2", "connect-refused")
    assert h.candidates() == ["e1", "e3", "e4"]
    assert h.ejected("e2")


def test_5xx_ejects_only_after_consecutive_failures_and_success_resets() -> None:
    h, _ = make(consecutive_failures=3)
    assert not h.failure("e1", "http-5xx")
    assert not h.failure("e1", "reset")
    h.success("e1")  # the run is broken
    assert not h.failure("e1", "http-5xx")
    assert not h.failure("e1", "http-5xx")
    assert h.failure("e1", "http-5xx")
    assert "e1" not in h.candidates()


def test_ejection_time_grows_with_repeats_and_is_capped() -> None:
    h, t = make(base_ejection=10, max_ejection=25)
    h.failure("e1", "connect-refused")
    assert h.ejection_seconds("e1") == 10
    t[0] += 10.5
    assert "e1" in h.candidates()
    h.failure("e1", "connect-refused")  # still dead when it came back
    assert h.ejection_seconds("e1") == 20
    t[0] += 20.5
    h.failure("e1", "connect-refused")
    assert h.ejection_seconds("e1") == 25  # capped
    t[0] += 25.5
    h.success("e1")  # back and healthy: the next ejection is short again
    h.failure("e1", "connect-refused")
    assert h.ejection_seconds("e1") == 10


def test_cap_on_ejected_share_for_non_connect_failures() -> None:
    h, _ = make(consecutive_failures=1, max_ejected_share=0.5)
    assert h.failure("e1", "http-5xx")
    assert h.failure("e2", "http-5xx")
    assert not h.failure("e3", "http-5xx")  # 2 of 4 out already: a storm, not an outlier
    assert h.ejections_skipped == 1
    # A refused connect is unambiguous: it ejects whatever the cap.
    assert h.failure("e4", "connect-refused")


def test_all_ejected_tries_the_most_recently_healthy() -> None:
    h, t = make()
    for e in IDS:
        t[0] += 1
        h.failure(e, "connect-refused")
    t[0] += 1
    h.success("e2")  # a long request on e2 finished well after e2 was ejected
    t[0] += 1
    h.success("e4")
    h.failure("e4", "reset")  # ...but e4 failed again since
    assert h.candidates() == ["e2"]


def test_probe_ok_ends_an_ejection_and_unknown_ids_are_ignored() -> None:
    h, _ = make()
    h.failure("e3", "probe")
    h.failure("e3", "connect-refused")
    assert "e3" not in h.candidates()
    h.probe_ok("e3")
    assert "e3" in h.candidates()
    assert not h.failure("nope", "connect-refused")
    h.success("nope")
    assert h.stats()["e3"]["failures"] == {"probe": 1, "connect-refused": 1}


def test_all_ejected_never_prefers_the_one_that_just_died() -> None:
    h, t = make()
    for e in IDS:
        h.success(e)
    t[0] += 1
    h.failure("e1", "reset")  # e1, e2, e4 fail for a while (then are ejected)...
    h.failure("e2", "reset")
    h.failure("e4", "reset")
    t[0] += 1
    h.success("e3")  # ...e3 answered last, then died
    t[0] += 0.1
    for e in IDS:
        h.failure(e, "connect-refused")
    assert h.candidates() == ["e1"]  # failing the longest ago, not the one that just died


def test_after_an_ejection_one_trial_request_at_a_time_until_it_answers() -> None:
    h, t = make(base_ejection=10)
    h.failure("e1", "connect-refused")
    t[0] += 10.5  # the ejection is over: e1 is on trial
    assert "e1" in h.candidates()
    h.started("e1")  # its trial request
    assert "e1" not in h.candidates()  # no second request while the trial is out
    t[0] += 0.5
    h.failure("e1", "reset")  # the trial failed: out again at once, for longer
    assert h.ejection_seconds("e1") == 20
    t[0] += 20.5
    h.started("e1")
    t[0] += 0.1
    h.success("e1")  # the trial answered: back in full
    h.started("e1")
    assert "e1" in h.candidates()


def test_a_trial_without_an_outcome_lets_another_one_through_after_a_second() -> None:
    h, t = make(base_ejection=10)
    h.failure("e1", "connect-refused")
    t[0] += 10.5
    h.started("e1")
    t[0] += 1.1
    assert "e1" in h.candidates()
