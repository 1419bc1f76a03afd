"""`ctedge evaluate --from-parquet OUT.parquet --labels labels.csv`: an archive's answers
(``predict --study --ray``) scored against the hospital's own labels, patient-level, as
``evaluate --study`` scores class folders (the same ``score_studies``).

labels.csv (UTF-8, a header, one study a row, further columns ignored)::

    study_uid,label                 or    input,label
    1.2.840.113619.2.55.3.1,CT_COVID        studies/patient1,1
    1.2.840.113619.2.55.3.2,CT_NonCOVID     s3://bucket/patient2.zip,0

The key is ``study_uid`` (StudyInstanceUID) or ``input`` (the reference scored: a
relative path is taken from the labels file's folder); the label is the model's
positive or negative class name, or 1 / 0. A bad row, a study the Parquet lacks and a
study labelled twice are errors naming the file and line.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write
from ctedge.core.metrics import DEFAULT_RESAMPLES
from ctedge.core.results import StudyEvaluation, StudyResult, dumps
from ctedge.edge.batch import ParquetFolder, is_url, result_from_row
from ctedge.evaluation.evaluate import score_studies

KEYS = ("study_uid", "input")


@dataclass(frozen=True)
class Label:
    """One labelled study: its key, the truth (1: positive), the line it is on."""

    key: str
    truth: int
    line: int


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CtedgeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", param="labels") from None
    except OSError as exc:
        raise CtedgeError(f"{path}: cannot be read ({exc.strerror or exc})", param="labels") from None


def read_labels(path: Path, positive: str, negative: str) -> tuple[str, list[Label]]:
    """The key column's name and the labelled studies of a labels.csv (see the module's doc)."""
    reader = csv.reader(io.StringIO(_text(path)))
    names = [name.strip() for name in next(reader, [])]
    keys = [key for key in KEYS if key in names]
    if len(keys) != 1 or "label" not in names:
        raise CtedgeError(f"{path}:1: the header must name one key column (study_uid or input) and label, "
                          f"not {','.join(names) or 'nothing'}", param="labels")
    key_name, key_at, label_at = keys[0], names.index(keys[0]), names.index("label")
    values = {positive: 1, negative: 0, "1": 1, "0": 0}
    labels: list[Label] = []
    seen: dict[str, int] = {}
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(names):
            raise CtedgeError(f"{where}: {len(row)} cell(s), the header has {len(names)}", param="labels")
        key, label = row[key_at].strip(), row[label_at].strip()
        if not key:
            raise CtedgeError(f"{where}: no {key_name}", param="labels")
        if label not in values:
            raise CtedgeError(f"{where}: label {label!r} is not {positive}, {negative}, 1 or 0", param="labels")
        if key_name == "input" and not is_url(key):
            key = os.path.abspath(path.parent / key)
        if key in seen:
            raise CtedgeError(f"{where}: {key_name} {key} is labelled twice (first on line {seen[key]})",
                              param="labels")
        seen[key] = reader.line_num
        labels.append(Label(key, values[label], reader.line_num))
    if not labels:
        raise CtedgeError(f"{path}: labels no study", param="labels")
    return key_name, labels


def _match(labels: list[Label], key_name: str, results: list[StudyResult], labels_path: Path,
           parquet: str) -> list[tuple[Label, StudyResult]]:
    """Each label's one row of the Parquet; a label without a row, or with several, is an error."""
    index: dict[str, list[StudyResult]] = {}
    for result in results:
        index.setdefault(getattr(result, key_name), []).append(result)
    unread = [r.input for r in results if r.error and not r.study_uid]
    matched = []
    for label in labels:
        rows = index.get(label.key, [])
        where = f"{labels_path}:{label.line}: {key_name} {label.key}"
        if not rows:
            hint = (f" ({len(unread)} input(s) there got no answer before a StudyInstanceUID was read, e.g. "
                    f"{unread[0]}; label by input to count them)") if unread and key_name == "study_uid" else ""
            raise CtedgeError(f"{where} is not in {parquet}{hint}", param="labels")
        if len(rows) > 1:
            other = KEYS[1 - KEYS.index(key_name)]
            raise CtedgeError(f"{where} is {len(rows)} rows of {parquet} ({', '.join(r.input for r in rows[:3])}): "
                              f"label by {other}", param="labels")
        matched.append((label, rows[0]))
    return matched


def default_out(parquet: str) -> Path:
    """Where the evaluation goes unless told: ``eval-NAME/`` beside a local Parquet, else here."""
    name = "eval-" + Path(parquet.rstrip("/")).stem
    return Path(name) if is_url(parquet) else Path(parquet.rstrip("/")).parent / name


def evaluate_parquet(parquet: str, labels: str | Path, out: str | Path | None = None, threshold: float | None = None,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> StudyEvaluation:
    """Patient-level metrics with patient-resampled CIs of the labelled studies of an
    archive's Parquet; unlabelled studies are counted in a warning, labelled ones without
    an answer are ``failed``. The typed record is also written to ``out/metrics.json``."""
    from ctedge.core.files import check_writable

    if threshold is not None and not 0.0 < threshold < 1.0:
        raise CtedgeError(f"must be between 0 and 1, not {threshold}", param="threshold")
    folder = ParquetFolder(parquet)
    info = folder.run_info()
    if info is None:
        raise CtedgeError(f"{parquet}: no part files (score the archive first: ctedge predict MODEL INPUT... "
                          f"--study --ray local --parquet {parquet})", param="from_parquet")
    out = Path(out) if out is not None else default_out(parquet)
    check_writable(out, "--out", folder=True)
    results = [result_from_row(row) for row in folder.read().to_pylist()]
    key_name, labelled = read_labels(Path(labels), info["positive"], info["negative"])
    matched = _match(labelled, key_name, results, Path(labels), parquet)
    rows = [(info["positive"] if label.truth else info["negative"], label.truth, result) for label, result in matched]
    fields = score_studies(rows, info["threshold"] if threshold is None else threshold, out, resamples, seed, parquet)
    if len(results) > len(matched):
        fields["warnings"].append(f"{len(results) - len(matched)} of the {len(results)} studies in {parquet} have "
                                  "no label and are not scored")
    report = StudyEvaluation(model=info["model"], provider=info["provider"], runtime=info["runtime"],
                             precision=info["precision"], data=parquet, classes=[info["negative"], info["positive"]],
                             options=info["options"], **fields)
    atomic_write(dumps(report).encode(), out / "metrics.json")
    return report
