"""A GGUF file's own quantized weights in the ONNX model, exactly: block layouts against gguf's
dequantization, the node mapping, and tiny Phi-3 GGUFs written here (Q4_0, Q4_1, Q8_0, and a tied
embedding) built, carried and answering like transformers on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

from slmkit.onnx.build import QUANTIZATIONS, builder_command, copy_runtime_files
from slmkit.onnx.gguf_blocks import CARRIED_TYPES, BlockWeights, block_weights, concat_rows
from slmkit.onnx.gguf_carry import (
    DEFAULT_ACTIVATIONS,
    CarryReport,
    GgufWeights,
    Part,
    carry_gguf_weights,
    node_parts,
    node_precision,
    weights_only_carried,
)
from slmkit.onnx.greedy import bare_greedy, load
from slmkit.sources.checkpoint import convert_gguf, float_model
from tests.tiny_models import build_in_one_process, build_tiny_phi3, carried_node_mismatches, write_tiny_gguf

# One worker runs the module: its module fixtures (seven tiny GGUFs converted, then built in one
# builder process, ~9 s of CPU) would otherwise be made again by each worker that runs a test of it.
pytestmark = pytest.mark.xdist_group("gguf-carry")

# Byte offsets of each type's fp16 scale and min fields in a block, given sane values in the tests
# (random bytes there can be NaN or huge); every other byte stays random.
FP16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}  # fmt: skip
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def random_blocks(qtype: Q, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values_per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, columns // values_per_block, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        halves = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)
        raw[..., offset : offset + 2] = halves.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(CARRIED_TYPES), ids=lambda q: q.name)
def test_every_carried_type_dequantizes_bit_for_bit_like_gguf(qtype: Q):
    data = random_blocks(qtype, rows=6, columns=512)
    weights = block_weights(data, qtype, 6, 512)
    assert np.array_equal(weights.dequantize(), gguf.quants.dequantize(data, qtype))
    assert weights.bits == (4 if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else 8)


def test_a_type_without_an_exact_form_is_refused_by_name():
    with pytest.raises(KeyError, match="Q2_K has no exact MatMulNBits form"):
        block_weights(np.zeros((1, GGML_QUANT_SIZES[Q.Q2_K][1]), np.uint8), Q.Q2_K, 1, 256)


def test_rows_of_mixed_types_stack_in_the_smallest_block_and_widest_codes():
    """A packed q/k/v node whose v is Q6_K (blocks of 16) and q, k Q4_K (32), as in Q4_K_M files."""
    parts = [
        block_weights(random_blocks(q, 4, 256, seed), q, 4, 256) for seed, q in enumerate((Q.Q4_K, Q.Q4_K, Q.Q6_K))
    ]
    stacked = concat_rows(parts)
    assert (stacked.block_size, stacked.bits, stacked.shape) == (16, 8, (12, 256))
    assert np.array_equal(stacked.dequantize(), np.concatenate([part.dequantize() for part in parts]))


def test_builder_nodes_map_to_checkpoint_weights():
    llama = {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"} | {"model.embed_tokens.weight"}
    llama |= {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert node_parts("/model/layers.0/attn/qkv_proj/MatMul_Q4", llama) == [
        Part("model.layers.0.self_attn.q_proj.weight"),
        Part("model.layers.0.self_attn.k_proj.weight"),
        Part("model.layers.0.self_attn.v_proj.weight"),
    ]
    assert node_parts("/lm_head/MatMul_Q4", llama) == [Part("model.embed_tokens.weight")]  # tied
    phi3 = {"model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight", "lm_head.weight"}
    assert node_parts("/model/layers.1/attn/qkv_proj/MatMul_Q4", phi3) == [
        Part("model.layers.1.self_attn.qkv_proj.weight")
    ]
    assert node_parts("/model/layers.1/mlp/up_proj/MatMul_Q4", phi3) == [
        Part("model.layers.1.mlp.gate_up_proj.weight", 1)
    ]
    assert Part("w", 1).select(10) == slice(5, 10)
    assert node_parts("/lm_head/MatMul_Q4", phi3) == [Part("lm_head.weight")]
    assert node_parts("/model/layers.0/attn/rotary/MatMul", llama) is None


def test_activation_precision_reblocks_4_bit_weights_and_leaves_8_bit_ones():
    q4 = block_weights(random_blocks(Q.Q4_1, 3, 64), Q.Q4_1, 3, 64)
    level, reblocked = node_precision(q4, "int8-16")
    assert (level, reblocked.block_size) == (4, 16)
    assert np.allclose(reblocked.dequantize(), q4.dequantize(), rtol=0, atol=1e-6)
    assert [(level, w.block_size) for level, w in (node_precision(q4, "int8-32"), node_precision(q4, "float32"))] == [
        (4, 32),
        (1, 32),
    ]
    q8 = block_weights(random_blocks(Q.Q8_0, 3, 64), Q.Q8_0, 3, 64)
    assert node_precision(q8, "float32")[0] == 4  # no fast 8-bit kernel at level 1


def test_int8_16_qkv_reblocks_only_the_attention_input_projections_and_the_default_every_4_bit_node():
    q4 = block_weights(random_blocks(Q.Q4_0, 3, 64), Q.Q4_0, 3, 64)
    nodes = ("/model/layers.3/attn/qkv_proj/MatMul_Q4", "/model/layers.0/attn/v_proj/MatMul",
             "/model/layers.3/attn/o_proj/MatMul_Q4", "/model/layers.3/mlp/down_proj/MatMul_Q4", "/lm_head/MatMul")  # fmt: skip
    blocks = {
        name: [node_precision(q4, name, node)[1].block_size for node in nodes] for name in ("int8-16-qkv", "int8-16")
    }
    assert blocks == {"int8-16-qkv": [16, 16, 32, 32, 32], "int8-16": [16, 16, 16, 16, 16]}


def test_the_default_reblocks_q_k_v_only_for_types_with_minimums():
    """A symmetric type at int8 per 32 is llama.cpp's own arithmetic; a recentred type with
    minimums is not quite, and takes blocks of 16 where the inputs have outlier channels."""
    node = "/model/layers.0/attn/qkv_proj/MatMul_Q4"
    q40 = block_weights(random_blocks(Q.Q4_0, 3, 64), Q.Q4_0, 3, 64)
    q41 = block_weights(random_blocks(Q.Q4_1, 3, 64), Q.Q4_1, 3, 64)
    assert DEFAULT_ACTIVATIONS == "int8-16-qkv-mins"
    assert node_precision(q40, DEFAULT_ACTIVATIONS, node)[1].block_size == 32
    assert node_precision(q41, DEFAULT_ACTIVATIONS, node)[1].block_size == 16
    assert node_precision(q41, DEFAULT_ACTIVATIONS, "/model/layers.0/mlp/down_proj/MatMul_Q4")[1].block_size == 32


@pytest.mark.parametrize("qtype", sorted(CARRIED_TYPES), ids=lambda q: q.name)
def test_recentred_weights_keep_their_values_with_the_default_zero_point(qtype: Q):
    """Stored recentred, every type needs no zero-point input; a symmetric type's values stay
    exact, and a type with minimums stores codes centred on the zero point (what keeps int8
    activations' rounding from meeting the codes' common offset) within float rounding."""
    weights = block_weights(random_blocks(qtype, 3, 256), qtype, 3, 256)
    stored = weights.recentered()
    assert np.all(stored.zero_points == 1 << (weights.bits - 1))
    if weights.mins is None:
        assert np.array_equal(stored.dequantize(), weights.dequantize())
    else:
        assert np.allclose(stored.dequantize(), weights.dequantize(), rtol=0, atol=1e-5)
        offsets = stored.codes.astype(np.int16) - (1 << (weights.bits - 1))
        half = 1 << (weights.code_bits - 1)
        assert (offsets.min(), offsets.max()) == (-half, half - 1)


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """GGUF files of a 4k-context tiny Phi-3 (as Phi-3-mini-4k: the builder needs
    original_max_position_embeddings == max_position_embeddings, which transformers sets to 4096
    for GGUF files) and the float checkpoints that `download` makes of them."""
    root = tmp_path_factory.mktemp("gguf")
    untied = build_tiny_phi3(root / "phi3", context_length=4096)
    tied = build_tiny_phi3(root / "phi3-tied", context_length=4096, tied=True)
    files = {}
    for name, source, quantization in (
        ("Q4_0", untied, "Q4_0"),
        ("Q4_1", untied, "Q4_1"),
        ("Q8_0", untied, "Q8_0"),
        ("Q4_1-tied", tied, "Q4_1"),
        ("F16", untied, "F16"),
        ("Q5_0", untied, "Q5_0"),
        ("Q5_1", untied, "Q5_1"),
    ):
        path = write_tiny_gguf(source, root / f"{name}.gguf", quantization)
        checkpoint = root / f"{name}-checkpoint"
        checkpoint.mkdir()
        convert_gguf(path, checkpoint)
        float_model(checkpoint, path).save_pretrained(checkpoint)  # the float reference of the tests
        files[name] = path, checkpoint
    return files


@pytest.fixture(scope="module")
def built(tiny_ggufs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, CarryReport]]:
    """Each tiny GGUF built as `build_onnx` builds it (the builder reading the GGUF file), then
    carried (float32 activations); and, under "<name>/from-checkpoint", Q4_0's and the tied Q4_1's
    built from a float checkpoint of the file (as `download` wrote one until it stopped writing
    float weights) and carried alike.

    All builds run in one builder process, with the command lines `build_onnx` gives the
    builder: its imports (torch, transformers, onnx) take ten times the CPU of a tiny build."""
    recipe, scratch = QUANTIZATIONS["gguf"], tmp_path_factory.mktemp("carried")
    builds = {name: (path, checkpoint, path) for name, (path, checkpoint) in tiny_ggufs.items()}
    builds |= {
        f"{name}/from-checkpoint": (tiny_ggufs[name][0], tiny_ggufs[name][1], None) for name in ("Q4_0", "Q4_1-tied")
    }
    commands = [
        builder_command(checkpoint, scratch / name / "built", scratch / "builder-cache", "cpu",
                        recipe.extra_options, recipe.precision, gguf=read_from, stand_ins=bool(read_from))
        for name, (_, checkpoint, read_from) in builds.items()
    ]  # fmt: skip
    build_in_one_process(commands)
    carried = {}
    for name, (path, checkpoint, _) in builds.items():
        copy_runtime_files(scratch / name / "built", scratch / name / "onnx")
        carried[name] = (
            scratch / name / "onnx",
            carry_gguf_weights(scratch / name / "onnx", path, checkpoint, "float32"),
        )
    return carried


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1-tied"])
def test_the_builder_reading_the_gguf_makes_the_model_it_makes_of_the_float_checkpoint(name: str, built):
    """The carry-over's builder reads no float checkpoint (the carried nodes' weights are zero
    stand-ins, the rest gguf's values as transformers loads them): same graph, same bytes."""
    from_gguf, from_checkpoint = built[name][0], built[f"{name}/from-checkpoint"][0]
    for file in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (from_gguf / file).read_bytes() == (from_checkpoint / file).read_bytes(), file


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q4_1-tied", "F16", "Q5_1"])
def test_every_tensor_gguf_weights_reads_is_the_one_transformers_loads(name: str, tiny_ggufs):
    from safetensors.numpy import load_file

    path, checkpoint = tiny_ggufs[name]
    weights = GgufWeights(path, json.loads((checkpoint / "config.json").read_text()))
    loaded = load_file(checkpoint / "model.safetensors")
    assert all(name in weights for name in loaded)
    assert ("lm_head.weight" in weights) == ("lm_head.weight" in loaded)
    for tensor_name, values in loaded.items():
        assert np.array_equal(weights.float_tensor(tensor_name), values), tensor_name


