"""The architecture matrix: every architecture `download` accepts builds and answers as
transformers does, carries a GGUF's own weights, and any other is refused in one line.

For each of slmkit.sources.architectures' architectures a tiny random checkpoint (2 layers, its
own features on) is built into ONNX as `log_onnx_wrapper` builds fp32 (`build_onnx`'s command
and `builder_input`, all in one builder process), and greedy decoding through onnxruntime-genai
must give transformers' float32 tokens. The same checkpoint is written as a Q4_0 GGUF in its
architecture's tensor names and run through `download`, `log_pipeline` and `log_onnx_wrapper`
(each step's own `main`, in this process): every node of the ONNX model must carry gguf's
dequantization of the file, and both logged models must answer the chat contract.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slmkit.chat.adapters import load_chat_model
from slmkit.errors import UserError
from slmkit.onnx.build import QUANTIZATIONS, builder_command, builder_config, builder_input, copy_runtime_files
from slmkit.onnx.greedy import bare_greedy, chat_prompt_ids, load
from slmkit.sources.architectures import SUPPORTED_ARCHITECTURES
from slmkit.sources.chat_templates import TEMPLATE_FILE, has_chat_template, settle_chat_template
from slmkit.sources.checkpoint import fetch_checkpoint
from slmkit.sources.presets import LocalDirSource
from slmkit.workflow.steps import MODEL_URI_TAG
from tests.conftest import TrackingServer, hub_offline, run_step_in_process
from tests.tiny_models import (
    TINY_ARCHITECTURES,
    build_in_one_process,
    build_tiny_model,
    build_tiny_phi3,
    logged_carry_mismatches,
    write_tiny_gguf,
)

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("architectures")]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 12
# Phi-3 is the tiny Phi-3 of every other test (tests/test_gguf_carry.py answers as transformers).
MATRIX = [architecture for architecture in SUPPORTED_ARCHITECTURES if architecture != "Phi3ForCausalLM"]


def test_the_matrix_covers_every_supported_architecture_but_phi3():
    assert set(TINY_ARCHITECTURES) == set(MATRIX)


# A turn format given by file, as `-P chat_template=<file>` gives it (Gemma's).
GIVEN_TEMPLATE = (
    "{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
    " + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GIVEN = "base-with-given-template"
# A Gemma 3 whose window (48) is longer than a short request (a prompt of ~15 tokens and 4 new
# ones), as Gemma 3 270M's 512 is: onnxruntime refuses a KV cache shorter than the window.
WIDE_WINDOW = "gemma3-window-48"
# A Phi-3 whose config has a window shorter than its context, as Phi-3-mini's 2047 of 4096 is.
PHI3_WINDOW = "phi3-window-256"


def without_chat_template(checkpoint: Path) -> Path:
    """The checkpoint as a base model comes: no chat template anywhere in its tokenizer files."""
    (checkpoint / TEMPLATE_FILE).unlink(missing_ok=True)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    assert not has_chat_template(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture's tiny checkpoint, and a base Llama given a template as `download` gives it."""
    root = tmp_path_factory.mktemp("architectures")
    built = {architecture: build_tiny_model(architecture, root / architecture) for architecture in MATRIX}
    base = without_chat_template(build_tiny_model("LlamaForCausalLM", root / GIVEN, seed=1))
    (root / "gemma.jinja").write_text(GIVEN_TEMPLATE)
    assert settle_chat_template(base, str(root / "gemma.jinja"), "", {}) == str(root / "gemma.jinja")
    wide = build_tiny_model("Gemma3ForCausalLM", root / WIDE_WINDOW, sliding_window=48)
    phi3 = build_tiny_phi3(root / PHI3_WINDOW, sliding_window=256)
    return {**built, GIVEN: base, WIDE_WINDOW: wide, PHI3_WINDOW: phi3}


