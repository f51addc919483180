"""The ONNX model: the builder's build, the GGUF carry-over, and the
onnxruntime-genai session, greedy loop and batched decoder the wrapper runs on.
"""
