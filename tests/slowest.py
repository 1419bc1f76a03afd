"""The order pytest-xdist starts tests in, so the workers finish together.

``--dist worksteal`` gives each worker one contiguous chunk of the collected tests, then
moves tests from the end of a busy worker's queue to an idle one. A slow test at the end
of a chunk leaves the other workers idle while it runs; a test that waits for a session
fixture another worker is building (``conftest.built_once``) idles too. So the slowest
tests go first, spread over the chunks by cost (longest first, each to the least loaded
chunk), and those that need the trained-model fixtures go together into one chunk, which
builds them while the others run slow tests of their own.

The figures are seconds measured on this project's 2-core machine (CPU; wall where a test
mostly waits); they only decide the order, so a stale one costs balance, never a result
(tests/test_code_shape.py checks that every name below still names a test).
"""

from __future__ import annotations

# Tests (FILE::NAME) and whole files (FILE: its tests stay together, as they share a
# module fixture such as a Ray cluster) with their seconds here.
SLOWEST = {
    "test_export.py::test_efficientnetb3_itself_converts_with_parity": 36,
    "test_hardening.py::test_a_killed_training_run_resumes_with_every_epoch_once": 33,
    "test_tuning_search.py::test_chief_and_two_workers_run_every_trial_once": 30,
    "test_tuning_search.py::test_naive_mode_trains_full_models_in_a_fresh_process": 20,
    "test_tuning_search.py::test_hyperband_trains_brackets_with_epoch_budgets_and_warm_starts": 18,
    "test_archive_ray.py": 15,  # 10 s of CPU, 21 s of wall (the cluster starts)
    "test_cli_train_evaluate.py::test_demo_study_runs_the_whole_study_path": 14,
    "test_report.py::test_report_is_one_self_contained_page_with_every_section": 11,
    "test_tuning_search.py::test_random_init_backbone_of_the_best_model_is_the_one_features_came_from": 10,
    "test_serve_restart.py": 10,
    "test_cli_train_evaluate.py::test_training_is_repeatable_with_a_seed": 8,
    "test_cli_train_evaluate.py::test_demo_runs_end_to_end": 8,
    "test_model.py::test_local_weights_file_gets_the_imagenet_preprocessing": 7,
}
# The session fixtures that train, export or tune (conftest.py), with their CPU seconds:
# a chunk whose tests need them builds them once.
TRAINED = {"trained": 30, "trained_run": 0, "exported": 13, "onnx_model": 0, "trained_backbone": 2, "tuned": 17}


def _cost(nodeid: str) -> tuple[str, float] | None:
    """The SLOWEST entry (key, seconds) that ``nodeid`` (tests/FILE::NAME[...]) belongs to."""
    path, _, name = nodeid.partition("::")
    file = path.rsplit("/", 1)[-1]
    for key in (f"{file}::{name.split('[')[0]}", file):
        if key in SLOWEST:
            return key, SLOWEST[key]
    return None


def chunk_sizes(count: int, workers: int) -> list[int]:
    """How worksteal splits ``count`` tests over ``workers`` idle workers at the start."""
    sizes = []
    for i in range(workers):
        sizes.append((count - sum(sizes)) // (workers - i))
    return sizes


def order_for_workers(items: list, workers: int) -> list:
    """``items`` reordered so that each worker's first chunk starts with its share of the
    slowest tests (see the module's docstring); the rest keep their order. Items are
    pytest items (``nodeid``, ``fixturenames``)."""
    units: dict[str, list] = {}  # SLOWEST key -> its items, in collection order
    rest = []
    for item in items:
        found = _cost(item.nodeid)
        (units.setdefault(found[0], []) if found else rest).append(item)
    if workers < 2 or not units:
        return items
    needs_fixture = {key for key, group in units.items()
                     if any(set(item.fixturenames) & TRAINED.keys() for item in group)}
    loads = [0.0] * workers
    chunks: list[list] = [[] for _ in range(workers)]
    if needs_fixture:  # one chunk builds the trained fixtures and runs what needs them
        loads[0] = sum(TRAINED.values())
    for key in sorted(units, key=lambda k: (k not in needs_fixture, -SLOWEST[k])):
        target = 0 if key in needs_fixture else loads.index(min(loads))
        chunks[target] += units[key]
        loads[target] += SLOWEST[key]
    sizes = chunk_sizes(len(items), workers)
    if any(len(chunk) > size for chunk, size in zip(chunks, sizes)):
        return items  # a small selection: nothing to balance
    for chunk, size in zip(chunks, sizes):
        take = size - len(chunk)
        chunk += rest[:take]
        del rest[:take]
    return [item for chunk in chunks for item in chunk]
