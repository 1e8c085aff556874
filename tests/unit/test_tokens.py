from addon.tokens import Hotness, TokenCache


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_exact_then_prefix_then_miss() -> None:
    c = TokenCache(10, 60)
    c.put("turn1", [1, 2, 3])
    assert c.lookup("turn1") == ((1, 2, 3), "exact")
    assert c.lookup("turn2", ["nope", "turn1"]) == ((1, 2, 3), "prefix")
    assert c.lookup("other", ["nope"]) == ((), "")
    assert (c.hits, c.prefix_hits, c.misses) == (1, 1, 1)


def test_size_and_ttl_bounds() -> None:
    clock = Clock()
    c = TokenCache(2, 10, clock=clock)
    c.put("a", [1])
    c.put("b", [2])
    c.put("c", [3])
    assert len(c) == 2 and c.get("a") is None
    clock.t += 11
    assert c.get("c") is None


def test_hotness_counts_within_window_and_is_bounded() -> None:
    clock = Clock()
    h = Hotness(window=60, max_records=2, clock=clock)
    assert h.record("k") == 1
    clock.t += 30
    assert h.record("k") == 2
    clock.t += 40  # the first access left the window
    assert h.record("k") == 2
    h.record("x")
    h.record("y")  # only two keys are kept
    assert h.count("k") + h.count("x") + h.count("y") <= 3


def test_tokens_are_stored_compactly_and_read_back_whole() -> None:
    c = TokenCache(10, 60)
    c.put("a", range(1000))
    c.put("big", [2**40, 1])
    assert c.get("a") == tuple(range(1000)) and c.get("big") == (2**40, 1)
    assert c._cache["a"].itemsize == 4  # not a tuple of Python ints
