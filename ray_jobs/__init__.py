"""Ray job entry points: `ray job submit --working-dir . -- python -m ray_jobs.<stage> ...`.

Every stage in the registry (ovpipe/registry.py) is a job here with the same arguments as
`ovpipe <stage>`, without a file of its own: the finder below makes `ray_jobs.<stage>` a module
that calls ``ovpipe.cli.stage_main("<stage>")`` when run with `python -m`. Two jobs are files
because they are more than a stage: `ray_jobs.pipeline` (the whole pipeline) and `ray_jobs.train`
(the trainer under Ray Train, for training on several nodes).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

from ovpipe import registry


class StageJobFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finds `ray_jobs.<name>` for every registered stage that has no module file of its own."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != __name__ or not name or "." in name:
            return None
        if registry.find(name) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=f"ovpipe.registry:{name}")

    def get_source(self, fullname: str) -> str:
        name = fullname.rpartition(".")[2]
        return (f'"""`python -m {fullname}`: the {name} stage as a Ray job (same arguments as `ovpipe {name}`)."""\n'
                "import sys\n\nfrom ovpipe.cli import stage_main\n\n"
                f"if __name__ == '__main__':\n    sys.exit(stage_main({name!r}))\n")

    def is_package(self, fullname: str) -> bool:
        return False

    def exec_module(self, module) -> None:
        exec(self.get_code(module.__name__), module.__dict__)


if not any(isinstance(f, StageJobFinder) for f in sys.meta_path):
    sys.meta_path.append(StageJobFinder())  # after the path finders: real files (pipeline, train) win
