"""`python -m ray_jobs.embed --input IN --output OUT [...]`: the embed stage as a Ray job.

Submit to a cluster with `ray job submit --working-dir . -- python -m ray_jobs.embed ...`.
"""

import sys

from ovpipe.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("embed"))
