"""`python -m devbackend --model PATH | --simulate [...]`; see docs/devbackend.md."""

import asyncio
import logging
import os

# The backend serves a local model folder and loads adapters from local folders: never the Hugging Face Hub (set before
# transformers and huggingface_hub are imported: they read these once; docs/configuration.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .config import parse_args  # noqa: E402
from .runner import serve  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(parse_args()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
