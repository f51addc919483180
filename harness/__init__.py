"""Helpers that only the tests and the bench import: starting local servers, the Phi-3 template.

They sit outside `slmkit/` because nothing that `make run` runs, and no logged model, needs them.
"""
