"""The GPU image is reproducible: the Dockerfile installs through docker/constraints-gpu.txt, whose
pins agree with each other (Ray = the base image's Ray; vLLM = what Ray's LLM extra pins; torch =
what that vLLM pins; every CUDA wheel of one CUDA major), and it copies what the README runs.

The image itself is not built here (no registry for it in the test environment). Facts about
packages that are not installed here were read from their PyPI metadata (wheel METADATA) and are
recorded below; the slow test re-resolves the whole stack against the package index."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "docker" / "constraints-gpu.txt"

# From PyPI metadata (Requires-Dist of the Linux x86_64 cp311 wheels), December 2026.
VLLM_PINS_TORCH = {"0.10.2": "2.8.0", "0.11.0": "2.8.0", "0.12.0": "2.9.0", "0.13.0": "2.9.0",
                   "0.15.1": "2.9.1", "0.16.0": "2.9.1", "0.17.1": "2.10.0", "0.18.1": "2.10.0",
                   "0.19.1": "2.10.0", "0.20.2": "2.11.0", "0.25.1": "2.11.0", "0.29.0": "2.13.0",
                   "0.34.0": "2.14.0"}
VLLM_PINS_TORCHVISION = {"0.19.1": "0.25.0", "0.20.2": "0.26.0", "0.25.1": "0.26.0", "0.29.0": "0.28.0",
                         "0.34.0": "0.29.0"}
# torch's PyPI wheel -> the CUDA major of the nvidia wheels it requires
TORCH_CUDA_MAJOR = {"2.8.0": 12, "2.9.0": 12, "2.9.1": 12, "2.10.0": 12, "2.11.0": 13, "2.13.0": 13}
RAY_LLM_PINS_VLLM = {"2.60.0": "0.29.0"}
FAISS_CUDA_MAJOR = {"faiss-gpu": 12, "faiss-gpu-cu12": 12, "faiss-gpu-cu11": 11, "faiss-cpu": None}


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{CONSTRAINTS.name}: {line!r} is not an exact pin (name==version)"
            out[name.strip().lower()] = version.strip()
    return out


def test_dockerfile_installs_through_the_constraints_and_copies_what_the_readme_runs():
    text = (ROOT / "Dockerfile").read_text()
    installs = [ln for ln in text.splitlines() if ln.startswith("RUN") and "pip install" in ln]
    assert installs and all("-c docker/constraints-gpu.txt" in ln for ln in installs), installs
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", text, flags=re.M)
    assert "docker/constraints-gpu.txt" in copied
    for folder in ("benchmarks", "examples", "ovpipe", "curation", "packing", "trainer", "ray_jobs"):
        assert folder in copied, f"the Dockerfile does not copy {folder}/"
        assert (ROOT / folder).is_dir(), f"the Dockerfile copies {folder}/, which the repository lacks"
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-", text, flags=re.M)
    assert base and base.group(1) == pins()["ray"], "the base image's Ray and the pinned ray differ"


def test_gpu_pins_agree_with_each_other():
    p = pins()
    for name in ("ray", "vllm", "torch", "torchvision"):
        assert name in p, f"{CONSTRAINTS.name} does not pin {name}"
    for name in ("numpy", "pyarrow", "transformers"):  # the lock's versions are ones ovpipe accepts
        req = next(r for r in metadata.requires("ovpipe") or [] if re.match(rf"{name}\b", r))
        assert Requirement(req).specifier.contains(p[name]), f"{name}=={p[name]} is outside ovpipe's {req}"
    # Ray's LLM extra pins the vLLM it was tested with: read it from the installed Ray when it is the
    # pinned one (the dev and CI venv), else from the recorded metadata.
    if metadata.version("ray") == p["ray"]:
        wanted = [r for r in metadata.requires("ray") or [] if 'extra == "llm"' in r and r.startswith("vllm")]
        assert wanted, "ray's llm extra names no vllm"
        llm_vllm = re.search(r"==\s*([\w.]+)", wanted[0]).group(1)
    else:
        llm_vllm = RAY_LLM_PINS_VLLM[p["ray"]]
    assert p["vllm"] == llm_vllm, f"ray[llm]=={p['ray']} pins vllm {llm_vllm}, the constraints {p['vllm']}"
    assert p["torch"] == VLLM_PINS_TORCH[p["vllm"]], "vLLM pins another torch"
    assert p["torchvision"] == VLLM_PINS_TORCHVISION[p["vllm"]], "vLLM pins another torchvision"
    cuda = TORCH_CUDA_MAJOR[p["torch"]]
    faiss = [n for n in p if n.startswith("faiss")]
    assert len(faiss) == 1, f"exactly one FAISS package (they install the same module): {faiss}"
    faiss_cuda = FAISS_CUDA_MAJOR[faiss[0]]
    assert faiss_cuda in (None, cuda), f"{faiss[0]} is CUDA {faiss_cuda}, torch {p['torch']} is CUDA {cuda}"
    assert f"CUDA {cuda}" in CONSTRAINTS.read_text() or f"CUDA major: {cuda}" in CONSTRAINTS.read_text()


def test_the_consistency_check_fails_on_a_mismatched_stack(monkeypatch, tmp_path):
    """The check above can fail: a CUDA-12 FAISS beside the CUDA-13 torch is refused."""
    bad = tmp_path / "constraints.txt"
    bad.write_text(CONSTRAINTS.read_text().replace("faiss-cpu==1.15.1", "faiss-gpu-cu12==1.14.1.post1"))
    monkeypatch.setattr(sys.modules[__name__], "CONSTRAINTS", bad)
    with pytest.raises(AssertionError, match="faiss-gpu-cu12 is CUDA 12"):
        test_gpu_pins_agree_with_each_other()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OVPIPE_RESOLVE_GPU_STACK") != "1",
                    reason="asks the package index (~3 min); set OVPIPE_RESOLVE_GPU_STACK=1 after changing "
                           "docker/constraints-gpu.txt")
def test_the_pinned_stack_resolves_against_the_package_index(tmp_path):
    """pip's resolver (metadata only, nothing installed) accepts the image's install line with the
    constraints: the pins are satisfiable together, and resolve to exactly the pinned versions."""
    project = tmp_path / "proj"
    project.mkdir()
    for f in ("pyproject.toml", "README.md"):
        (project / f).write_text((ROOT / f).read_text())
    for pkg in ("ovpipe", "curation", "packing", "trainer", "ray_jobs"):
        (project / pkg).mkdir()
        (project / pkg / "__init__.py").write_text("")
    env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
           "PIP_CONFIG_FILE": os.devnull}
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--index-url", "https://pypi.org/simple", "-c", str(CONSTRAINTS), "--report", str(tmp_path / "r.json"),
           ".[cpu]", "ray[llm]"]
    try:
        r = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("the package index did not answer within 15 minutes")
    if r.returncode and re.search(r"(?i)connection|network|resolve host|timed out", r.stderr):
        pytest.skip(f"no access to the package index: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads((tmp_path / "r.json").read_text())["install"]}
    for name, version in pins().items():
        assert got.get(name) == version, f"{name}: resolved {got.get(name)}, pinned {version}"
    # CUDA 12 runtimes (torch's or FAISS's) beside CUDA 13 torch would be two stacks in one image;
    # (nixl and cutlass-dsl ship per-CUDA plug-in wheels of both majors: those are theirs to pick)
    assert not {"nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12", "faiss-gpu", "faiss-gpu-cu12"} & set(got)
