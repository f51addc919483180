"""The chat contract both models speak, and the in-process adapters that load either model behind it.

`contract` parses and checks requests and shapes answers (OpenAI's chat completion); `adapters`
loads a logged model (`load_chat_model`) so the server, the evaluation and batch inference all
answer through the same checks; `model_config` names the keys the loaders and the logged models share.
"""
