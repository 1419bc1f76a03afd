"""`ctedge serve`: a DICOM node and an HTTP API in one light process.

TensorFlow-free (core and edge only). The pieces: ``config`` (options, TOML),
``journal`` (the node's state: one SQLite database in the spool), ``spool`` (instance
files, acknowledged only once their journal row is committed; the spool's lock),
``intake`` (one instance into the spool, whichever way it came), ``node`` (the DICOM
Storage SCP; ``guard`` and ``transport``: what a peer may make it hold), ``stow``
(STOW-RS in), ``poll`` (asking a PACS for new studies), ``assembler`` (studies complete
after a quiet period, or wait when they may be incomplete; classified on one worker),
``sr`` (the TID 1500 Comprehensive SR), ``capture`` (the Secondary Capture), ``fhir``
(the answer as a FHIR R4 Observation), ``outbox`` (C-STORE or STOW-RS to each
destination, retried until sent), ``disk`` (a full disk pauses the node), ``retention``,
``supervisor`` (the loops, restarted when they die), ``faults`` (named crash points),
``views`` and ``status`` (what HTTP shows), ``http`` (FastAPI), ``logs`` (one redacting
line per record), ``service`` (everything wired together).
"""
