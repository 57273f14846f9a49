"""`python -m ray_jobs.assign --input IN --output OUT [...]`: the assign stage as a Ray job.

Submit to a cluster with `ray job submit --working-dir . -- python -m ray_jobs.assign ...`.
"""

import sys

from ovpipe.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("assign"))
