"""`ovpipe run --address`: submit the pipeline to a Ray cluster as a job and follow its logs.

The job runs ``python -m ray_jobs.pipeline --config env:OVPIPE_CONFIG_JSON`` in this repository
(shipped as the job's working_dir; Ray honours .gitignore, so virtual environments and outputs
stay behind), with the resolved config passed as JSON in an environment variable: what runs on
the cluster is exactly what `ovpipe config show` prints here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ovpipe.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ENV = "OVPIPE_CONFIG_JSON"


def submit_pipeline(address: str, cfg: Config, *, wait: bool = True, overwrite: bool = False,
                    poll_s: float = 2.0) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = f"python -m ray_jobs.pipeline --config env:{CONFIG_ENV}" + (" --overwrite" if overwrite else "")
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO_ROOT), "env_vars": {CONFIG_ENV: cfg.model_dump_json()}},
        metadata={"ovpipe_run_id": cfg.pipeline.run_id or "(from inputs)"},
    )
    print(f"submitted {job_id} to {address}; output: {cfg.pipeline.output}", flush=True)
    if not wait:
        return 0
    printed = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"job {job_id}: {status.value}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(poll_s)
