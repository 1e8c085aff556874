"""The pure parts of the real peer-router comparison (bench/real_peers.py, scripts/real/
peers_real.py): the workload script, the ceiling in vLLM's accounting, the routers' command
lines. No server runs here; the comparison itself is tests/real/test_real_peers.py."""

from __future__ import annotations

from bench import real_peers
from bench.real_peers import RunResult, Workload, ceiling, make_script


def test_script_is_identical_for_a_seed_and_each_turn_extends_the_last() -> None:
    w = Workload(users=3, rounds=4)
    a, b = make_script(w, 7), make_script(w, 7)
    assert a.prompts == b.prompts and a.order == b.order
    assert make_script(w, 8).prompts != a.prompts
    assert sorted(a.order) == [0, 1, 2]
    system = a.prompts[0][0][0]
    for turns in a.prompts:
        assert turns[0][0] == system  # one shared system prompt
        for prev, cur in zip(turns, turns[1:], strict=False):
            # The next turn is the previous one + a scripted answer + a question.
            assert cur[: len(prev)] == prev
            assert [m["role"] for m in cur[len(prev):]] == ["assistant", "user"]


def test_ceiling_counts_whole_blocks_of_prefixes_already_sent_never_the_last_token() -> None:
    first = list(range(1, 11))  # 10 tokens: nothing sent before, no hit
    second = list(range(1, 9)) + [20, 21]  # shares 8 tokens = 2 blocks of 4
    assert ceiling([[first], [second]], order=[0, 1], block=4) == 8 / 20
    # An exact repeat of 8 tokens: vLLM computes the last token, so 1 block, not 2.
    eight = list(range(1, 9))
    assert ceiling([[eight], [eight]], order=[0, 1], block=4) == 4 / 16
    # Round by round in queue order: user 1 goes first here, so user 0 gets the hit.
    assert ceiling([[first], [second]], order=[1, 0], block=4) == 8 / 20


def test_moves_counts_a_users_turns_sent_to_another_server() -> None:
    r = RunResult("addon (fed)", 1, decisions=[
        [0, 0, "a", "x", ""], [0, 1, "a", "x", ""], [0, 2, "b", "x", ""],
        [1, 0, "b", "x", ""], [1, 1, "c", "x", ""]])
    assert r.moves() == (2, 3)


def test_router_command_lines() -> None:
    peers = real_peers.peers_real
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    vllm = peers.router_command("vllm", "cache_aware", urls, 9000, 9001)
    assert vllm[0].endswith("/bin/vllm-router")
    sg = peers.router_command("sglang", "round_robin", urls, 9000, 9001)
    assert sg[1:3] == ["-m", "sglang_router.launch_router"]
    for cmd in (vllm, sg):
        i = cmd.index("--worker-urls")
        assert cmd[i + 1: i + 3] == urls
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
        assert cmd[cmd.index("--prometheus-host") + 1] == "127.0.0.1"
        assert cmd[cmd.index("--prometheus-port") + 1] == "9001"
    assert vllm[vllm.index("--log-level") + 1] == "warning"
    assert sg[sg.index("--log-level") + 1] == "warn"
