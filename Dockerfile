# CUDA cluster image: the official Ray GPU image of the Ray version ovpipe pins, plus ovpipe with
# its GPU stack pinned (docker/constraints-gpu.txt). Also usable as a KubeRay head/worker image.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/ovpipe
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ovpipe ./ovpipe
COPY --chown=ray:users curation ./curation
COPY --chown=ray:users packing ./packing
COPY --chown=ray:users trainer ./trainer
COPY --chown=ray:users ray_jobs ./ray_jobs
COPY --chown=ray:users scripts ./scripts
# the README's benchmark and example-config commands run inside the image too
COPY --chown=ray:users benchmarks ./benchmarks
COPY --chown=ray:users examples ./examples
COPY --chown=ray:users docker/constraints-gpu.txt ./docker/constraints-gpu.txt

# The README's install with the GPU stack pinned (docker/constraints-gpu.txt): Ray's LLM extra
# (vLLM 0.29.0 -> torch 2.13.0, all CUDA 13; the nodes need NVIDIA driver >= 580). FAISS's GPU
# wheels are CUDA 12 only, so the image takes the cpu extra's faiss-cpu and assign searches with
# torch on the GPU (same output). Same pins => the same image on every rebuild.
RUN pip install --no-cache-dir -c docker/constraints-gpu.txt -e '.[cpu]' 'ray[llm]'

CMD ["ovpipe", "--help"]
