from fedbiscuit.data.synthetic import planted_rows


def test_planted_groups_and_noise():
    rows = planted_rows(clients=4, pairs=10)
    for r in rows:
        c = int(r["client"].split("-")[1])
        assert r["chosen"] == ("yes" if c % 2 == 0 else "no")
    noisy = planted_rows(clients=4, pairs=10, noise=0.2)
    flipped = sum(a["chosen"] != b["chosen"] for a, b in zip(rows, noisy, strict=True))
    assert flipped == 8  # every 5th judgment of each client
