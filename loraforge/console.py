"""Where loraforge talks to people: one rich console, and the libraries kept quiet beside it.

Piped into a file or a CI log, rich would wrap every line at 80 columns mid-sentence; there a line is written
whole. transformers and huggingface_hub draw their own progress bars ("Converting and de-quantizing GGUF
tensors", "Loading weights", …) and print deprecation notices that a user of loraforge cannot act on; the CLI
turns them off unless --debug.
"""

from __future__ import annotations

import logging
import sys
import warnings

from rich.console import Console

# Wide enough for a table of metrics or a log line; rich tables take only the width their cells need.
LOG_WIDTH = 200


def make_console(file=None) -> Console:
    """A terminal gets rich's usual console; anything else (a file, a pipe, a CI log) whole lines."""
    stream = file or sys.stdout
    if stream.isatty():
        return Console(file=file)
    return Console(file=file, width=LOG_WIDTH, soft_wrap=True)


def quiet_libraries() -> None:
    """No progress bars, info logs or deprecation notices from the libraries loraforge drives."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    for category in (FutureWarning, DeprecationWarning):
        for library in ("transformers", "torch", "bitsandbytes", "huggingface_hub", "accelerate"):
            warnings.filterwarnings("ignore", category=category, module=rf"{library}(\.|$)")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
