"""`ctedge serve`: a DICOM node and an HTTP API in one light process.

TensorFlow-free (core and edge only). The pieces: ``config`` (options, TOML),
``spool`` (received instances on disk, durable before they are acknowledged),
``node`` (the DICOM Storage SCP; ``guard`` and ``transport``: what a peer may make it hold),
``assembler`` (studies complete after a quiet
period, classified on one worker), ``sr`` (the TID 1500 Comprehensive SR),
``outbox`` (C-STORE to each destination, retried, persisted), ``http`` (FastAPI),
``logs`` (one redacting line per record),
``service`` (everything wired together).
"""
