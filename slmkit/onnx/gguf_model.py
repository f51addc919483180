"""The model the builder reads for a GGUF carry-over, made from the GGUF file itself.

The builder wants a transformers model. Loading the float checkpoint would map every float weight
in, 4 bytes a parameter, although the carry-over (slmkit.onnx.gguf_carry) replaces every MatMul
weight by the file's own blocks. So the model is built empty, on the meta device, and filled a
tensor at a time: the weights that only carried nodes read get a zero stand-in of their shape (a
broadcast scalar, no memory), every other tensor (norms, embeddings, biases, weights of types
that cannot be carried) gets gguf's dequantization as transformers loads it
(`GgufWeights.float_tensor`), so those are the same values a float checkpoint would hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmkit.onnx.gguf_carry import GgufWeights, checkpoint_names, empty_model, weights_only_carried


def model_from_gguf(gguf_path: Path, config_dir: Path) -> Any:
    """A float32 transformers model of `config_dir`'s config whose tensors come from `gguf_path`.

    Raises:
        ValueError: the file has no tensor for one of the model's parameters.
    """
    import torch

    config = json.loads((config_dir / "config.json").read_text())
    weights = GgufWeights(gguf_path, config)
    stand_ins = weights_only_carried(weights, int(config["num_hidden_layers"]))
    model = empty_model(config)
    shapes = dict(model.named_parameters())
    tensors, missing = {}, []
    for name in sorted(checkpoint_names(model)):  # a tied weight is tied to its source below
        if name in stand_ins:
            tensors[name] = torch.zeros((), dtype=torch.float32).expand(shapes[name].shape)
        elif name in weights:
            tensors[name] = torch.from_numpy(weights.float_tensor(name))
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"{gguf_path.name} has no tensor for {', '.join(missing[:3])}")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model.eval()
