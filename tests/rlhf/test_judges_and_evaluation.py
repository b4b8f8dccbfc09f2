import json
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from fedbiscuit.rlhf.evaluation import best_of_n_curve, bracket_winners, knockout, win_rate
from fedbiscuit.rlhf.judges import JudgeError, OpenAIJudge, parse_verdict


class LengthJudge:
    """Prefers the longer answer, whatever the order: a judge without position bias."""

    name = "length"

    def prefer(self, prompts, first, second):
        return [
            1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
            for a, b in zip(first, second, strict=True)
        ]


class FirstJudge:
    """Always prefers whatever is shown first: pure position bias."""

    name = "first"

    def prefer(self, prompts, first, second):
        return [0.9] * len(first)


def test_win_rate_counts_wins_losses_and_ties_over_both_orders():
    prompts = ["p"] * 4
    answers = ["long answer", "s", "same", "mid"]
    reference = ["x", "much longer", "same", "abc"]
    rep = win_rate(LengthJudge(), prompts, answers, reference)
    assert (rep["wins"], rep["losses"], rep["ties"], rep["identical"]) == (1, 1, 2, 1)
    assert rep["scores"] == [1.0, 0.0, 0.5, 0.5]  # per prompt, in order
    assert rep["win_rate"] == pytest.approx(0.5)
    assert rep["ci95"][0] < 0.5 < rep["ci95"][1]
    # a judge that only ever likes the first position gives ties, never wins
    biased = win_rate(FirstJudge(), prompts, answers, reference)
    assert biased["ties"] == 4 and biased["win_rate"] == 0.5 and biased["averaged_win_rate"] == 0.5
    assert rep["averaged_win_rate"] == pytest.approx(0.5)  # 1 win, 1 loss, 2 exact ties
    all_win = win_rate(LengthJudge(), ["p"] * 3, ["aaaa", "bbbb", "cccc"], ["a", "b", "c"])
    assert all_win["win_rate"] == 1.0 and all_win["ci95"] == [1.0, 1.0]
    # the sign test of wins against losses: 3 of 3 is p = 0.25, 1 of 2 (and all ties) no evidence
    assert all_win["sign_p"] == pytest.approx(0.25) and rep["sign_p"] == 1.0 and biased["sign_p"] == 1.0
    eight = win_rate(LengthJudge(), [f"p{i}" for i in range(8)], ["aaaa"] * 8, ["a"] * 8)
    assert eight["sign_p"] == pytest.approx(2 / 2**8)
    # each score's prompt, by content: the same prompt gives the same id in any run
    assert len(set(eight["prompt_ids"])) == 8 and len(set(all_win["prompt_ids"])) == 1
    assert eight["prompt_ids"][0] == win_rate(LengthJudge(), ["p0"], ["aaaa"], ["a"])["prompt_ids"][0]


def test_knockout_finds_the_judges_favourite():
    cands = [["a", "aaaa", "aa", "aaa", "a"], ["bb", "b"], ["c"]]
    assert knockout(LengthJudge(), ["p", "q", "r"], cands) == [1, 0, 0]


def test_a_bracket_gives_best_of_every_power_of_two():
    rng = random.Random(0)
    cands = [["x" * rng.randrange(1, 50) for _ in range(16)] for _ in range(5)]
    levels = bracket_winners(LengthJudge(), ["p"] * 5, cands)
    assert len(levels) == 5  # n = 1, 2, 4, 8, 16
    for k, picks in enumerate(levels):
        for c, i in zip(cands, picks, strict=True):
            # the pick at level k is a longest of the first 2**k candidates (the earlier one on a tie)
            assert i < 2**k and len(c[i]) == max(len(x) for x in c[: 2**k])
    assert levels[-1] == knockout(LengthJudge(), ["p"] * 5, cands)
    with pytest.raises(ValueError, match="power-of-2"):
        bracket_winners(LengthJudge(), ["p"], [["a", "b", "c"]])


