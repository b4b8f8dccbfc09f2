import pytest
import torch

from fedbiscuit.selector.encoding import EncodedPair
from fedbiscuit.selector.metrics import agreement_report


def _pairs(labels, clients):
    return [EncodedPair([], [], [], lab, c) for lab, c in zip(labels, clients, strict=True)]


def test_agreement_per_order_averaged_and_brier():
    pairs = _pairs([1.0, 1.0, 0.0, 0.5], ["x", "x", "y", "y"])
    p_ab = torch.tensor([0.9, 0.6, 0.7, 0.5])  # P(a better) shown (a, b)
    p_ba = torch.tensor([0.2, 0.7, 0.6, 0.5])  # P(b better) shown (b, a)
    rep = agreement_report(pairs, p_ab, p_ba)
    o = rep["overall"]
    assert o["n"] == 3  # the tie has no hard label
    assert o["agreement_ab"] == pytest.approx(2 / 3)  # 0.9 ok, 0.6 ok, 0.7 wrong
    assert o["agreement_ba"] == pytest.approx(2 / 3)  # 1-p_ba = 0.8 ok, 0.3 wrong, 0.4 ok
    avg = torch.tensor([0.85, 0.45, 0.55, 0.5])
    assert o["agreement"] == pytest.approx(1 / 3)
    assert o["brier"] == pytest.approx(float(((avg - torch.tensor([1.0, 1.0, 0.0, 0.5])) ** 2).mean()))
    assert o["position_bias"] == pytest.approx(float(((p_ab + p_ba) / 2 - 0.5).mean()))
    assert rep["clients"]["x"]["agreement"] == pytest.approx(0.5)
    assert rep["clients"]["y"]["n"] == 1 and rep["clients"]["y"]["agreement"] == 0.0


def test_single_order_report():
    rep = agreement_report(_pairs([1.0, 0.0], ["x", "x"]), torch.tensor([0.8, 0.4]), None)
    assert rep["overall"]["agreement"] == 1.0 and "agreement_ba" not in rep["overall"]


def test_an_exact_tie_counts_half():
    # both orders say "first": the averaged P(a) is exactly 0.5, which is no preference, not a vote for B
    rep = agreement_report(_pairs([1.0, 0.0], ["x", "x"]), torch.tensor([0.8, 0.8]), torch.tensor([0.8, 0.8]))
    assert rep["overall"]["agreement"] == pytest.approx(0.5)
    assert rep["overall"]["agreement_ab"] == pytest.approx(0.5) and rep["overall"][
        "position_bias"
    ] == pytest.approx(0.3)


