"""The model the builder reads for a GGUF carry-over, made from the GGUF file itself.

A GGUF source's checkpoint has no weights (slmkit.sources.checkpoint.convert_gguf), and the builder
wants a transformers model. transformers' own GGUF loader dequantizes the whole file at once (17
GiB at Phi-3-mini's size). So the model is built empty, on the meta device, and filled a tensor at
a time with gguf's dequantization as transformers loads it (`GgufWeights.float_tensor`): the same
values a float checkpoint would hold. For the carry-over (slmkit.onnx.gguf_carry), which replaces
MatMul weights by the file's own blocks, those weights get a zero stand-in of their shape instead
(a broadcast scalar, no memory), so the builder never holds their float values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmkit.onnx.gguf_carry import GgufWeights, empty_model, weights_only_carried


def model_from_gguf(gguf_path: Path, config_dir: Path, stand_ins: bool = False) -> Any:
    """A float32 transformers model of `config_dir`'s config whose tensors come from `gguf_path`;
    with `stand_ins`, zero stand-ins for the weights that only carried nodes read.

    Raises:
        ValueError: the file has no tensor for one of the model's parameters.
    """
    import torch

    config = json.loads((config_dir / "config.json").read_text())
    model = empty_model(config)
    weights = GgufWeights(gguf_path, config, model)
    left_out = weights_only_carried(weights, int(config["num_hidden_layers"])) if stand_ins else set()
    parameters = dict(model.named_parameters())
    tensors, missing = {}, []
    for name in sorted(weights.checkpoint_names):  # a tied weight is tied to its source below
        if name in left_out:
            tensors[name] = torch.zeros((), dtype=torch.float32).expand(parameters[name].shape)
        elif name in weights:
            values = weights.float_tensor(name)  # an F32 tensor is the file's own read-only pages
            tensors[name] = torch.from_numpy(values if values.flags.writeable else values.copy())
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"{gguf_path.name} has no tensor for {', '.join(missing[:3])}")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model.eval()
