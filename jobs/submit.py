"""`genfleet submit`: the same job through Ray Jobs on an existing cluster.

The working directory (a genfleet checkout) is shipped as the job's working_dir
and the fully resolved spec travels inline, so the cluster runs exactly what was
validated here. Credentials are not shipped: cluster nodes use their own (instance
roles, profiles); only non-secret storage settings (endpoint, region, profile) are.
"""

from __future__ import annotations

import json
import os
import shlex
import time

from pipeline.spec import JobSpec

SHIPPED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
EXCLUDES = [".git", ".venv", ".device", ".whl", "demo-output", "**/__pycache__", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 180


def entrypoint(spec: JobSpec, new_run: bool, retry_errors: bool = False) -> str:
    args = ["python", "-m", "jobs.cli", "run", "--spec-json", json.dumps(spec.model_dump(mode="json", by_alias=True))]
    return shlex.join(args + (["--new-run"] if new_run else []) + (["--retry-errors"] if retry_errors else []))


def submit(spec: JobSpec, *, address: str, working_dir: str, new_run: bool = False, retry_errors: bool = False,
           wait: bool = False) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    env = {k: os.environ[k] for k in SHIPPED_ENV if k in os.environ}
    deadline = time.time() + AGENT_WAIT_SECONDS
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(spec, new_run, retry_errors),
                runtime_env={"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env},
                metadata={"genfleet_output": spec.output, "genfleet_family": spec.family},
            )
            break
        except RuntimeError as e:
            # a head that has just started has no job agent yet: a bounded wait, nothing else
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    if wait:
        while (state := str(client.get_job_status(job_id)).rsplit(".", 1)[-1]) not in TERMINAL:
            time.sleep(2)
        print(client.get_job_logs(job_id))
        if state != "SUCCEEDED":
            raise RuntimeError(f"Ray job {job_id} ended {state}")
    return job_id
