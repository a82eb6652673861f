"""``nexus-jax`` console script: dispatches sub-commands to their modules (imported lazily)."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "main": ("nexus_jax.main_job", "run the main job on the embedded default checkpoint"),
    "generate": ("nexus_jax.text_generation_cli", "generate text with a Qwen2.5 text decoder"),
    "convert": ("conversion.cli", "convert checkpoints between PyTorch and JAX/Orbax"),
    "infer": ("nexus_jax.inference.cli", "batch inference over a requests JSONL"),
    "train": ("nexus_jax.training.cli", "train the AR model or a decoder"),
    "plan": ("launch.plan", "ahead-of-time 'does it fit' planning for TPU topologies"),
    "launch": ("launch.launcher", "print or run Cloud TPU launch commands"),
}

# Optional modules -> the extra that installs them (named in the error when a command needs one that is missing).
EXTRAS = {"torch": "torch"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: nexus-jax [--version] <command> [args]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n'nexus-jax <command> --help' describes a command.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from nexus_jax import __version__

        print(f"nexus-jax {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(_usage())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    except ModuleNotFoundError as exc:
        if exc.name not in EXTRAS:
            raise
        print(f"error: nexus-jax {argv[0]} needs {exc.name!r}, which is not installed: "
              f"pip install 'nexus-jax[{EXTRAS[exc.name]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