def test_wilson_interval_matches_the_formula():
    from fedbiscuit.selector.metrics import wilson_interval

    lo, hi = wilson_interval(60, 100)
    assert lo == pytest.approx(0.5020, abs=1e-4) and hi == pytest.approx(0.6906, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # stays inside [0, 1] where the normal approximation would not
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.25 < hi < 0.35


def test_paired_comparison_counts_discordant_pairs_and_tests_them():
    from scipy.stats import binomtest

    from fedbiscuit.selector.metrics import paired_comparison

    before = torch.tensor([1.0] * 50 + [0.0] * 50)
    after = torch.tensor([1.0] * 40 + [0.0] * 10 + [1.0] * 35 + [0.0] * 15)  # lost 10, gained 35
    out = paired_comparison(before, after)
    assert (out["gained"], out["lost"], out["n"]) == (35, 10, 100)
    assert out["difference"] == pytest.approx(0.25)
    assert out["mcnemar_p"] == pytest.approx(binomtest(35, 45, 0.5).pvalue)
    assert out["ci95"][0] < 0.25 < out["ci95"][1] and out["ci95"][0] > 0.1
    same = paired_comparison(before, before)
    assert same["mcnemar_p"] == 1.0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same, non-empty"):
        paired_comparison(before, after[:10])


def test_pair_correct_agrees_with_the_report():
    from fedbiscuit.selector.metrics import pair_correct

    pairs = _pairs([1.0, 1.0, 0.0, 0.5, 0.0], ["x"] * 5)
    p_ab = torch.tensor([0.9, 0.6, 0.7, 0.5, 0.8])
    p_ba = torch.tensor([0.2, 0.7, 0.6, 0.5, 0.8])  # the last pair averages to exactly 0.5: half credit
    correct = pair_correct(pairs, p_ab, p_ba)
    assert correct.tolist() == [1.0, 0.0, 0.0, 0.5]  # the tie label (0.5) is not a decided pair
    assert float(correct.mean()) == pytest.approx(agreement_report(pairs, p_ab, p_ba)["overall"]["agreement"])


def _client(agreement: float, n: int) -> dict:
    return {"agreement": agreement, "n": n}


def test_fairness_over_clients_each_counted_once():
    from fedbiscuit.selector.metrics import client_fairness

    clients = {
        "a": _client(0.9, 10),
        "b": _client(0.5, 100),  # many pairs, still one client
        "c": _client(0.7, 5),
        "d": _client(0.8, 20),
        "e": _client(0.6, 8),
        "tiny": _client(0.0, 2),  # below min_pairs: left out, not the worst client
    }
    f = client_fairness(clients, min_pairs=5)
    assert (f["clients"], f["left_out"], f["min_pairs"]) == (5, 1, 5)
    assert f["mean"] == pytest.approx(0.7)  # (0.9 + 0.5 + 0.7 + 0.8 + 0.6) / 5
    assert (f["worst"], f["worst_client"], f["best"]) == (0.5, "b", 0.9)
    assert f["p10"] == pytest.approx(0.54)  # 0.5 + 0.4 * (0.6 - 0.5): 10% of the way along 4 gaps
    assert f["spread"] == pytest.approx(0.4)
    assert f["std"] == pytest.approx(0.02**0.5)  # population std of 0.5..0.9
    everyone = client_fairness(clients, min_pairs=1)
    assert everyone["worst_client"] == "tiny" and everyone["clients"] == 6 and everyone["left_out"] == 0
    nobody = client_fairness(clients, min_pairs=1000)
    assert nobody["clients"] == 0 and nobody["worst_client"] is None and nobody["mean"] != nobody["mean"]


def test_every_agreement_report_carries_its_fairness():
    pairs = _pairs([1.0] * 5 + [0.0] * 5 + [1.0] * 2, ["x"] * 5 + ["y"] * 5 + ["z"] * 2)
    p = torch.tensor([0.9] * 5 + [0.9, 0.9, 0.1, 0.1, 0.1] + [0.9, 0.9])
    rep = agreement_report(pairs, p, 1 - p, min_client_pairs=5)
    f = rep["fairness"]
    assert rep["clients"]["x"]["agreement"] == 1.0 and rep["clients"]["y"]["agreement"] == pytest.approx(0.6)
    assert (f["clients"], f["left_out"], f["worst_client"]) == (2, 1, "y")  # z has 2 pairs
    assert f["mean"] == pytest.approx(0.8) and f["spread"] == pytest.approx(0.4)


def test_paired_comparison_counts_half_credit_changes_in_the_direction_of_the_mean():
    """Undecided pairs (0.5) moving to wrong are losses, wrong moving to undecided are gains: counting exact 1s
    only would call this a gain (4 pairs 0.5 -> 1 against 0) while the mean difference is negative."""
    from scipy.stats import binomtest

    from fedbiscuit.selector.metrics import paired_comparison

    before = torch.tensor([0.5] * 4 + [0.5] * 20 + [0.0] * 2 + [1.0] * 10)
    after = torch.tensor([1.0] * 4 + [0.0] * 20 + [0.5] * 2 + [1.0] * 10)
    out = paired_comparison(before, after)
    assert (out["gained"], out["lost"]) == (6, 20)
    assert out["difference"] == pytest.approx((4 * 0.5 - 20 * 0.5 + 2 * 0.5) / 36)
    assert out["difference"] < 0
    assert out["mcnemar_p"] == pytest.approx(binomtest(6, 26, 0.5).pvalue)
    assert out["mcnemar_p"] < 0.05


def test_the_permutation_test_reads_the_size_of_per_pair_differences_the_sign_test_ignores():
    """Per-pair means over seeds: 60 pairs up by a whole point, 100 down by a quarter. The mean moved up
    (60 - 25 = 35 of 400 pairs' worth); the sign test sees 60 against 100 and points down, the randomization
    test of the mean finds the gain."""
    from fedbiscuit.selector.metrics import paired_comparison

    before = torch.tensor([0.0] * 60 + [0.5] * 100 + [0.5] * 240)
    after = torch.tensor([1.0] * 60 + [0.25] * 100 + [0.5] * 240)
    out = paired_comparison(before, after)
    assert out["difference"] == pytest.approx((60 - 25) / 400)
    assert (out["gained"], out["lost"]) == (60, 100) and out["mcnemar_p"] < 0.01  # "worse", by counting
    assert out["permutation_p"] < 0.01 and out["ci95"][0] > 0

    # one outcome per pair: the randomization test agrees with McNemar's
    before = torch.tensor([1.0] * 50 + [0.0] * 50)
    after = torch.tensor([1.0] * 40 + [0.0] * 10 + [1.0] * 35 + [0.0] * 15)
    out = paired_comparison(before, after)
    assert out["mcnemar_p"] < 0.001 and out["permutation_p"] < 0.001
    # no difference: every draw is as far from zero as the observed mean
    assert paired_comparison(before, before)["permutation_p"] == 1.0
    null = paired_comparison(torch.tensor([1.0, 0.0] * 50), torch.tensor([0.0, 1.0] * 50))
    assert null["permutation_p"] > 0.5  # 50 gained, 50 lost: the mean did not move


def test_length_rule_by_hand():
    from fedbiscuit.data.pairs import Comparison
    from fedbiscuit.selector.metrics import length_rule, wilson_interval

    def pair(a, b, label):
        return Comparison("q", a, b, label, "c", "test")

    pairs = [
        pair("long answer", "no", 1.0),  # the longer preferred: 1
        pair("no", "long answer", 1.0),  # the shorter preferred: 0
        pair("ab", "cd", 0.0),  # equal lengths: half
        pair("x", "longer", 0.2),  # soft label for b, b longer: 1
        pair("x", "longer", 0.5),  # no preference: not counted
    ]
    rule = length_rule(pairs, len)
    assert rule["n"] == 4 and rule["agreement"] == pytest.approx(2.5 / 4)
    assert rule["ci95"] == list(wilson_interval(2.5, 4))
    assert length_rule([pair("a", "b", 0.5)], len)["n"] == 0  # nothing decided: n 0, no error