@pytest.fixture(scope="module")
def ggufs(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture's checkpoint as a Q4_0 GGUF file in its architecture's tensor names."""
    root = tmp_path_factory.mktemp("architecture-ggufs")
    return {name: write_tiny_gguf(checkpoints[name], root / f"{name}.gguf", "Q4_0") for name in MATRIX}


@pytest.fixture(scope="module")
def fp32_builds(checkpoints, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every checkpoint built fp32 with float32 activations, as `log_onnx_wrapper` builds it."""
    scratch = tmp_path_factory.mktemp("builds")
    recipe, commands = QUANTIZATIONS["fp32"], []
    for name, checkpoint in checkpoints.items():
        folder = scratch / name
        commands.append(builder_command(builder_input(checkpoint, folder), folder / "built", scratch / "cache", "cpu",
                                        recipe.extra_options, recipe.precision))  # fmt: skip
    build_in_one_process(commands)
    for name in checkpoints:
        copy_runtime_files(scratch / name / "built", scratch / name / "onnx")
    return {name: scratch / name / "onnx" for name in checkpoints}


def test_a_build_is_stamped_with_the_builders_own_version_not_the_projects_commit(fp32_builds):
    """The builder stamps `git rev-parse HEAD` of the folder five above its file, which in a
    project's .venv is the project's checkout: the same checkpoint then built new bytes at each of
    our commits. builder_environment hides the repository, so the stamp is the wheel's."""
    import onnx
    import onnxruntime_genai

    expected = f"{onnxruntime_genai.__version__}+{onnxruntime_genai.__commit__[:7]}"
    stamps = {
        onnx.load(str(folder / "model.onnx"), load_external_data=False).producer_version
        for folder in fp32_builds.values()
    }
    assert stamps == {expected}


CHAT = {"messages": MESSAGES, "max_tokens": 4, "stop": ["."]}


@pytest.mark.parametrize("architecture", MATRIX)
def test_the_steps_log_both_models_of_a_gguf_in_the_architectures_names(
    architecture: str, ggufs, tracking_server: TrackingServer
):
    """`download`, `log_pipeline` and `log_onnx_wrapper`, as their command lines run them, on the
    architecture's GGUF: every node of the ONNX model carries the file's own weights, exactly as
    gguf dequantizes them, and both logged models answer the chat contract."""
    experiment, source = f"architecture-{architecture}", f"model={ggufs[architecture]}"
    with hub_offline():
        download = run_step_in_process(experiment, "download", source)
        handed_on = f"download_run_id={download.info.run_id}"
        pipeline = run_step_in_process(experiment, "log_pipeline", source, handed_on, "max_new_tokens=8")
        wrapper = run_step_in_process(experiment, "log_onnx_wrapper", source, handed_on, "tracing=false")
        answers = {
            kind: load_chat_model(run.data.tags[MODEL_URI_TAG]).complete(CHAT)
            for kind, run in {"pipeline": pipeline, "onnx": wrapper}.items()
        }
    assert wrapper.data.params["onnx_quantization"] == "gguf"
    assert re.fullmatch(r"carried=\d+,requantized=0", wrapper.data.params["gguf_tensors"])
    logged = tracking_server.stored_model(wrapper), tracking_server.stored(download.info.artifact_uri)
    assert logged_carry_mismatches(*logged, ggufs[architecture].name) == []
    for answer in answers.values():
        assert answer["object"] == "chat.completion"
        assert answer["model"] == architecture  # the GGUF file's name, as `download` names the model
        assert answer["usage"]["completion_tokens"] <= 4
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("architecture", MATRIX)
def test_the_fp32_build_answers_like_transformers_token_for_token(architecture: str, checkpoints, fp32_builds):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = checkpoints[architecture]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    model, onnx_tokenizer = load(fp32_builds[architecture])
    tokens, prompt_length = bare_greedy(model, onnx_tokenizer, MESSAGES, NEW_TOKENS)
    assert prompt_length == inputs["input_ids"].shape[1]  # the same template, rendered alike
    assert tokens == expected[0, prompt_length:].tolist()


def test_builder_config_flattens_gemma3s_rope_and_windows_mistrals_layers():
    gemma = {"model_type": "gemma3_text", "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}  # fmt: skip
    flat = builder_config(gemma)["rope_parameters"]
    assert (flat["rope_type"], flat["rope_theta"], flat["rope_local_base_freq"]) == ("default", 1e6, 1e4)
    assert flat["full_attention"] == gemma["rope_parameters"]["full_attention"]  # transformers still reads these
    mistral = {"model_type": "mistral", "sliding_window": 4, "num_hidden_layers": 3}
    assert builder_config(mistral)["layer_types"] == ["sliding_attention"] * 3
    llama = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert builder_config(llama) == llama


def test_a_checkpoint_the_builder_needs_no_change_for_is_built_from_its_own_folder(checkpoints, tmp_path: Path):
    assert builder_input(checkpoints["LlamaForCausalLM"], tmp_path) == checkpoints["LlamaForCausalLM"]
    linked = builder_input(checkpoints["Gemma3ForCausalLM"], tmp_path)
    assert linked != checkpoints["Gemma3ForCausalLM"]
    assert "rope_local_base_freq" in json.loads((linked / "config.json").read_text())["rope_parameters"]
    assert "rope_local_base_freq" not in json.loads((checkpoints["Gemma3ForCausalLM"] / "config.json").read_text())["rope_parameters"]  # fmt: skip


def test_download_refuses_an_architecture_it_cannot_build_in_one_line_naming_the_supported(checkpoints, tmp_path: Path):
    source = tmp_path / "gpt2"
    source.mkdir()
    for path in checkpoints["LlamaForCausalLM"].iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "dest").mkdir()
    with pytest.raises(UserError) as refused:
        fetch_checkpoint(LocalDirSource(str(source)), tmp_path / "dest")
    message = str(refused.value)
    assert "\n" not in message
    assert "GPT2LMHeadModel" in message
    assert all(architecture in message for architecture in SUPPORTED_ARCHITECTURES)


def test_a_checkpoint_without_a_chat_template_is_refused_naming_the_parameter(tmp_path: Path):
    base = without_chat_template(build_tiny_model("Qwen2ForCausalLM", tmp_path / "base"))
    with pytest.raises(UserError, match=r"no chat template .*-P chat_template=") as refused:
        settle_chat_template(base, "", "", {})
    assert "\n" not in str(refused.value)


def test_a_given_template_renders_the_same_prompt_ids_in_both_models(checkpoints, fp32_builds):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints[GIVEN])
    pipeline_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    _, onnx_tokenizer = load(fp32_builds[GIVEN])
    assert chat_prompt_ids(onnx_tokenizer, MESSAGES).tolist() == list(pipeline_ids)
    assert tokenizer.decode(pipeline_ids).startswith("<start_of_turn>user\n")


