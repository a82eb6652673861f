"""Temporary main job: a tiny random Qwen2.5 model generates text from a prompt; the result goes to outputs/.

Writes ``<output-dir>/text_generation.json`` atomically (temporary file + rename). Run ``python -m nexus_jax.main_job``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

DEFAULT_PROMPT = "Generate an image according to the following description: a red fox in the snow."


def write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON to ``path`` via a temporary file in the same directory and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nexus-jax main", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs")
    args = p.parse_args(argv)

    from configs.qwen2_5 import tiny
    from nexus_jax.text_generation_cli import ByteTokenizer, run

    config = tiny()
    tokenizer = ByteTokenizer()
    start = time.perf_counter()
    [result] = run(config, [tokenizer.encode(args.prompt)], max_new_tokens=args.max_new_tokens, seed=args.seed,
                   tokenizer=tokenizer)
    payload = {
        "job": "text_generation",
        "model": "tiny random Qwen2.5 text decoder (weights are random: the text is noise)",
        "config": {k: v for k, v in vars(config).items()},
        "seed": args.seed,
        "prompt": args.prompt,
        **result,
        "seconds": round(time.perf_counter() - start, 3),
    }
    path = os.path.join(args.output_dir, "text_generation.json")
    write_json_atomic(path, payload)
    print(f"wrote {path}: {len(result['generated_ids'])} tokens generated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
