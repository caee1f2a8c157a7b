"""The `pa-jax` command line: one subcommand per application.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so `pa-jax --help` stays fast. Bad input
(``ValueError``, including ``pa_jax.data.DataError``, or ``OSError``) ends with one line on stderr naming
the file, field or tensor, and exit status 2; set ``PA_JAX_TRACEBACK=1`` for the full traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pa_jax.demo", "Proposition 1 and the three applications on the shipped toy LLM pair"),
    "score": ("pa_jax.commands.score", "per-step and per-trajectory scores as JSON lines"),
    "uq": ("pa_jax.commands.uq", "uncertainty quantification: AUROC/Spearman/calibration of trajectory scores"),
    "bon": ("pa_jax.commands.bon", "best-of-N selection by trajectory score"),
    "fa": ("pa_jax.commands.fa", "failure attribution: which step was the decisive error"),
}


def offline() -> None:
    """No network, ever: the Hugging Face libraries read local files only (checkpoints and tokenizers are
    local paths; pa_jax.commands.preflight refuses anything else before it could be taken for a hub id)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and hasattr(hub, "HF_HUB_OFFLINE"):  # already imported: its flag was read at import
        hub.HF_HUB_OFFLINE = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    offline()
    parser = argparse.ArgumentParser(prog="pa-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        if name in argv[:1]:
            importlib.import_module(module).add_arguments(sp)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        module = importlib.import_module(args._module)
        if getattr(args, "reference_merge", None):  # one run against many merged references
            from pa_jax.commands import _merge

            return int(_merge.sweep(args, module, args.command) or 0)
        return int(module.run(args) or 0)
    except (ValueError, OSError) as e:  # bad input (DataError is a ValueError): one clear line, no traceback
        if os.environ.get("PA_JAX_TRACEBACK"):
            raise
        print(f"pa-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
