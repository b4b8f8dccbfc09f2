import pytest
import torch

from fedbiscuit.federated.evaluation import majority_vote
from fedbiscuit.rlhf.labelling import vote

# columns: a clear A; a 2-1 win for B; one abstention beside one vote each way (a tie: mean 0.55 > 0.5);
# one vote for A and two abstentions; every selector at 0.5
PROBS = torch.tensor(
    [
        [0.9, 0.2, 0.5, 0.6, 0.5],
        [0.8, 0.3, 0.7, 0.5, 0.5],
        [0.1, 0.6, 0.45, 0.5, 0.5],
    ]
)


def test_a_selector_at_exactly_one_half_abstains():
    share = majority_vote(PROBS)
    # col 3 counted 0.5 as a vote for B before: 1 of 3 for A, so B won; as an abstention A wins 1-0
    assert share.tolist() == pytest.approx([2 / 3, 1 / 3, (0.5 + 0.7 + 0.45) / 3, 1.0, 0.5])


def test_evaluation_and_labelling_vote_by_the_same_rule():
    share = majority_vote(PROBS)
    first, decided = vote(PROBS)
    assert first.tolist() == (share > 0.5).tolist() == [True, False, True, True, False]
    assert decided.tolist() == [True, True, True, True, False]
    for k in range(1, 6):  # and on many random columns with exact halves in them
        gen = torch.Generator().manual_seed(k)
        probs = torch.randint(0, 5, (k, 200), generator=gen).float() / 4  # 0, .25, .5, .75, 1
        share = majority_vote(probs)
        first, decided = vote(probs)
        assert torch.equal(first, share > 0.5) and torch.equal(decided, share != 0.5)
