"""onnxruntime-genai's builder, run with its quantization pass applied one weight at a time.

Run as `python -m slmkit.onnx.node_by_node_builder` with the builder's own command line
(`slmkit.onnx.build.builder_command`), after `--gguf FILE [--stand-ins]` for a GGUF source: the
builder then reads its weights from that file (slmkit.onnx.gguf_model), not from the checkpoint.

Why: the 0.18 builder makes the whole graph first, every weight a lazy cast of the loaded
checkpoint to float32, and then quantizes it in `Model.to_nbits`, which turns the whole graph
into one ModelProto (`ir.to_proto`) for onnxruntime's `MatMulNBitsQuantizer`. So every weight is
held twice, as the checkpoint's tensor and as a float32 copy, and the quantized ones come on top:
about 8 bytes a parameter at the peak, 22.7 GiB for Phi-3-mini's 3.8 billion. Here `to_nbits`
runs on one node at a time: a model of that node alone, its weight cast on its own, goes through
the builder's own `to_nbits` (so the same quantizer, options and per-node bits), and what comes
back replaces the node in the graph. The float32 copy of one weight is the most that exists at
once. The result is the graph `to_nbits` makes of the whole model: the same nodes and the same
weights in the same bytes (tests/test_node_by_node_builder.py builds both ways)."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable

import onnx_ir as ir


def quantizable(node: ir.Node, op_types: set[str]) -> bool:
    """Whether `to_nbits` would quantize `node`: an op type it quantizes, with a constant weight
    (a Gather's table is its first input, a MatMul's weight its second)."""
    weight = 0 if node.op_type == "Gather" else 1
    return node.op_type in op_types and len(node.inputs) > weight and node.inputs[weight] is not None \
        and node.inputs[weight].const_value is not None  # fmt: skip


def copied_value(value: ir.Value) -> ir.Value:
    """A new value like `value`, sharing its tensor (a lazy one stays uncast)."""
    return ir.Value(name=value.name, type=value.type, shape=value.shape, const_value=value.const_value)


def copied_node(node: ir.Node, inputs: list[ir.Value | None]) -> ir.Node:
    """A new node like `node` on `inputs`, its outputs named and typed as `node`'s: a node belongs
    to one graph, so moving one between the whole model and a one-node model means a copy."""
    copy = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                   num_outputs=len(node.outputs), name=node.name, version=node.version)  # fmt: skip
    for made, original in zip(copy.outputs, node.outputs, strict=True):
        made.name, made.type, made.shape = original.name, original.type, original.shape
    return copy


def model_of_one_node(node: ir.Node, opsets: dict[str, int], ir_version: int) -> ir.Model:
    """A model of `node` alone: its constant inputs as initializers (sharing the lazy tensors, so
    nothing is cast yet), its other inputs as graph inputs, its outputs as graph outputs."""
    inputs, initializers, values = [], [], []
    for value in node.inputs:
        copy = copied_value(value)
        (initializers if value.const_value is not None else inputs).append(copy)
        values.append(copy)
    alone = copied_node(node, values)
    graph = ir.Graph(inputs, list(alone.outputs), nodes=[alone], initializers=initializers, opset_imports=opsets)
    return ir.Model(graph, ir_version=ir_version)


def replace_node(graph: ir.Graph, node: ir.Node, quantized: ir.Graph) -> None:
    """Put `quantized`'s nodes in `graph` where `node` was, with their initializers appended (as
    onnxruntime's quantizer appends them), and drop `node` and the weights only it used."""
    outer = {value.name: value for value in node.inputs}
    made: dict[str, ir.Value] = {}
    for name, value in quantized.initializers.items():
        if name not in outer:
            made[name] = copied_value(value)
            graph.register_initializer(made[name])
    new_nodes = []
    for inner in quantized:
        inputs = [None if value is None else made.get(value.name, outer.get(value.name)) for value in inner.inputs]
        copy = copied_node(inner, inputs)
        made.update((out.name, out) for out in copy.outputs)
        new_nodes.append(copy)
    graph.insert_before(node, new_nodes)
    for old in node.outputs:
        ir.convenience.replace_all_uses_with(old, made[old.name], replace_graph_outputs=True)
    weights = [value for value in node.inputs if value is not None and value.is_initializer()]
    graph.remove(node, safe=True)
    for weight in weights:
        if not weight.uses() and weight.name not in made:
            graph.initializers.pop(weight.name)


