"""An archive of CT studies scored on Ray Data: the references not yet in the Parquet
become a dataset, ``StudyScorer`` actors score them (``map_batches`` over an actor
pool), and the driver writes each scored batch as one part file as it arrives.

Resumable by construction: what is in the Parquet folder is done, so the same call
again scores only the rest. A kill loses the batches being scored at that moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ctedge import __version__
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.core.files import file_digest
from ctedge.core.progress import ProgressEvent, ProgressFn, report
from ctedge.core.results import ArchiveRun
from ctedge.edge.batch.scorer import INPUT, StudyScorer, read_references
from ctedge.edge.batch.storage import RUN_KEY, ParquetFolder
from ctedge.edge.study import StudyOptions

RAY_EXTRA = 'pip install "ctedge[ray]"'
MAX_STUDIES_PER_BATCH = 16  # per actor call and per part file
# What a resumed run must share with the rows already written (the answers depend on them).
SAME_RUN = ("model_sha256", "runtime", "precision", "threshold", "options")


class RunStopped(CtedgeError):
    """Ray stopped the run (a lost node, an actor that died); the part files written stay."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Where and how wide: ``address`` "local" (a cluster on this machine) or an existing
    cluster's (``auto`` on one of its nodes, or ``HEAD_IP:6379``); ``actors`` x
    ``cpus_per_actor`` (default: as many actors as the cluster's CPUs allow)."""

    address: str = "local"
    cpus_per_actor: int = 1
    actors: int | None = None
    studies_per_batch: int | None = None  # None: up to 16, fewer so every actor gets work
    verbose: bool = False  # Ray's own logs and the workers' output

    def __post_init__(self) -> None:
        for name in ("cpus_per_actor", "actors", "studies_per_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CtedgeError(f"must be at least 1, not {value}", param=name)


@contextlib.contextmanager
def ray_cluster(options: RayOptions):
    """Connect to (or start) the cluster; yields Ray's start-up seconds (None when this
    process already holds a Ray, an application's or a test's, which is used and kept)."""
    try:
        import ray
    except ImportError:
        raise CtedgeError(f"--ray needs Ray Data: {RAY_EXTRA}") from None
    if ray.is_initialized():
        yield None
        return
    level = logging.INFO if options.verbose else logging.WARNING
    started = time.perf_counter()
    try:
        if options.address == "local":
            ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=options.verbose)
        else:
            ray.init(address=options.address, logging_level=level, log_to_driver=options.verbose)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        cause = f": {str(exc.__cause__)[:300]}" if exc.__cause__ else ""  # e.g. the cluster's auth token missing
        raise CtedgeError(f"cannot reach the Ray cluster {options.address!r} ({exc}{cause})", param="ray") from None
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


def _pool(options: RayOptions) -> int:
    """Actors to start: as asked, or as many as the cluster's CPUs hold; more than a local
    cluster holds would wait forever, so that is an error."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    actors = options.actors or max(1, cpus // options.cpus_per_actor)
    if options.address == "local" and actors * options.cpus_per_actor > cpus:
        raise CtedgeError(f"{actors} is more than this machine's {cpus} CPUs hold at {options.cpus_per_actor} "
                          "CPU(s) an actor", param="actors")
    return actors


@contextlib.contextmanager
def _quiet_ray_data(verbose: bool):
    """ctedge draws its own progress bar: Ray Data's bars and plan logs only when verbose
    (an embedding application's settings come back afterwards)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    loggers = [logging.getLogger(name) for name in ("ray.data", "ray.data._internal.progress")]
    before = (context.enable_progress_bars, context.print_on_execution_start, [log.level for log in loggers])
    context.enable_progress_bars = context.print_on_execution_start = verbose
    for log, level in zip(loggers, (logging.WARNING, logging.ERROR)):  # the second: "progress bars disabled"
        log.setLevel(logging.INFO if verbose else level)
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = before[:2]
        for log, level in zip(loggers, before[2]):
            log.setLevel(level)


def run_info(clf, model: Path, options: StudyOptions) -> dict:
    """What the rows depend on, stored in every part file (and checked on resume)."""
    return {"model": str(model), "model_sha256": file_digest(model), "runtime": clf.runtime,
            "precision": clf.precision, "provider": clf.providers[0], "positive": clf.positive, "negative": clf.negative,
            "threshold": clf.threshold, "options": {k: v for k, v in options.to_dict().items()
                                                    if k not in ("workers", "batch_size")},
            "ctedge_version": __version__}


def _check_same_run(folder: ParquetFolder, info: dict) -> None:
    stored = folder.run_info()
    if stored is None:
        return
    differs = [key for key in SAME_RUN if stored.get(key) != info[key]]
    if differs:
        raise CtedgeError(f"{folder.uri} holds answers of another model or other options ({', '.join(differs)} "
                          f"differ: {stored.get('model')}); resume with the same ones, or name a new folder",
                          param="parquet")


def _errors_by_input(table: pa.Table) -> dict[str, int]:
    """Input -> its error rows (0 for an input whose studies all got an answer)."""
    counts: dict[str, int] = {}
    for reference, error in zip(table.column("input").to_pylist(), table.column("error").to_pylist()):
        counts[reference] = counts.get(reference, 0) + (error is not None)
    return counts


def _batches(ray_options: RayOptions, todo: list[str], scorer_kwargs: dict, actors: int, per_batch: int):
    """Scored batches (Arrow tables) as the actors finish them."""
    import ray.data

    with _quiet_ray_data(ray_options.verbose):  # Ray Data copies its context into each dataset made
        dataset = ray.data.from_items([{INPUT: reference} for reference in todo],
                                      override_num_blocks=math.ceil(len(todo) / per_batch))
        scored = dataset.map_batches(StudyScorer, fn_constructor_kwargs=scorer_kwargs, batch_size=per_batch,
                                     compute=ray.data.ActorPoolStrategy(size=actors),
                                     num_cpus=ray_options.cpus_per_actor, batch_format="numpy")
        try:
            yield from scored.iter_batches(batch_size=None, batch_format="pyarrow")
        except ray.exceptions.RayError as exc:
            cause = next((line for line in reversed(str(exc).splitlines()) if line.strip()), "")
            raise RunStopped(f"Ray stopped the run ({exc.__class__.__name__}: {cause.strip()[:300]}); the part "
                             "files written are kept: run the same command again to finish") from None


@dataclass
class _Tally:
    """What a run has written so far."""

    inputs: int = 0
    rows: int = 0
    errors: int = 0


def _write_batches(batches, folder: ParquetFolder, metadata: dict, errors: dict[str, int], total: int,
                   progress: ProgressFn | None) -> _Tally:
    """Each scored batch as one part file, as it arrives; ``errors`` (input -> error rows) kept up to date."""
    tally = _Tally()
    with contextlib.closing(batches):
        for table in batches:
            folder.write(table.replace_schema_metadata(metadata))
            batch_errors = _errors_by_input(table)
            errors.update(batch_errors)
            tally.inputs += len(batch_errors)
            tally.rows += table.num_rows
            tally.errors += sum(batch_errors.values())
            failed = table.filter(pc.is_valid(table.column("error")))
            for reference, error in zip(failed.column(INPUT).to_pylist(), failed.column("error").to_pylist()):
                report(progress, "studies", f"{reference}: {error}", tally.inputs, total)
            if progress:
                progress(ProgressEvent("studies", tally.inputs, total))
    return tally


def score_archive(model: str | Path, inputs: list[str], parquet: str, options: StudyOptions | None = None,
                  ray_options: RayOptions | None = None, *, runtime: str = "auto", precision: str | None = None,
                  provider: str = "auto", cache_dir: str | None = None,
                  progress: ProgressFn | None = None) -> ArchiveRun:
    """Score every study the inputs name (folders, zips, NIfTI, URLs, ``.txt`` lists of
    them) on Ray, skipping inputs already in ``parquet``; one part file per scored batch.
    ``progress`` hears each batch (inputs done of those to do) and each error row."""
    from ctedge.edge.runtime import Classifier

    options, ray_options = options or StudyOptions(), ray_options or RayOptions()
    references, repeated = read_references(inputs)
    folder = ParquetFolder(parquet)
    folder.prepare()
    model = Path(os.path.abspath(model))
    clf = Classifier(model, provider, 1, runtime=runtime, precision=precision, cache_dir=cache_dir,
                     max_pixels=options.max_pixels)  # checked here, before any cluster starts
    info = run_info(clf, model, options)
    del clf  # the actors load their own; the driver keeps no session through the run
    _check_same_run(folder, info)
    errors = _errors_by_input(folder.read([INPUT, "error"]))
    todo = [reference for reference in references if reference not in errors]
    scorer_kwargs = {"model": str(model), "options": options, "runtime": info["runtime"],
                     "precision": info["precision"], "provider": provider, "cache_dir": cache_dir}
    tally, startup, seconds, actors, per_batch = _Tally(), None, 0.0, 0, 0
    if todo:
        with ray_cluster(ray_options) as startup:
            actors = _pool(ray_options)
            per_batch = ray_options.studies_per_batch or max(1, min(MAX_STUDIES_PER_BATCH,
                                                                    math.ceil(len(todo) / (4 * actors))))
            report(progress, "studies", f"scoring {len(todo)} of {len(references)} inputs on {actors} actor(s) "
                   f"x {ray_options.cpus_per_actor} CPU(s)", 0, len(todo))
            started = time.perf_counter()
            tally = _write_batches(_batches(ray_options, todo, scorer_kwargs, actors, per_batch), folder,
                                   {RUN_KEY: json.dumps(info).encode()}, errors, len(todo), progress)
            seconds = time.perf_counter() - started
    return ArchiveRun(model=str(model), parquet=parquet, runtime=info["runtime"], precision=info["precision"],
                      address=ray_options.address, actors=actors, cpus_per_actor=ray_options.cpus_per_actor,
                      studies_per_batch=per_batch, inputs=len(references), repeated=repeated,
                      skipped=len(references) - len(todo), scored=tally.inputs, rows_written=tally.rows,
                      errors_written=tally.errors, parts_written=folder.written,
                      errors=sum(errors.get(reference, 0) for reference in references), ray_startup_s=startup,
                      seconds=seconds, studies_per_s=tally.rows / seconds if seconds else None)