def test_best_of_n_curve_gold_and_proxy():
    rng = random.Random(1)
    prompts = ["p"] * 200
    cands = [["y" * rng.randrange(1, 100) for _ in range(8)] for _ in prompts]
    baseline = ["y" * rng.randrange(1, 100) for _ in prompts]
    curve = best_of_n_curve(LengthJudge(), LengthJudge(), prompts, cands, baseline)
    assert [r["n"] for r in curve] == [1, 2, 4, 8]
    assert curve[0]["kl_bon"] == 0.0 and curve[3]["kl_bon"] == pytest.approx(math.log(8) - 7 / 8)
    gold = [r["gold"]["win_rate"] for r in curve]
    # two independent samples at n = 1; the longest of n beats a fresh sample about n / (n + 1) of the time
    assert abs(gold[0] - 0.5) < 0.1 and gold == sorted(gold) and gold[3] > 0.8
    assert [r["proxy"]["win_rate"] for r in curve] == gold  # the picker is the judge here
    # a picker the gold judge disagrees with (position bias only: it keeps candidate 0) gains nothing
    flat = best_of_n_curve(FirstJudge(), LengthJudge(), prompts, cands, baseline)
    assert all(r["picks"] == [0] * len(prompts) for r in flat)
    assert len({r["gold"]["win_rate"] for r in flat}) == 1


