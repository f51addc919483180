"""`python -m slmkit.serve -m <model URI>`: serve either chat model with an OpenAI route.

The command lives in `slmkit.serving.cli`; this module is its name on the command line.
"""

from slmkit.serving.cli import run

if __name__ == "__main__":
    run()
