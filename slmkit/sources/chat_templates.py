"""The chat template both logged models render prompts with, settled once, in `download`.

A checkpoint keeps its own template unless the `chat_template` param names one: a Jinja file, or
a preset whose template to take (config/presets.yaml's `chat_template`, a file under config/). A
checkpoint without one takes its preset's, if the preset declares one (a base model's turn format);
with none at all `download` refuses it in one line, instead of logging a model that fails every
request. The template is written into the checkpoint's tokenizer files, where transformers reads it
for the pipeline and the builder copies it for onnxruntime-genai, so both render the same ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def template_path(value: str, presets: dict[str, dict[str, Any]]) -> Path | None:
    """The Jinja file the `chat_template` param names: a preset's template, or a path (relative
    paths from the project folder); None for an empty value.

    Raises:
        UserError: the preset declares no template, or the file does not exist.
    """
    if not value:
        return None
    if value in presets:
        declared = presets[value].get("chat_template")
        if not declared:
            raise UserError(f"chat_template={value!r}: that preset declares no chat template")
        value = declared
    path = Path(value).expanduser()
    path = path if path.is_absolute() else PROJECT_ROOT / path
    if not path.is_file():
        raise UserError(f"chat_template={value!r}: no such Jinja file (or preset with a chat_template)")
    return path


def template_digest(value: str, presets: dict[str, dict[str, Any]]) -> str:
    """What identifies the named template's content for the step cache ("" for none)."""
    path = template_path(value, presets)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else ""


def has_chat_template(checkpoint: Path) -> bool:
    if (checkpoint / TEMPLATE_FILE).is_file():
        return True
    config = checkpoint / TOKENIZER_CONFIG
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def write_chat_template(checkpoint: Path, template: str) -> None:
    """Put `template` where both transformers and onnxruntime-genai read it, replacing any other."""
    (checkpoint / TEMPLATE_FILE).write_text(template)
    config_path = checkpoint / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config_path.write_text(json.dumps({**config, "chat_template": template}, indent=2))


def settle_chat_template(checkpoint: Path, value: str, preset_template: str, presets: dict[str, dict[str, Any]]) -> str:
    """Leave `checkpoint` with the chat template its models will use; return where it came from.

    Raises:
        UserError: no template anywhere: one line naming the parameter.
    """
    named = template_path(value, presets)
    if named is None and not has_chat_template(checkpoint) and preset_template:
        named = template_path(preset_template, presets)
    if named is not None:
        write_chat_template(checkpoint, named.read_text())
        return str(named.relative_to(PROJECT_ROOT) if named.is_relative_to(PROJECT_ROOT) else named)
    if not has_chat_template(checkpoint):
        raise UserError(
            "the checkpoint has no chat template (a base model?): pass -P chat_template=<a Jinja file, "
            "or a preset whose template to use>"
        )
    return "checkpoint"
