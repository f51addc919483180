"""The builder run node by node (slmkit.onnx.node_by_node_builder) makes the graph the builder's
own whole-model `to_nbits` makes, for every quantization `log_onnx_wrapper` builds.

Both run in one process on the same tiny checkpoints: first onnxruntime-genai's builder as it
ships, then the same command lines node by node. int4 (the default, and what a GGUF is carried
into) and int8 must give the same files byte for byte. k-quant's quantizer sorts the graph, so
there the nodes may come in another order of independent nodes: the same nodes, and the same
weights in the same bytes of model.onnx.data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from slmkit.onnx.build import QUANTIZATIONS, builder_command, builder_environment
from tests.tiny_models import build_tiny_model

pytestmark = [pytest.mark.integration]

BOTH_BUILDERS = """
import json, sys
from slmkit.onnx.node_by_node_builder import run_builder, run_shipped_builder
stock, node_by_node = json.loads(sys.argv[1])
for argv in stock:
    run_shipped_builder(argv)
for argv in node_by_node:
    run_builder(argv)
from builders.base import Model
assert Model.to_nbits.node_by_node, "the node-by-node pass was not the one that ran"
"""

KEPT_FLOAT = "/model/layers.0/attn/o_proj/MatMul"
CASES = {  # name: (checkpoint, quantization, the builder's further options, execution provider)
    "phi3-int4": ("phi3", "int4", {}, "cpu"),
    "phi3-int8": ("phi3", "int8", {}, "cpu"),
    "phi3-int4-kquant": ("phi3", "int4-kquant", {}, "cpu"),
    "qwen3-tied-int4": ("qwen3", "int4", {}, "cpu"),
    "phi3-int4-one-node-kept-float": ("phi3", "int4", {"nodes_to_exclude": KEPT_FLOAT}, "cpu"),
    # CUDA's int4 also gets the builder's per-node weight prepacking; the graph builds without a GPU.
    "phi3-int4-cuda": ("phi3", "int4", {}, "cuda"),
}


@pytest.fixture(scope="module")
def both_builds(tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    scratch = tmp_path_factory.mktemp("node-by-node")
    checkpoints = {"phi3": tiny_phi3, "qwen3": build_tiny_model("Qwen3ForCausalLM", scratch / "qwen3")}
    commands = {}
    for kind in ("stock", "node-by-node"):
        for case, (checkpoint, quantization, options, provider) in CASES.items():
            recipe = QUANTIZATIONS[quantization]
            command = builder_command(checkpoints[checkpoint], scratch / kind / case, scratch / "cache", provider,
                                      {**recipe.extra_options, **options}, recipe.precision)  # fmt: skip
            commands.setdefault(kind, []).append(command[3:])
    result = subprocess.run(
        [sys.executable, "-c", BOTH_BUILDERS, json.dumps([commands["stock"], commands["node-by-node"]])],
        capture_output=True, text=True, env=builder_environment(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return scratch


def graph_nodes(folder: Path) -> list[bytes]:
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    return sorted(node.SerializeToString() for node in model.graph.node)


@pytest.mark.parametrize("case", CASES)
def test_node_by_node_builds_the_graph_the_whole_model_pass_builds(both_builds: Path, case: str):
    stock, ours = both_builds / "stock" / case, both_builds / "node-by-node" / case
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in stock.iterdir())
    assert (ours / "model.onnx.data").read_bytes() == (stock / "model.onnx.data").read_bytes()
    assert graph_nodes(ours) == graph_nodes(stock)
    ops = {node.name: node.op_type for node in onnx.load(ours / "model.onnx", load_external_data=False).graph.node}
    assert "MatMulNBits" in ops.values()
    if CASES[case][2].get("nodes_to_exclude"):
        assert ops[KEPT_FLOAT] == "MatMul"
    if QUANTIZATIONS[CASES[case][1]].extra_options.get("algo_config") is None:
        assert (ours / "model.onnx").read_bytes() == (stock / "model.onnx").read_bytes()