class _Endpoint(BaseHTTPRequestHandler):
    answer = "B"
    status = 200
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Endpoint.seen.append((self.headers.get("Authorization"), body))
        if _Endpoint.status != 200:
            self.send_response(_Endpoint.status)
            self.end_headers()
            return
        payload = json.dumps({"choices": [{"message": {"content": _Endpoint.answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Endpoint.answer, _Endpoint.status, _Endpoint.seen = "B", 200, []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_judge_reads_the_verdict_and_sends_the_key(endpoint, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekret")
    judge = OpenAIJudge(endpoint, "judge-model", api_key_env="MY_KEY")
    assert judge.prefer(["q"], ["first"], ["second"]) == [0.0]
    _Endpoint.answer = "A."
    assert judge.prefer(["q"], ["first"], ["second"]) == [1.0]
    for reply, verdict in (("**B**", 0.0), ("(A) is better", 1.0), ("B, clearly", 0.0), ("It's a tie", 0.5)):
        _Endpoint.answer = reply
        assert judge.prefer(["q"], ["first"], ["second"]) == [verdict], reply
    _Endpoint.answer = "I cannot decide"
    assert judge.prefer(["q"], ["first"], ["second"]) == [0.5] and judge.unparsed == 2
    auth, body = _Endpoint.seen[0]
    assert auth == "Bearer sekret" and body["model"] == "judge-model"
    assert "first" in body["messages"][0]["content"]


def test_openai_judge_errors_are_clear_and_quick(endpoint):
    _Endpoint.status = 401
    with pytest.raises(JudgeError, match=r"HTTP 401.*OPENAI_API_KEY"):
        OpenAIJudge(endpoint, "m").prefer(["q"], ["a"], ["b"])
    _Endpoint.status = 503  # retried, then reported
    with pytest.raises(JudgeError, match="HTTP 503"):
        OpenAIJudge(endpoint, "m", retries=1).prefer(["q"], ["a"], ["b"])
    assert len(_Endpoint.seen) == 1 + 2
    # nothing listens on this port: a connection error, not a hang
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(JudgeError, match=f"cannot reach the judge endpoint http://127.0.0.1:{port}"):
        OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2, retries=0).prefer(["q"], ["a"], ["b"])
    assert time.perf_counter() - start < 5
    with pytest.raises(JudgeError, match="rlhf.judge.url"):
        OpenAIJudge(None, "m")


def test_a_hanging_endpoint_times_out():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    port = listener.getsockname()[1]
    try:
        start = time.perf_counter()
        with pytest.raises(JudgeError, match="timeout 1.0 s"):
            OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", timeout_s=1.0, retries=0).prefer(
                ["q"], ["a"], ["b"]
            )
        assert time.perf_counter() - start < 4
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("A", 1.0),
        ("B", 0.0),
        ("**A**", 1.0),
        ("(B) is better", 0.0),
        ("A. It answers the question.", 1.0),
        ("Answer: B", 0.0),
        ("A\nbecause it is kinder", 1.0),
        ("A tie", None),  # an article, not a verdict
        ("A tie: both are fine", None),
        ("A or B", None),
        ("B is better", None),  # not a letter on its own: strict
        ("(A) and (B) are equal", None),
        ("Both", None),
        ("a", None),
        ("", None),
    ],
)
def test_verdicts_are_read_strictly(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_an_unreadable_reply_is_a_counted_abstention(endpoint):
    judge = OpenAIJudge(endpoint, "m")
    _Endpoint.answer = "A tie"
    assert judge.prefer(["q", "q"], ["first", "x"], ["second", "y"]) == [0.5, 0.5] and judge.unparsed == 2
    # win_rate reports the abstentions of its own calls (both orders), not the judge's running total
    for _ in range(2):
        rep = win_rate(judge, ["q"], ["policy answer"], ["reference answer"])
        assert rep["unparsed"] == 2 and rep["ties"] == 1 and rep["win_rate"] == 0.5
    _Endpoint.answer = "A"  # position bias: whatever is shown first wins, so each prompt is a tie
    rep = win_rate(judge, ["q"], ["policy answer"], ["reference answer"])
    assert rep["unparsed"] == 0 and rep["ties"] == 1


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    from fedbiscuit.rlhf.evaluation import length_controlled

    rng = random.Random(0)
    diffs = [rng.gauss(30, 40) for _ in range(400)]  # the policy is usually longer
    length_only = [1.0 if d > 0 else 0.0 for d in diffs]  # and the judge likes length, nothing else
    lc = length_controlled(length_only, diffs, draws=200)
    assert sum(length_only) / len(diffs) > 0.7
    assert abs(lc["win_rate"] - 0.5) < 0.1 and lc["length_slope"] > 3

    quality = [float(rng.random() < 0.7) for _ in diffs]  # verdicts that ignore length
    lc = length_controlled(quality, diffs, draws=200)
    raw = sum(quality) / len(quality)
    assert abs(lc["win_rate"] - raw) < 0.04 and abs(lc["length_slope"]) < 0.3
    assert lc["ci95"][0] < lc["win_rate"] < lc["ci95"][1]

    # both: log-odds 1 + 1.5 per standard deviation of length; at zero difference sigmoid(1) = 0.73
    sd = (sum((d - sum(diffs) / len(diffs)) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    mixed = [float(rng.random() < 1 / (1 + math.exp(-(1 + 1.5 * d / sd)))) for d in diffs]
    lc = length_controlled(mixed, diffs, draws=200)
    assert abs(lc["win_rate"] - 1 / (1 + math.exp(-1))) < 0.08 and 1.0 < lc["length_slope"] < 2.2
    with pytest.raises(ValueError, match="one length difference per verdict"):
        length_controlled([1.0, 0.0], [3.0])


def test_win_rate_reports_length_control_given_lengths():
    prompts = ["p"] * 6
    answers = ["long answer " * k for k in (3, 4, 5, 1, 6, 7)]
    reference = ["ref " * 8] * 6
    lens = ([len(a) for a in answers], [len(r) for r in reference])
    rep = win_rate(LengthJudge(), prompts, answers, reference, lengths=lens)
    assert "length_controlled" in rep and 0 <= rep["length_controlled"]["win_rate"] <= 1
    assert "length_controlled" not in win_rate(LengthJudge(), prompts, answers, reference)
