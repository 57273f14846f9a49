"""``ovpipe-thumbnail``: a built-in stand-in embedding model that keeps image distances, offline.

Select it like any model: ``--set embed.model=ovpipe-thumbnail --set embed.pretrained=random``.

Why it exists: the tiny random open_clip model (``ovpipe-tiny-clip``) maps distinct images to
nearly the same vector (distinct pairs reach cosine 0.99996), so nothing that depends on image
similarity (near-duplicate removal, decontamination, concept assignment) can be tested or demoed
with it. This model is not a neural network and knows nothing about what an image shows; it only
keeps *pixel-level* distances:

* image side: the image is squashed to a ``image_size`` x ``image_size`` RGB thumbnail (open_clip's
  own preprocessing, ``resize_mode = squash``), average-pooled to ``grid`` x ``grid``, centred (its
  mean is subtracted: global brightness does not count), L2-normalised and multiplied by a fixed
  random Gaussian matrix ``[3 * grid * grid, embed_dim]`` drawn from ``embed.init_seed``, then
  L2-normalised again. By Johnson-Lindenstrauss the cosine of two outputs is the cosine of the two
  centred thumbnails to within about ``1 / sqrt(embed_dim)``: a resized, re-encoded or slightly
  cropped copy stays close (cosine > 0.9), unrelated images land near 0.
* text side (concept names, for assign and caption): **a stand-in with no meaning**. Each text is
  tokenised with open_clip's default tokenizer and mapped to a pseudo-random unit vector seeded by
  the xxh3 of its tokens and ``init_seed``. Concept assignment with it is a fixed random
  partition of thumbnail space: the same image always gets the same concepts and near copies get
  the same ones, but a "dog" concept has nothing to do with dogs. Use it for tests and the demo,
  never for a real run.

The module mimics the parts of an open_clip ``CLIP`` that ``curation/embed.py`` and
``curation/concepts.py`` use (``encode_image``, ``encode_text``, ``visual.preprocess_cfg``,
``visual.output_dim``), so the embed pipeline (padded batches, float16 output, resume, model
identity in the config hash) runs it unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xxhash

NAME = "ovpipe-thumbnail"
# The model's whole configuration (hashed into the model identity, like an open_clip config).
CONFIG: dict[str, Any] = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "grid": 16},
    "text_cfg": {"context_length": 77},
    "kind": "thumbnail random projection (a stand-in, not a neural model)",
}


def preprocess_cfg(config: dict[str, Any] = CONFIG) -> dict[str, Any]:
    """open_clip PreprocessCfg fields: squash (no crop: a slightly cropped copy keeps its layout)."""
    size = config["vision_cfg"]["image_size"]
    return {"size": [size, size], "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0}


def projection(seed: int, rows: int, dim: int) -> np.ndarray:
    """The fixed Gaussian JL matrix [rows, dim] (numpy's PCG64: the same on every machine)."""
    return np.random.default_rng([seed, rows, dim]).standard_normal((rows, dim)).astype(np.float32)


def text_vector(token_ids: np.ndarray, seed: int, dim: int) -> np.ndarray:
    """A unit vector determined by the token ids (padding stripped) and the seed: no meaning."""
    ids = np.trim_zeros(np.asarray(token_ids, np.int64), "b")
    if len(ids) == 0:
        return np.zeros(dim, np.float32)
    key = xxhash.xxh3_64_intdigest(ids.tobytes())
    v = np.random.default_rng([seed, key]).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def build_model(seed: int = 0, config: dict[str, Any] = CONFIG):
    """The model as a torch module (fp32, CPU); embed.load_model moves it to its device/dtype."""
    import torch

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            grid, dim = config["vision_cfg"]["grid"], config["embed_dim"]
            self.grid, self.output_dim = grid, dim
            self.preprocess_cfg = preprocess_cfg(config)
            # a (frozen) parameter, not a buffer: embed reads the model's dtype from its parameters
            self.proj = torch.nn.Parameter(torch.from_numpy(projection(seed, 3 * grid * grid, dim)),
                                           requires_grad=False)

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(1)
            x = x - x.mean(dim=1, keepdim=True)  # brightness does not count
            x = torch.nn.functional.normalize(x, dim=-1)
            return x @ self.proj

    class ThumbnailModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Visual()
            self.seed, self.dim = seed, config["embed_dim"]

        def encode_image(self, x, normalize: bool = False):
            y = self.visual(x)
            return torch.nn.functional.normalize(y, dim=-1) if normalize else y

        def encode_text(self, tokens, normalize: bool = False):
            rows = [text_vector(t, self.seed, self.dim) for t in tokens.cpu().numpy()]
            y = torch.from_numpy(np.stack(rows)).to(self.visual.proj.device, self.visual.proj.dtype)
            return torch.nn.functional.normalize(y, dim=-1) if normalize else y

    return ThumbnailModel().eval()
