"""The order the workers start tests in (tests/slowest.py): every test once, the slowest
first in each worker's chunk, the ones needing the trained fixtures together."""

from types import SimpleNamespace

from slowest import SLOWEST, chunk_sizes, order_for_workers


def item(nodeid: str, *fixtures: str) -> SimpleNamespace:
    return SimpleNamespace(nodeid=nodeid, fixturenames=["tmp_path", *fixtures])


def test_slow_tests_lead_each_chunk_and_the_trained_ones_share_one():
    slow = [f"tests/{key}" for key in SLOWEST if "::" in key]
    fast = [item(f"tests/test_x.py::test_{i}") for i in range(100)]
    needing = {slow[3], slow[5]}
    items = fast[:50] + [item(n, "trained_run") if n in needing else item(n) for n in slow] + fast[50:]
    ordered = order_for_workers(items, 2)
    assert sorted(i.nodeid for i in ordered) == sorted(i.nodeid for i in items)
    first = chunk_sizes(len(ordered), 2)[0]
    chunks = [[i.nodeid for i in ordered[:first]], [i.nodeid for i in ordered[first:]]]
    leads = [[n for n in chunk if n in slow] for chunk in chunks]
    for chunk, lead in zip(chunks, leads):
        assert chunk[:len(lead)] == lead  # slow ones first
    assert needing <= set(leads[0]) and leads[0][:2] == [n for n in slow if n in needing]
    assert leads[1][0] == slow[0]  # the slowest test that needs no fixture starts the other worker
    assert order_for_workers(items, 1) == items  # one process: the order as collected


def test_worksteal_chunks_cover_the_run():
    assert chunk_sizes(457, 2) == [228, 229] and chunk_sizes(10, 4) == [2, 2, 3, 3]
