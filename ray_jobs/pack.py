"""`python -m ray_jobs.pack --input IN --output OUT [--max-len 8192] [--buckets B] [...]`: the pack
stage as a Ray job.

Submit to a cluster with `ray job submit --working-dir . -- python -m ray_jobs.pack ...`.
"""

import sys

from ovpipe.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("pack"))
