"""Put a GGUF file's own quantized weights into the builder's int4 ONNX model, exactly.

`download` turns a GGUF source into a float checkpoint (gguf's dequantization, through
transformers), and the onnxruntime-genai builder quantizes that again with its own rounding: on
SmolLM2's Q4_1 file that new rounding changed the greedy answer of 22 of 24 eval rows. Here the
builder's graph stays as it is and each MatMulNBits node gets the GGUF's codes, scales and zero
points instead (slmkit.onnx.gguf_blocks); types with a per-block minimum (Q4_1, Q5_1, Q4_K, Q5_K)
add `blocksum(x) · minᵀ`, a small float MatMul of K/32 columns, to the node's output.

Which GGUF tensor feeds which node: the builder names nodes after the Hugging Face modules
(`/model/layers.3/attn/qkv_proj/MatMul_Q4`), gguf's own TensorNameMap gives each module's GGUF
name, and transformers' GGUF tensor processor gives the row order (llama.cpp permutes the q and
k rows of llama models). Nothing is trusted blindly: every carried node must dequantize to
exactly gguf's own dequantization of the file, as transformers loads it; a node whose GGUF type
has no exact form keeps the builder's weights, and the report says which and why.

The builder never reads the float weights of the nodes that will be carried
(`weights_only_carried` names them; slmkit.onnx.gguf_model hands the builder a zero stand-in), so
the carry-over costs the quantized file's memory, not a float copy's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import UserError
from slmkit.onnx.gguf_blocks import CARRIED_TYPES, BlockWeights, block_weights, concat_rows

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul")
_MODULE_PREFIX = {"attn": "self_attn", "mlp": "mlp"}
# Builder nodes that stack several checkpoint weights (llama's q, k, v), and nodes that take one
# half of a fused checkpoint weight (Phi-3's gate_up_proj).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_SPLIT = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
# The input embedding, which a tied LM head reads as its weight.
_EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Activations:
    """How a carried 4-bit node's activations are computed: MatMulNBits' accuracy_level (4: int8,
    quantized per block of the weights; 1: float32), and the block the weights are re-blocked to
    (each scale repeated, the minimums kept per their own block, so the values stay exact), in
    the attention's q/k/v input projections and in the other nodes (None: the file's own, 32).
    `attention_block_with_mins`: the attention's block applies only to types with minimums (see
    ACTIVATIONS)."""

    level: int
    attention_block: int | None = None
    block: int | None = None
    attention_block_with_mins: bool = False


# On SmolLM2's Q4_1 file, 1,792 positions of the shipped text, against transformers in float32
# (top-1 agreement, KLD over the whole vocabulary; bench/fidelity.py; llama-server on the same
# positions: 95.0%, and 0.0035 over the reference's top 20, against our 0.0032 for int8-16-qkv and
# 0.0025 for int8-16):
#   int8-32      llama.cpp's own blocks (q8_0/q8_1 per 32)            94.8%  0.0052
#   int8-16-qkv  per 16 in q/k/v only                                 95.8%  0.0042
#   int8-16      per 16 everywhere                                    96.7%  0.0033
#   float32      accuracy level 1, about half the decode speed       97.8%  0.0007
# The q/k/v projections read RMSNorm's output, whose outlier channels make their int8 rounding
# error twice the other nodes' (bench/fidelity.py's node table): per 16 there buys most of
# int8-16's fidelity, and blocks of 32 elsewhere decode 26% faster than int8-16 (SmolLM2, this
# machine, 2026-12-05: 197 against 156 tok/s). A symmetric type at int8 per 32 is llama.cpp's own
# arithmetic (q8_0 activations per 32 times the file's codes and scales), while a type with
# minimums, recentred, keeps its codes half a step off centre (1.07× llama.cpp's error per node).
# So the default re-blocks q/k/v only for types with minimums: on llama-quantize's Q4_0 of the
# same model (2026-12-05) int8-32 gave 94.6% top-1 and KLD 0.0034 over the top 20 against
# llama-server's 94.8% and 0.0032 on the same file (int8-16-qkv: 95.6%, 0.0026), and at
# Phi-3-mini's size it decodes 15% faster (15.4 against 13.4 tok/s). At blocks of 32 a lone row
# and a batch's rows may take different MLAS kernels (AVX2), which the decoder measures at load
# and works around (slmkit.onnx.batching.batch_behaviour), so every answer stays the one it gets
# alone. 8-bit weights always take int8 per 32: below level 4 onnxruntime 1.32 has no fast kernel
# for them (1.2 ms against 38 µs for 576×1536).
ACTIVATIONS = {
    "int8-32": Activations(4),
    "int8-16-qkv": Activations(4, attention_block=16),
    "int8-16-qkv-mins": Activations(4, attention_block=16, attention_block_with_mins=True),
    "int8-16": Activations(4, attention_block=16, block=16),
    "float32": Activations(1),
}
DEFAULT_ACTIVATIONS = "int8-16-qkv-mins"
_ATTENTION_INPUTS = frozenset({"qkv_proj", "q_proj", "k_proj", "v_proj"})


@dataclass(frozen=True)
class Part:
    """Rows of one checkpoint weight that a MatMul node holds: all of them, or one half of a fused
    weight (Phi-3's gate_up_proj feeds the builder's gate_proj and up_proj nodes)."""

    hf_name: str
    half: int | None = None

    def select(self, rows: int) -> slice:
        if self.half is None:
            return slice(0, rows)
        return slice(self.half * rows // 2, (self.half + 1) * rows // 2)


def node_parts(node_name: str, checkpoint_names: Container[str]) -> list[Part] | None:
    """The checkpoint weights behind one of the builder's MatMul nodes, stacked along N; None
    for a node this mapping does not know (it then keeps the builder's weights)."""
    if node_name.startswith("/lm_head/MatMul"):
        name = "lm_head.weight" if "lm_head.weight" in checkpoint_names else _EMBEDDING
        return [Part(name)]
    match = _LAYER_NODE.match(node_name)
    if not match:
        return None
    layer, block, module = match.groups()
    prefix = f"model.layers.{layer}.{_MODULE_PREFIX[block]}"
    whole = f"{prefix}.{module}.weight"
    if whole in checkpoint_names:
        return [Part(whole)]
    if module in _FUSED:
        parts = [Part(f"{prefix}.{name}.weight") for name in _FUSED[module]]
        return parts if all(part.hf_name in checkpoint_names for part in parts) else None
    if module in _SPLIT and f"{prefix}.{_SPLIT[module][0]}.weight" in checkpoint_names:
        fused, half = _SPLIT[module]
        return [Part(f"{prefix}.{fused}.weight", half)]
    return None


@dataclass
class CarryReport:
    """What the carry-over did to each MatMul node: carried (with its GGUF types) or not, and why."""

    carried: dict[str, str] = field(default_factory=dict)
    requantized: dict[str, str] = field(default_factory=dict)

    def counts(self) -> str:
        return f"carried={len(self.carried)},requantized={len(self.requantized)}"

    def lines(self) -> list[str]:
        carried = [f"carried\t{node}\t{types}" for node, types in sorted(self.carried.items())]
        return carried + [f"requantized\t{node}\t{why}" for node, why in sorted(self.requantized.items())]


def empty_model(config: dict) -> Any:
    """A float32 transformers model of `config` (a config.json's contents), its parameters on the
    meta device: shapes and names, no memory."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(
            CONFIG_MAPPING[config["model_type"]].from_dict(config), dtype=torch.float32
        )


def checkpoint_names(model: Any) -> set[str]:
    """The tensors a checkpoint of `model` holds: its parameters, a tied weight under its source's
    name only (as `save_pretrained` writes them)."""
    return {name for name, _ in model.named_parameters()} - set(model.all_tied_weights_keys)


class GgufWeights:
    """The weights of a GGUF file by Hugging Face parameter name, in the checkpoint's row order."""

    def __init__(self, path: Path, config: dict, model: Any = None) -> None:
        """`model`: `empty_model(config)`, where the caller has one already."""
        import gguf
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        # gguf's name map takes any module name, a checkpoint's or not: Phi-3's file stores
        # gate_up_proj as ffn_up, which is also the name it gives an up_proj.
        self.checkpoint_names = checkpoint_names(empty_model(config) if model is None else model)
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.arch = bytes(self.reader.fields["general.architecture"].parts[-1]).decode()
        arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
        if self.arch not in arch_ids:
            raise UserError(f"{path.name}: GGUF architecture {self.arch!r} is unknown to the gguf package")
        self.names = gguf.get_tensor_name_map(arch_ids[self.arch], int(config["num_hidden_layers"]))
        self.processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=config)

    def gguf_name(self, hf_name: str) -> str | None:
        """The file's name for a checkpoint tensor (a module's weight or bias), None if absent."""
        module, _, suffix = hf_name.rpartition(".")
        base = self.names.get_name(module)
        return f"{base}.{suffix}" if base and f"{base}.{suffix}" in self.tensors else None

    def type_name(self, hf_name: str) -> str:
        name = self.gguf_name(hf_name)
        return self.tensors[name].tensor_type.name if name else "absent"

    def row_order(self, gguf_name: str, rows: int) -> np.ndarray:
        """The GGUF row of each checkpoint row: transformers' processor applied to row numbers.

        Raises:
            ValueError: the processor does more than reorder rows, so the rows cannot be carried.
        """
        index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        moved = np.asarray(self.processor.process(index, gguf_name).weights)
        order = moved.reshape(-1).astype(np.int64)
        if moved.shape != index.shape or not np.array_equal(np.sort(order), np.arange(rows)):
            raise ValueError(f"transformers changes the values of {gguf_name}, not only its row order")
        return order

    def __contains__(self, hf_name: object) -> bool:
        """Whether `hf_name` is a tensor of the checkpoint and of the file."""
        return hf_name in self.checkpoint_names and self.gguf_name(str(hf_name)) is not None

    def float_tensor(self, hf_name: str) -> np.ndarray:
        """The float32 tensor transformers loads for `hf_name`: gguf's dequantization, then
        transformers' processor (llama's q/k rows reordered, Gemma's norms less one), as in
        `load_gguf_checkpoint`, one tensor at a time.

        Raises:
            KeyError: the file has no tensor for it.
        """
        from gguf.quants import dequantize

        name = self.gguf_name(hf_name)
        if name is None:
            raise KeyError(f"no GGUF tensor for {hf_name}")
        tensor = self.tensors[name]
        values = dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(self.processor.process(weights=values, name=name).weights, dtype=np.float32)

    def carriable(self, hf_name: str) -> bool:
        """Whether `hf_name`'s tensor has an exact MatMulNBits form, found from its type and row
        order alone (nothing is decoded)."""
        name = self.gguf_name(hf_name)
        if name is None or self.tensors[name].tensor_type not in CARRIED_TYPES:
            return False
        try:
            self.row_order(name, int(self.tensors[name].shape[1]))
        except ValueError:
            return False
        return True

    def block_weights(self, hf_name: str) -> BlockWeights:
        """The weight in the checkpoint's row order.

        Raises:
            KeyError: no GGUF tensor for it, or its type has no exact MatMulNBits form.
        """
        name = self.gguf_name(hf_name)
        if name is None:
            raise KeyError(f"no GGUF tensor for {hf_name}")
        tensor = self.tensors[name]
        columns, rows = (int(size) for size in tensor.shape[:2])
        weights = block_weights(tensor.data, tensor.tensor_type, rows, columns)
        return weights.rows(self.row_order(name, rows))


