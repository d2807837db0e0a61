"""Reliability tools run by hand or in a nightly job, never by ``make test``.

- ``python -m reliability.soak``: sustained load against the container (or the host ``serve``),
  counting failures and measuring memory growth.
- ``python -m reliability.audit``: known vulnerabilities in the serving dependencies (pip-audit),
  pickle in the code, credentials in the image.

:mod:`reliability.load` (the load generator) and :mod:`reliability.targets` (a server on the host
or in Docker, and its memory) are shared with ``tests/server``. Findings are in RELIABILITY.md.
"""
