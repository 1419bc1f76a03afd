"""Scoring an archive of CT studies on Ray Data (``pip install "ctedge[ray]"``).

* ``StudyScorer``: the callable class a Ray Data pipeline maps over study references
  (``map_batches``); one ``Classifier`` per actor, one ``StudyResult`` row per study.
* ``score_archive``: what ``ctedge predict --study --ray`` runs: the references not yet
  in the output Parquet folder, scored on an actor pool, one part file per batch.
* ``STUDY_SCHEMA``, ``results_table``, ``result_from_row``: ``StudyResult`` as Arrow and back;
  ``ParquetFolder``: the output (a folder of part files) and its resume bookkeeping.

Ray is imported only by ``score_archive``; ``StudyScorer`` runs without it.
"""

from ctedge.edge.batch.archive import RayOptions, score_archive
from ctedge.edge.batch.scorer import INPUT, StudyScorer, actor_cpus, read_references, score_reference
from ctedge.edge.batch.storage import ParquetFolder, filesystem, is_url
from ctedge.edge.batch.table import STUDY_SCHEMA, result_from_row, results_table

__all__ = ["INPUT", "STUDY_SCHEMA", "ParquetFolder", "RayOptions", "StudyScorer", "actor_cpus", "filesystem",
           "is_url", "read_references", "result_from_row", "results_table", "score_archive", "score_reference"]