# The builder's MatMul nodes of one decoder layer, by the names `node_parts` reads: llama's q, k
# and v may be one packed node or three, and Phi-3's gate_up_proj two nodes or one.
_LAYER_MODULES = {"attn": ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp": ("gate_up_proj", "gate_proj", "up_proj", "down_proj")}  # fmt: skip


def weights_only_carried(gguf: GgufWeights, layers: int) -> set[str]:
    """The checkpoint weights that no node of the builder's graph reads except nodes the
    carry-over replaces: every node that may hold them can be carried. The builder needs only
    their shapes. A tied embedding is never among them: the embedding's Gather reads it too."""
    nodes = [f"/model/layers.{layer}/{block}/{module}/MatMul"
             for layer in range(layers) for block, modules in _LAYER_MODULES.items() for module in modules]  # fmt: skip
    carried: set[str] = set()
    kept: set[str] = {_EMBEDDING}
    for node in [*nodes, "/lm_head/MatMul"]:
        parts = node_parts(node, gguf)
        if parts is None:
            continue
        names = {part.hf_name for part in parts}
        (carried if all(gguf.carriable(name) for name in names) else kept).update(names)
    return carried - kept


def carry_node_weights(
    parts: list[Part], gguf: GgufWeights, checkpoint: Callable[[str], np.ndarray]
) -> tuple[BlockWeights, str]:
    """The GGUF weights of one node and their types, checked against `checkpoint` (gguf's own
    dequantization, `GgufWeights.float_tensor`, in the carry-over).

    Raises:
        KeyError, ValueError: the node cannot be carried exactly; the message says why.
    """
    pieces, types = [], []
    for part in parts:
        weights = gguf.block_weights(part.hf_name)
        pieces.append(weights.rows(part.select(weights.shape[0])))
        types.append(gguf.type_name(part.hf_name))
    carried = concat_rows(pieces)
    expected = np.concatenate(
        [(w := checkpoint(part.hf_name))[part.select(w.shape[0])] for part in parts]
    )  # fmt: skip
    if carried.shape != expected.shape or not np.array_equal(carried.dequantize(), expected):
        raise ValueError("its GGUF weights do not dequantize to gguf's own values")
    return carried, "+".join(types)


def node_precision(weights: BlockWeights, activations: str, node_name: str = "") -> tuple[int, BlockWeights]:
    """MatMulNBits' accuracy_level for a carried node, and its weights as the node stores them:
    recentred on the default zero point (BlockWeights.recentered), in the block size its
    activations are quantized by (see ACTIVATIONS)."""
    precision = ACTIVATIONS[activations] if weights.bits == 4 else ACTIVATIONS["int8-32"]
    match = _LAYER_NODE.match(node_name)
    attention = bool(match) and match.group(3) in _ATTENTION_INPUTS
    if precision.attention_block_with_mins and weights.mins is None:
        attention = False
    block_size = precision.attention_block if attention else precision.block
    weights = weights.recentered()
    if block_size and block_size < weights.block_size:
        weights = weights.with_block_size(block_size)
    return precision.level, weights


def carry_gguf_weights(
    onnx_dir: Path,
    gguf_path: Path,
    checkpoint_dir: Path,
    activations: str = DEFAULT_ACTIVATIONS,
) -> CarryReport:
    """Replace the weights of the builder's MatMulNBits nodes in `onnx_dir` by `gguf_path`'s own.

    `checkpoint_dir` holds the config the builder read. Each carried node is checked to equal
    gguf's own dequantization exactly. `activations` is one of ACTIVATIONS.

    Raises:
        UserError: a node whose float weights the builder never read (`weights_only_carried`)
            could not be carried after all: the model would compute with stand-ins.
    """
    import onnx

    config = json.loads((checkpoint_dir / "config.json").read_text())
    weights = GgufWeights(gguf_path, config)
    stand_ins = weights_only_carried(weights, int(config["num_hidden_layers"]))
    model = onnx.load(str(onnx_dir / MODEL_FILE), load_external_data=True)
    graph = ModelGraph(model)
    for gate, up in gate_up_pairs(model, weights):
        graph.fuse_rows(gate, up, gate.name.replace("/gate_proj/", "/gate_up_proj/"))
    report = CarryReport()
    for node in [n for n in model.graph.node if n.op_type == "MatMulNBits"]:
        parts = node_parts(node.name, weights)
        if parts is None:
            report.requantized[node.name] = "no checkpoint weight is known for this node"
            continue
        try:
            carried, types = carry_node_weights(parts, weights, weights.float_tensor)
        except (KeyError, ValueError) as error:
            if any(part.hf_name in stand_ins for part in parts):
                raise UserError(f"{gguf_path.name}: {node.name} cannot be carried ({error}), "
                                "and the builder was given no float weights for it") from error  # fmt: skip
            report.requantized[node.name] = str(error).strip("'\"")
            continue
        graph.set_matmul_weights(node, *node_precision(carried, activations, node.name), exact=carried)
        report.carried[node.name] = types
    (onnx_dir / DATA_FILE).unlink(missing_ok=True)
    onnx.save_model(model, str(onnx_dir / MODEL_FILE), save_as_external_data=True, location=DATA_FILE)
    return report


def gate_up_pairs(model, weights: GgufWeights) -> list[tuple[Any, Any]]:
    """The builder's gate and up MatMulNBits nodes of each layer that one node can compute: they
    read the same input with the same attributes, and their GGUF weights are carriable and of
    one type (so one node stores both in the same bits).

    One node for both halves the minimum's four small ops there (Reshape, ReduceSum, MatMul,
    Add, about 5 µs each a step, mostly dispatch) and one MatMulNBits call: on SmolLM2's Q4_1
    file, 823 nodes a step instead of 943, and 11 to 13% more decode tok/s (2026-12-05).
    """
    nodes = {node.name: node for node in model.graph.node if node.op_type == "MatMulNBits"}
    pairs = []
    for name, gate in nodes.items():
        match = _LAYER_NODE.match(name)
        up = nodes.get(name.replace("/gate_proj/", "/up_proj/"))
        if not match or match.group(3) != "gate_proj" or up is None or up.input[0] != gate.input[0]:
            continue
        if {a.name: a for a in gate.attribute if a.name != "N"} != {a.name: a for a in up.attribute if a.name != "N"}:
            continue
        parts = [part for node in (gate, up) for part in node_parts(node.name, weights) or [None]]
        if None in parts or not all(weights.carriable(part.hf_name) for part in parts):
            continue
        if len({weights.type_name(part.hf_name) for part in parts}) == 1:
            pairs.append((gate, up))
    return pairs


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits' B: [N, K/block, block·bits/8] uint8, two 4-bit codes a byte, low nibble first."""
    rows, columns = codes.shape
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))
    return np.ascontiguousarray(codes.reshape(rows, columns // block_size, -1))


def unpack_matmul_nbits(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int, columns: int
) -> np.ndarray:
    """The float weight [N, K] that MatMulNBits computes with (its zero point default: 2^(bits−1))."""
    rows = packed.shape[0]
    flat = packed.reshape(rows, -1)
    codes = np.stack([flat & 0x0F, flat >> 4], axis=-1).reshape(rows, -1) if bits == 4 else flat
    codes = codes[:, :columns].astype(np.int16)
    blocks = columns // block_size
    if zero_points is None:
        zero = np.full((rows, blocks), 1 << (bits - 1), dtype=np.int16)
    elif bits == 4:
        zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(rows, -1)[:, :blocks]
    else:
        zero = zero_points
    scale = np.repeat(scales.reshape(rows, blocks), block_size, axis=1)
    return scale * (codes - np.repeat(zero.astype(np.int16), block_size, axis=1)).astype(np.float32)


class ModelGraph:
    """Edits of the builder's graph: one MatMulNBits node's weights, and the tied embedding that
    reads the lm_head's weights (the builder's GatherBlockQuantized over a Reshape of them)."""

    def __init__(self, model) -> None:
        self.model = model
        self.initializers = {init.name: init for init in model.graph.initializer}

    def _set_initializer(self, name: str, array: np.ndarray) -> None:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(array, name)
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.model.graph.initializer.append(tensor)
            self.initializers[name] = self.model.graph.initializer[-1]

    def _remove_initializer(self, name: str) -> None:
        del self.initializers[name]
        initializers = self.model.graph.initializer
        del initializers[next(i for i, init in enumerate(initializers) if init.name == name)]

    def fuse_rows(self, first, second, name: str) -> None:
        """Replace two MatMulNBits nodes that read the same input by one node `name` of both
        weights stacked along N, and a Split into their two outputs. The builder's own weights
        are stacked too, so the node computes what the two did until the carry-over sets it."""
        from onnx import helper, numpy_helper

        sizes = [next(a.i for a in node.attribute if a.name == "N") for node in (first, second)]
        fused = helper.make_node("MatMulNBits", [first.input[0]], [f"{name}/output_0"], name=name, domain=first.domain)
        fused.attribute.extend(first.attribute)
        next(a for a in fused.attribute if a.name == "N").i = sum(sizes)
        for index, (mine, theirs) in enumerate(zip(first.input[1:], second.input[1:], strict=True), start=1):
            stacked = f"{name}.input{index}"
            arrays = [numpy_helper.to_array(self.initializers[n]) for n in (mine, theirs)]
            self._set_initializer(stacked, np.concatenate(arrays))
            fused.input.append(stacked)
            for old in (mine, theirs):
                self._remove_initializer(old)
        self._set_initializer(f"{name}.split", np.array(sizes, dtype=np.int64))
        split = helper.make_node(
            "Split",
            [fused.output[0], f"{name}.split"],
            [first.output[0], second.output[0]],
            name=f"{name}/Split",
            axis=-1,
        )
        position = list(self.model.graph.node).index(first)
        self.model.graph.node.remove(first)
        self.model.graph.node.remove(second)
        self.model.graph.node.insert(position, split)
        self.model.graph.node.insert(position, fused)

    def _consumers(self, name: str) -> Iterator:
        return (node for node in self.model.graph.node if name in node.input)

    def set_matmul_weights(self, node, level: int, weights: BlockWeights, exact: BlockWeights) -> None:
        """Store `weights` (recentred, see node_precision) in the node; a tied embedding reads
        `exact`, the file's own blocks, so that its float table is gguf's values."""
        from onnx import helper

        weight_name, scales_name = node.input[1], node.input[2]
        tied = [n for n in self._consumers(weight_name) if n is not node]
        columns = weights.shape[1]
        bits = weights.bits
        if np.any(weights.zero_points != 1 << (bits - 1)):
            raise ValueError("carried weights are stored recentred, with the default zero points")
        self._set_initializer(weight_name, pack_codes(weights.codes, bits, weights.block_size))
        self._set_initializer(scales_name, weights.scales)
        del node.input[3:]
        for attribute, value in (("bits", bits), ("block_size", weights.block_size), ("accuracy_level", level)):
            node.attribute.remove(next(a for a in node.attribute if a.name == attribute))
            node.attribute.append(helper.make_attribute(attribute, value))
        for reshape in tied:
            self._retie_embedding(reshape, weights, exact)
        if weights.mins is not None:
            self._add_block_sums(node, weights.mins, columns // weights.min_block_size, weights.min_block_size)

    def _add_block_sums(self, node, mins: np.ndarray, blocks: int, block_size: int) -> None:
        """node's output += ReduceSum(Reshape(x, [batch, sequence, blocks, block]), last axis) · minsᵀ.

        Nodes that read the same input (the gate and up projections) get the same Reshape and
        ReduceSum; onnxruntime's common-subexpression pass computes them once.
        """
        from onnx import helper

        base, output = node.name, node.output[0]
        node.output[0] = f"{base}/without_mins"
        self._set_initializer(f"{base}.block_shape", np.array([0, 0, blocks, block_size], dtype=np.int64))
        self._set_initializer(f"{base}.sum_axes", np.array([-1], dtype=np.int64))
        self._set_initializer(f"{base}.mins", np.ascontiguousarray(mins.T))
        added = [
            helper.make_node("Reshape", [node.input[0], f"{base}.block_shape"], [f"{base}/blocks"], name=f"{base}/Blocks"),
            helper.make_node("ReduceSum", [f"{base}/blocks", f"{base}.sum_axes"], [f"{base}/block_sums"], name=f"{base}/BlockSums", keepdims=0),
            helper.make_node("MatMul", [f"{base}/block_sums", f"{base}.mins"], [f"{base}/mins_term"], name=f"{base}/Mins"),
            helper.make_node("Add", [f"{base}/without_mins", f"{base}/mins_term"], [output], name=f"{base}/AddMins"),
        ]  # fmt: skip
        position = list(self.model.graph.node).index(node) + 1
        for offset, new in enumerate(added):
            self.model.graph.node.insert(position + offset, new)

    def _retie_embedding(self, reshape, weights: BlockWeights, exact: BlockWeights) -> None:
        """Point the embedding at the carried weights: GatherBlockQuantized for symmetric types
        (its shape constant follows the new code width), a float Gather of `exact`'s values when
        the type has mins, which GatherBlockQuantized cannot add."""
        from onnx import helper

        gathers = [n for n in self._consumers(reshape.output[0]) if n.op_type == "GatherBlockQuantized"]
        if reshape.op_type != "Reshape" or len(gathers) != 1:
            raise ValueError(f"unexpected consumer {reshape.name} of the lm_head weights")
        gather = gathers[0]
        rows, columns = weights.shape
        if weights.mins is not None:
            table = f"{gather.name}.dequantized"
            self._set_initializer(table, exact.dequantize())
            plain = helper.make_node("Gather", [table, gather.input[1]], list(gather.output), name=gather.name)
            self.model.graph.node.remove(gather)
            self.model.graph.node.remove(reshape)
            self.model.graph.node.insert(0, plain)  # reads only the graph input and an initializer
            return
        reshape.input[1] = f"{reshape.name}.carried_shape"  # the builder's shape is a Constant node
        self._set_initializer(reshape.input[1], np.array([rows, columns * weights.bits // 8], dtype=np.int64))
        del gather.input[3:]  # the default zero points, as in the MatMul
        for attribute, value in (("bits", weights.bits), ("block_size", weights.block_size)):
            gather.attribute.remove(next(a for a in gather.attribute if a.name == attribute))
            gather.attribute.append(helper.make_attribute(attribute, value))


def node_weights(model, node) -> np.ndarray:
    """The float weight [N, K] a MatMulNBits node of `model` computes with, its min term included:
    what the carried GGUF tensors must dequantize to."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    attributes = {a.name: a.i for a in node.attribute}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name])

    zero_points = array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    weights = unpack_matmul_nbits(
        array(node.input[1]),
        array(node.input[2]),
        zero_points,
        attributes["bits"],
        attributes["block_size"],
        attributes["K"],
    )
    mins = initializers.get(f"{node.name}.mins")
    if mins is not None:
        mins_t = numpy_helper.to_array(mins)  # [K / min block, N]
        weights = weights + np.repeat(mins_t.T, attributes["K"] // mins_t.shape[0], axis=1)
    return weights
