"""What a client encodes: a grouping round scores only the prefix of the held-out slice it needs."""

from fedbiscuit.data import ClientData
from fedbiscuit.data.pairs import Comparison
from fedbiscuit.federated.client import SelectorClient
from fedbiscuit.models.tiny import tiny_tokenizer
from fedbiscuit.selector.encoding import PairEncoder
from fedbiscuit.selector.prompts import Template, answer_token_ids


class CountingEncoder(PairEncoder):
    """On the cached path encoding a pair computes its trunk states: count how many pairs get encoded."""

    encoded = 0

    def encode(self, pairs, owner=None):
        self.encoded += len(pairs)
        return super().encode(pairs, owner)


def _pairs(n, tag):
    return [Comparison(f"{tag} question {i}", "yes", "no", 1.0, "c", "test") for i in range(n)]


def test_scoring_encodes_only_the_pairs_a_grouping_round_uses():
    tok = tiny_tokenizer()
    enc = CountingEncoder(tok, Template.parse("generic"), 512)
    client = SelectorClient(
        0, ClientData("c", _pairs(30, "train"), _pairs(20, "held")), enc, answer_token_ids(tok)
    )
    pairs = client.scoring_pairs(4)
    assert [tok.decode(p.prompt) for p in pairs] == [f"held question {i}" for i in range(4)]
    assert enc.encoded == 4  # not the 20 held-out pairs, nor the 30 training pairs
    client.scoring_pairs(4)
    assert enc.encoded == 4  # kept for the next grouping round
    assert len(client.scoring_pairs(None)) == 20 and enc.encoded == 24
    # a client without a held-out slice scores on (a prefix of) its training pairs
    lone = SelectorClient(1, ClientData("d", _pairs(10, "train"), []), enc, answer_token_ids(tok))
    assert len(lone.scoring_pairs(3)) == 3
