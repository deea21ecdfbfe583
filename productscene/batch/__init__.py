"""Headless catalogue jobs through ComfyUI's HTTP API: a manifest in, images with provenance out.

    python -m productscene batch --server URL [--server URL ...] --workflow API.json \\
        --manifest products.csv --out DIR [--resume]

Host-free (standard library, aiohttp, numpy and PIL), in four steps: the rows (``manifest``: a CSV manifest or a
folder), the check of the whole job before anything is uploaded or queued (``plan``), the run
over one or more servers (``run``), and the files it leaves (``records``: provenance, journal).
docs/batch.md describes the manifest, the binding convention and the files written.
"""
from __future__ import annotations

from ..errors import ProductSceneError
from .manifest import COLUMNS, ManifestRows, Row, folder_rows, read_manifest
from .plan import BatchError, Job, Options, Plan, check_job
from .records import JOURNAL_NAME, PROVENANCE_FORMAT, PROVENANCE_NAME, read_provenance
from .report import Progress, Summary
from .run import BatchRun

__all__ = ["COLUMNS", "JOURNAL_NAME", "PROVENANCE_FORMAT", "PROVENANCE_NAME", "BatchError", "BatchRun", "Job",
           "ManifestRows", "Options", "Plan", "Progress", "Row", "Summary", "check_job", "folder_rows",
           "read_manifest", "read_provenance", "run_batch"]


def run_batch(options: Options, *, manifest=None, folder=None, progress=None, log=None) -> Summary:
    """Check the job (BatchError listing every problem, nothing queued), then run it."""
    if (manifest is None) == (folder is None):
        raise ProductSceneError("give a manifest (--manifest products.csv) or a folder (--folder DIR), not both")
    if manifest is not None:
        rows, source = ManifestRows(manifest), str(manifest)
    else:
        rows, source = folder_rows(folder), str(folder)
    job = check_job(options, rows, source)
    return BatchRun(job, progress=progress, log=log).run()