def test_the_weights_only_carried_nodes_read_are_the_matmuls_never_the_embedding(tiny_ggufs):
    path, checkpoint = tiny_ggufs["Q4_1"]
    config = json.loads((checkpoint / "config.json").read_text())
    layers = config["num_hidden_layers"]
    modules = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    expected = {f"model.layers.{i}.{module}.weight" for i in range(layers) for module in modules}
    assert weights_only_carried(GgufWeights(path, config), layers) == expected | {"lm_head.weight"}
    tied = tiny_ggufs["Q4_1-tied"][0]
    assert weights_only_carried(GgufWeights(tied, config), layers) == expected  # the embedding is the LM head
    assert weights_only_carried(GgufWeights(tiny_ggufs["F16"][0], config), layers) == set()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_1-tied"])
def test_every_matmul_of_a_tiny_phi3_gguf_carries_the_files_own_weights(name: str, tiny_ggufs, built):
    folder, report = built[name]
    path, checkpoint = tiny_ggufs[name]
    model = onnx.load(str(folder / "model.onnx"))
    matmuls = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert report.requantized == {}
    assert sorted(report.carried) == sorted(node.name for node in matmuls)
    assert report.counts() == f"carried={len(matmuls)},requantized=0"
    names = {line.split("\t")[1] for line in report.lines()}
    assert names == set(report.carried)
    assert carried_node_mismatches(folder, path, checkpoint) == []
    assert [n.name for n in matmuls if "/mlp/gate" in n.name or "/mlp/up" in n.name] == [
        f"/model/layers.{i}/mlp/gate_up_proj/MatMul_Q4" for i in range(2)
    ]  # one node for both: Phi-3's file stores them as one tensor
    expected_bits = 4 if name.startswith("Q4") else 8
    assert {a.i for n in matmuls for a in n.attribute if a.name == "bits"} == {expected_bits}


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_1-tied"])
def test_carried_weights_with_float_activations_answer_like_transformers_token_for_token(name: str, tiny_ggufs, built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = built[name]
    checkpoint = tiny_ggufs[name][1]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = reference.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    model, onnx_tokenizer = load(folder)
    tokens, _ = bare_greedy(model, onnx_tokenizer, MESSAGES, 24)
    assert tokens == expected[0, inputs["input_ids"].shape[1] :].tolist()


def test_a_gguf_whose_weights_are_float_keeps_the_builders_quantization_and_says_why(built):
    """An F16 file has no quantized blocks to carry: each node is re-quantized, the reason logged."""
    folder, report = built["F16"]
    assert report.carried == {}
    assert len(report.requantized) == 11
    assert all(why == "GGUF type F16 has no exact MatMulNBits form" for why in report.requantized.values())
    assert all(line.startswith("requantized\t") for line in report.lines())
    model, tokenizer = load(folder)
    assert len(bare_greedy(model, tokenizer, MESSAGES, 4)[0]) == 4  # the builder's int4 weights still run


def test_block_weights_of_a_node_are_checked_against_the_reference_values(tiny_ggufs):
    """The mapping is verified, not trusted: another file's values are refused."""
    from slmkit.onnx.gguf_carry import carry_node_weights

    path, checkpoint = tiny_ggufs["Q4_1"]
    config = json.loads((checkpoint / "config.json").read_text())
    weights, other = GgufWeights(path, config), GgufWeights(tiny_ggufs["Q4_0"][0], config)
    with pytest.raises(ValueError, match="do not dequantize"):
        carry_node_weights([Part("model.layers.0.self_attn.o_proj.weight")], weights, other.float_tensor)
    assert isinstance(weights.block_weights("model.layers.0.self_attn.o_proj.weight"), BlockWeights)


@pytest.mark.parametrize("name", ["Q5_0", "Q5_1", "Q8_0"])
def test_8_bit_carried_weights_compute_what_transformers_computes(name: str, tiny_ggufs, built):
    """5- and 8-bit codes run in 8-bit MatMulNBits with their zero points (Q5_0: 16) and min term
    (Q5_1), always with int8 activations: the prompt's next-token logits stay within 2% of
    transformers' on the same weights (a wrong zero point or layout moves them by far more)."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = built[name]
    checkpoint = tiny_ggufs[name][1]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        expected = reference(**ids).logits[0, -1].numpy()
    model, _ = load(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids["input_ids"].shape[1] + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(ids["input_ids"][0].numpy().astype(np.int32))
    logits = generator.get_logits()[0].reshape(-1)
    assert np.abs(logits - expected).max() <= 0.02 * np.abs(expected).max()


def test_carried_weights_with_float_activations_keep_the_float_models_distributions(tiny_ggufs, built):
    """Fidelity as llama-perplexity measures it, on the shipped text and one answer: the file's own
    weights with float32 activations are the float model but for summation order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmkit.evaluation.fidelity import measure_fidelity

    folder, _ = built["Q4_1"]
    checkpoint = tiny_ggufs["Q4_1"][1]
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    scored = measure_fidelity(reference, AutoTokenizer.from_pretrained(checkpoint), folder, [(MESSAGES, "Paris.")])
    assert scored.positions >= 2000
    assert scored.top1_agreement >= 0.99
    assert scored.kl_divergence < 1e-3


def test_a_tied_embedding_with_minimums_reads_the_files_own_values_exactly(tiny_ggufs, built):
    """The output layer stores its Q4_1 weights recentred; the embedding that shares them is a
    float table, and that table holds gguf's dequantization bit for bit, not the recentred sum."""
    from onnx import numpy_helper

    folder, _ = built["Q4_1-tied"]
    path, _ = tiny_ggufs["Q4_1-tied"]
    model = onnx.load(str(folder / "model.onnx"))
    tables = [init for init in model.graph.initializer if init.name.endswith(".dequantized")]
    assert len(tables) == 1
    embedding = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(embedding.data, embedding.tensor_type)
    assert np.array_equal(numpy_helper.to_array(tables[0]), expected)


def gate_up_graph(layers: int, hidden: int, intermediate: int) -> onnx.ModelProto:
    """The builder's MLP input projections of `layers` layers as it names them: a gate and an up
    MatMulNBits (4 bits, blocks of 32, random weights) reading each layer's input, both outputs
    graph outputs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, initializers, inputs, outputs = [], [], [], []
    for layer in range(layers):
        x = f"/model/layers.{layer}/post_attention_layernorm/output_0"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2, hidden]))
        for module in ("gate_proj", "up_proj"):
            weight = f"model.layers.{layer}.mlp.{module}.MatMul.weight"
            packed = rng.integers(0, 256, (intermediate, hidden // 32, 16), dtype=np.uint8)
            scales = rng.uniform(0.01, 0.1, (intermediate, hidden // 32)).astype(np.float32)
            initializers += [
                numpy_helper.from_array(packed, f"{weight}_Q4"),
                numpy_helper.from_array(scales, f"{weight}_scales"),
            ]
            output = f"/model/layers.{layer}/mlp/{module}/MatMul/output_0"
            nodes.append(helper.make_node(
                "MatMulNBits", [x, f"{weight}_Q4", f"{weight}_scales"], [output], name=f"/model/layers.{layer}/mlp/{module}/MatMul_Q4",
                domain="com.microsoft", K=hidden, N=intermediate, bits=4, block_size=32, accuracy_level=4,
            ))  # fmt: skip
            outputs.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "mlp", inputs, outputs, initializers)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


def test_gate_and_up_become_one_node_computing_the_same_outputs_where_their_gguf_types_match(tmp_path: Path):
    """A Llama's gate and up weights are two GGUF tensors: one node holds both where they share a
    type (one node's bits), and the stacked node with its Split gives both outputs bit for bit."""
    import onnxruntime as ort

    from slmkit.onnx.gguf_carry import ModelGraph, gate_up_pairs
    from tests.tiny_models import build_tiny_model

    checkpoint = build_tiny_model("LlamaForCausalLM", tmp_path / "llama")
    config = json.loads((checkpoint / "config.json").read_text())
    same = GgufWeights(write_tiny_gguf(checkpoint, tmp_path / "same.gguf", "Q4_1"), config)
    mixed = GgufWeights(write_tiny_gguf(checkpoint, tmp_path / "mixed.gguf", "Q4_1", {"ffn_up": "Q8_0"}), config)
    model = gate_up_graph(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"])
    assert gate_up_pairs(model, mixed) == []
    pairs = gate_up_pairs(model, same)
    assert [(gate.name, up.name) for gate, up in pairs] == [
        (f"/model/layers.{i}/mlp/gate_proj/MatMul_Q4", f"/model/layers.{i}/mlp/up_proj/MatMul_Q4") for i in range(2)
    ]

    feeds = {i.name: np.random.default_rng(1).standard_normal([1, 2, 64]).astype(np.float32) for i in model.graph.input}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    graph = ModelGraph(model)
    for gate, up in pairs:
        graph.fuse_rows(gate, up, gate.name.replace("/gate_proj/", "/gate_up_proj/"))
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "Split"] * 2
    assert len(model.graph.initializer) == 2 * 3  # stacked weights and scales, split sizes; the four old pairs gone
    after = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert node_parts("/model/layers.1/mlp/gate_up_proj/MatMul_Q4", same) == [
        Part("model.layers.1.mlp.gate_proj.weight"),
        Part("model.layers.1.mlp.up_proj.weight"),
    ]


def test_minimums_keep_the_files_block_when_the_codes_are_reblocked():
    """Re-blocked to 16 for the activations, a Q4_1 weight keeps one minimum per 32 values (half
    the minimums the graph reads each step), recentred or not, with the same values."""
    q41 = block_weights(random_blocks(Q.Q4_1, 3, 64), Q.Q4_1, 3, 64)
    _level, stored = node_precision(q41, "int8-16", "/model/layers.0/mlp/down_proj/MatMul_Q4")
    assert (stored.block_size, stored.min_block_size, stored.mins.shape) == (16, 32, (3, 2))
    assert np.allclose(stored.dequantize(), q41.dequantize(), rtol=0, atol=1e-5)
    split = q41.with_block_size(16)
    assert split.min_block_size == 32
    assert np.array_equal(split.dequantize(), q41.dequantize())
    stacked = concat_rows([split, block_weights(random_blocks(Q.Q4_0, 2, 64), Q.Q4_0, 2, 64)])
    assert (stacked.block_size, stacked.min_block_size) == (16, 32)
