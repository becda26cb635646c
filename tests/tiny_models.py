"""Tiny seeded, randomly initialised models for tests (no download, built in well under a second)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_EMBED_DIM = 32
TINY_IMAGE_SIZE = 32
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_open_clip_config(
    *,
    image_size: int = TINY_IMAGE_SIZE,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    text_vocab_size: int = 64,
) -> dict[str, Any]:
    """``open_clip_config.json`` content of a tiny CLIP: ViT width 64, 2 layers, patch 8, embed dim 32.

    ``text_vocab_size``: 49408 makes the text tower take open_clip's own tokenizer (for text queries)."""
    return {
        "model_cfg": {
            "embed_dim": TINY_EMBED_DIM,
            "vision_cfg": {
                "image_size": image_size,
                "layers": 2,
                "width": 64,
                "head_width": 32,
                "patch_size": 8,
            },
            "text_cfg": {
                "context_length": 8,
                "vocab_size": text_vocab_size,
                "width": 32,
                "heads": 2,
                "layers": 1,
            },
        },
        "preprocess_cfg": {
            "mean": list(mean),
            "std": list(std),
            "interpolation": interpolation,
            "resize_mode": resize_mode,
        },
    }


def make_tiny_open_clip_dir(
    path: str | Path, *, seed: int = 0, weights: str = "safetensors", **config: Any
) -> str:
    """Write a tiny open_clip model folder (HF layout) at ``path`` and return its model id ``local-dir:PATH``.

    ``weights`` is ``safetensors`` (``open_clip_model.safetensors``) or ``bin``
    (``open_clip_pytorch_model.bin``, a plain state dict); ``config`` goes to :func:`tiny_open_clip_config`.
    """
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    full_config = tiny_open_clip_config(**config)
    (folder / "open_clip_config.json").write_text(json.dumps(full_config, indent=2), encoding="utf-8")
    torch.manual_seed(seed)
    cfg = full_config["model_cfg"]
    model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, str(folder / "open_clip_model.safetensors"))
    elif weights == "bin":
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        raise ValueError(f"weights must be safetensors or bin, got {weights!r}")
    return f"local-dir:{folder}"
