# CUDA cluster image: the official Ray GPU image of the Ray version ovpipe pins, plus ovpipe with
# the `gpu` extra (faiss-gpu, vLLM, ray[llm]). Also usable as a KubeRay head/worker image.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/ovpipe
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ovpipe ./ovpipe
COPY --chown=ray:users curation ./curation
COPY --chown=ray:users packing ./packing
COPY --chown=ray:users trainer ./trainer
COPY --chown=ray:users ray_jobs ./ray_jobs
COPY --chown=ray:users scripts ./scripts

# The same install as the README, with the GPU extra instead of the CPU one.
RUN pip install --no-cache-dir -e '.[gpu]'

CMD ["ovpipe", "--help"]
