"""The `mxtools` command line: one short function per verb (build.py: convert, quantize, imatrix, synth, example;
check.py: verify, compare, inspect). Exit codes and the one-line errors: exits.py. Importing it loads neither
torch nor the C extension, so `mxtools --help` answers at once; each verb imports what it needs when it runs."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mxtools")
def main():
    """Convert, quantize and verify Mixtral-8x7B checkpoints (HF, Mistral, GGUF).

    Exit codes: 0 success, 1 a verification verdict failed, 2 bad input or usage, 3 an internal error."""


from . import build, check  # noqa: F401  (the verbs register themselves on `main`)
