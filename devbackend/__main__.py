"""`python -m devbackend --model PATH | --simulate [...]`; see docs/devbackend.md."""

import asyncio
import logging

from .config import parse_args
from .runner import serve


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(parse_args()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
