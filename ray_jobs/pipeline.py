"""`python -m ray_jobs.pipeline --config run.toml [--input IN --output OUT] [--run-id ID]`:
the whole pipeline (ovpipe/pipeline.py) as one Ray job.

    ray job submit --working-dir . -- python -m ray_jobs.pipeline --config run.toml

`ovpipe run --address http://HEAD:8265 --config run.toml` submits this for you and follows
the logs.
"""

import sys

from ovpipe.cli import pipeline_main

if __name__ == "__main__":
    sys.exit(pipeline_main())