def quantized_alone(to_nbits: Callable, builder, node: ir.Node, whole: ir.Model) -> ir.Graph:
    """What `to_nbits` makes of `node` in a model of its own. Its tensors are copied out of the
    quantizer's proto: a tensor read from a proto keeps the whole proto alive, float32 weight
    included."""
    builder.model = model_of_one_node(node, whole.opset_imports, whole.ir_version)
    graph = to_nbits(builder).graph
    for value in graph.initializers.values():
        tensor = value.const_value
        value.const_value = ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=tensor.name)
    # Let go of the float weight (it may be a copy the builder made) unless the node kept it.
    still_read = {value.name for inner in graph for value in inner.inputs if value is not None}
    for value in node.inputs:
        if value is not None and value.is_initializer() and len(value.uses()) == 1 and value.name not in still_read:
            value.const_value = None
    return graph


def weight_size(node: ir.Node) -> int:
    return max(value.const_value.size for value in node.inputs if value is not None and value.const_value is not None)


def node_by_node(to_nbits: Callable) -> Callable:
    """`Model.to_nbits`, applied to each quantizable node's own model in turn: the largest weights
    first, while the quantized ones held so far are few (the float32 copy of the LM head alone is
    0.4 GB at Phi-3-mini's size), and put in the graph in the graph's order, which is the order of
    their bytes in the saved file."""

    def to_nbits_node_by_node(self) -> ir.Model:
        if getattr(self, "exact_quant_override_names", None):
            return to_nbits(self)  # checks its overrides against the whole graph
        whole = self.model
        op_types = set(self.quant_attrs["op_types_to_quantize"])
        nodes = [node for node in whole.graph if quantizable(node, op_types)]
        try:
            quantized = {id(node): quantized_alone(to_nbits, self, node, whole)
                         for node in sorted(nodes, key=weight_size, reverse=True)}  # fmt: skip
        finally:
            self.model = whole
        for node in nodes:
            replace_node(whole.graph, node, quantized.pop(id(node)))
        return whole

    return to_nbits_node_by_node


def patch_builder() -> None:
    """Make the builder's `Model.to_nbits` go node by node, once per process."""
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)
    from builders.base import Model

    if not getattr(Model.to_nbits, "node_by_node", False):
        Model.to_nbits = node_by_node(Model.to_nbits)
        Model.to_nbits.node_by_node = True


def read_from_gguf(gguf: str, stand_ins: bool) -> Callable:
    """Make the builder's `Model.load_weights` read `gguf` (slmkit.onnx.gguf_model) for a
    checkpoint folder, other inputs loading as before; return the method it replaced."""
    from pathlib import Path

    from builders.base import Model

    from slmkit.onnx.gguf_model import model_from_gguf

    load_weights = Model.load_weights

    def load_weights_from_gguf(self, input_path: str):
        if Path(input_path, "config.json").is_file():
            return model_from_gguf(Path(gguf), Path(input_path), stand_ins)
        return load_weights(self, input_path)

    Model.load_weights = load_weights_from_gguf
    return load_weights


def run_shipped_builder(argv: list[str]) -> None:
    """Run the builder's own command line (`argv` without the program name) in this process."""
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


def run_builder(argv: list[str]) -> None:
    """Run the builder's own command line, node by node; with `--gguf FILE [--stand-ins]` first,
    on the file's weights."""
    from slmkit.onnx.build import GGUF_OPTION, STAND_INS_OPTION

    patch_builder()
    load_weights = None
    if argv[:1] == [GGUF_OPTION]:
        stand_ins = argv[2:3] == [STAND_INS_OPTION]
        load_weights = read_from_gguf(argv[1], stand_ins)
        argv = argv[3 if stand_ins else 2 :]
    try:
        run_shipped_builder(argv)
    finally:
        if load_weights is not None:
            from builders.base import Model

            Model.load_weights = load_weights


if __name__ == "__main__":
    run_builder(sys.argv[1:])