def test_a_window_that_no_layer_applies_does_not_size_the_cache(checkpoints, fp32_builds):
    """Phi-3-mini's config has a sliding window that the builder applies to no layer: genai_config
    lists no windowed layer and no attention node has a window. The cache is then sized to the
    request, and a cache shorter than the window answers as transformers does."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmkit.onnx.session import model_tokens

    folder, checkpoint = fp32_builds[PHI3_WINDOW], checkpoints[PHI3_WINDOW]
    window = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["sliding_window"]
    assert (window["window_size"], window["layers"]) == (256, [])
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    windows = {attribute.i for node in graph.node if node.op_type == "GroupQueryAttention"
               for attribute in node.attribute if attribute.name == "local_window_size"}  # fmt: skip
    assert windows == {-1}
    tokens_of = model_tokens(folder)
    assert tokens_of.min_cache_length == 0
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = reference.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    model, onnx_tokenizer = load(folder)
    tokens, prompt_length = bare_greedy(model, onnx_tokenizer, MESSAGES, 4, tokens_of)
    assert tokens_of.max_length(prompt_length + 4) == prompt_length + 4 < 256
    assert tokens == expected[0, prompt_length:].tolist()


def test_a_short_request_to_a_model_whose_window_is_longer_answers_in_both_loops(checkpoints, fp32_builds, tmp_path):
    """The generator's cache is sized to the sliding window, and each answer stops at its own
    length: the bare loop and the wrapper's batched decoder give transformers' first tokens."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmkit.models.onnx_wrapper import seal_onnx_folder, wrapper_model_arguments
    from slmkit.onnx.session import model_tokens

    folder, checkpoint = fp32_builds[WIDE_WINDOW], checkpoints[WIDE_WINDOW]
    assert model_tokens(folder).min_cache_length >= 48
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = reference.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)[
        0, inputs["input_ids"].shape[1] :
    ]
    model, onnx_tokenizer = load(folder)
    tokens, _ = bare_greedy(model, onnx_tokenizer, MESSAGES, 4, model_tokens(folder))
    assert tokens == expected.tolist()
    seal_onnx_folder(folder, "test-build:gemma3", "test")
    mlflow.pyfunc.save_model(
        str(tmp_path / "wrapper"), **wrapper_model_arguments(folder, "gemma3", {"do_sample": False}, tracing=False)
    )
    answer = mlflow.pyfunc.load_model(str(tmp_path / "wrapper")).predict({"messages": MESSAGES, "max_tokens": 4})[0]
    assert answer["usage"]["completion_tokens"] == 4
    assert answer["choices"][0]["message"]["content"] == tokenizer.decode(expected)
