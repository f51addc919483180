"""The Q4_0 matrix products of a Phi-3-mini decode step, on onnxruntime's kernel and on llama.cpp's.

Why: at Phi-3-mini's size the Q4_0 carry-over decodes slower than llama-server on the same file,
and the rest of a step (attention, norms, the sampling) is small beside its matrix products. So
this measures those products alone, the same shapes on both sides, in one sitting:

- onnxruntime's `MatMulNBits` as the carry-over writes a Q4_0 weight (the file's 4-bit codes,
  blocks of 32, no zero points: the default 8; int8 activations, `accuracy_level` 4; float32
  scales, the one kind the node takes beside float32 activations), on MLAS, which on AVX-512
  also reads a float32 block sum per block for the zero point;
- ggml's CPU backend with the weights in its repack buffer, as llama-server holds them
  (`bench/q4_0_matmul.c`, compiled against the llama.cpp tree of LLAMA_SERVER).

Each side holds several layers' weights, so that a pass reads them from memory as a decode step
does; the figure is per token of all 32 layers, at 1 row (one client) and 4 (four in a batch).
The two alternate, `reps` times each.

`python -m bench --kernels` measures this alone (needs LLAMA_SERVER; about a minute); the
Phi-3-mini scale (bench/scale.py) measures it after its served figures.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.figures import Figure
from bench.flagship import PHI3_MINI_CONFIG

SOURCE = Path(__file__).with_name("q4_0_matmul.c")
Q4_0_BLOCK = 32
# Bytes a block of 32 weights takes in what each kernel reads: 16 of codes and a scale, float32 in
# MatMulNBits, float16 in ggml; and MLAS's int8 path on AVX-512 packs, beside them, a float32 block
# sum per block (`QuantBBlkSum`, -scale * zero point) that it multiplies by the activations' block
# sums on every call (onnxruntime's MLAS sources).
MLAS_BLOCK_BYTES, GGML_BLOCK_BYTES = 16 + 4 + 4, 16 + 2
# Layers whose weights a pass holds: 8 of Phi-3-mini's (0.5 GB in Q4_0) are far beyond the caches.
HELD_LAYERS = 8
PASSES = 10  # timed passes over the held layers, per measurement


def phi3_mini_products() -> list[tuple[int, int]]:
    """(K, N) of each matrix product of one Phi-3-mini layer as the builder and the carry-over
    make them: q/k/v in one node, o, gate and up in one node, down."""
    hidden, intermediate = PHI3_MINI_CONFIG["hidden_size"], PHI3_MINI_CONFIG["intermediate_size"]
    head = hidden // PHI3_MINI_CONFIG["num_attention_heads"]
    qkv = hidden + 2 * PHI3_MINI_CONFIG["num_key_value_heads"] * head
    return [(hidden, qkv), (hidden, hidden), (hidden, 2 * intermediate), (intermediate, hidden)]


def compile_ggml_bench(llama_server: Path, dest: Path) -> Path:
    """`bench/q4_0_matmul.c` built against the ggml of the llama.cpp build holding `llama_server`."""
    tree = next(p for p in llama_server.parents if (p / "ggml" / "include" / "ggml.h").is_file())
    libraries = llama_server.parent
    command = ["cc", "-O2", "-o", str(dest), str(SOURCE), f"-I{tree / 'ggml' / 'include'}", f"-L{libraries}"]
    command += ["-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{libraries}"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return dest


def ggml_pass_s(binary: Path, products: list[tuple[int, int]], rows: int, threads: int) -> tuple[float, str]:
    """Median seconds of one pass over HELD_LAYERS layers, and the buffer type the weights were in."""
    shapes = [f"{k},{n}" for k, n in products]
    args = [str(binary), str(HELD_LAYERS), str(rows), str(threads), str(PASSES), *shapes]
    buffer_type, seconds = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()
    return float(seconds), buffer_type


def mlas_session(products: list[tuple[int, int]], threads: int):
    """An onnxruntime session of HELD_LAYERS layers of MatMulNBits nodes with random Q4_0 codes
    and scales, each node's output a graph output; its inputs are named `x<K>`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slmkit.onnx.gguf_carry import ACTIVATIONS, DEFAULT_ACTIVATIONS

    rng = np.random.default_rng(1)
    nodes, initializers, outputs = [], [], []
    for layer in range(HELD_LAYERS):
        for index, (k, n) in enumerate(products):
            name = f"layer{layer}_{index}"
            codes = rng.integers(0, 256, size=(n, k // Q4_0_BLOCK, Q4_0_BLOCK // 2), dtype=np.uint8)
            scales = (0.001 + rng.integers(0, 100, size=n * k // Q4_0_BLOCK) * 1e-5).astype(np.float32)
            initializers += [numpy_helper.from_array(codes, f"{name}_B"), numpy_helper.from_array(scales, f"{name}_S")]
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [f"x{k}", f"{name}_B", f"{name}_S"],
                    [f"{name}_Y"],
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=4,
                    block_size=Q4_0_BLOCK,
                    accuracy_level=ACTIVATIONS[DEFAULT_ACTIVATIONS].level,
                )
            )
            outputs.append(helper.make_tensor_value_info(f"{name}_Y", TensorProto.FLOAT, ["rows", n]))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["rows", k]) for k in {k for k, _ in products}]
    graph = helper.make_graph(nodes, "q4_0_products", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def mlas_pass_s(session, products: list[tuple[int, int]], rows: int) -> float:
    """Median seconds of one pass over HELD_LAYERS layers on `rows` rows, after a warm-up pass."""
    rng = np.random.default_rng(2)
    feed = {f"x{k}": rng.uniform(-1, 1, (rows, k)).astype(np.float32) for k in {k for k, _ in products}}
    session.run(None, feed)
    times = []
    for _ in range(PASSES):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def q4_0_kernel_figures(llama_server: Path, reps: int, row_counts: tuple[int, ...] = (1, 4)) -> list[Figure]:
    """Milliseconds of a token's 32 layers of Q4_0 products, MLAS over ggml's repacked kernels,
    at each row count: the two alternate `reps` times, medians compared."""
    products = phi3_mini_products()
    blocks = PHI3_MINI_CONFIG["num_hidden_layers"] * sum(k * n for k, n in products) // Q4_0_BLOCK
    threads = len(os.sched_getaffinity(0))
    per_token = PHI3_MINI_CONFIG["num_hidden_layers"] / HELD_LAYERS * 1000  # ms a token per pass-second
    session = mlas_session(products, threads)
    figures = []
    with tempfile.TemporaryDirectory(prefix="slmkit-kernels-") as scratch:
        binary = compile_ggml_bench(llama_server, Path(scratch) / "q4_0_matmul")
        for rows in row_counts:
            mlas, ggml, buffer_type = [], [], ""
            for _ in range(reps):
                mlas.append(mlas_pass_s(session, products, rows) * per_token)
                seconds, buffer_type = ggml_pass_s(binary, products, rows, threads)
                ggml.append(seconds * per_token)
            mlas_ms, ggml_ms = statistics.median(mlas), statistics.median(ggml)
            detail = {
                "mlas_ms_a_token": mlas_ms,
                "ggml_ms_a_token": ggml_ms,
                "mlas_ms_each_rep": mlas,
                "ggml_ms_each_rep": ggml,
                # What each side reads a token, and so at what rate: both near the memory's.
                "mlas_gb_a_token": blocks * MLAS_BLOCK_BYTES / 1e9,
                "ggml_gb_a_token": blocks * GGML_BLOCK_BYTES / 1e9,
                "mlas_gb_per_s": blocks * MLAS_BLOCK_BYTES / 1e6 / mlas_ms,
                "ggml_gb_per_s": blocks * GGML_BLOCK_BYTES / 1e6 / ggml_ms,
                "ggml_weight_buffer": buffer_type,
                "products_k_n": products,
                "threads": threads,
            }
            name = f"Q4_0 products of a Phi-3-mini token, {rows} row{'s' * (rows > 1)}: MLAS / ggml repacked ms"
            figures.append(Figure(name, mlas_ms / ggml_ms, detail))
    return figures
