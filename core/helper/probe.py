"""Report the device and weights the helper's workers will use, as one line of JSON.

Run as ``python -m core.helper.probe '<settings json>'`` by the helper at start-up, so the
helper's own process (the event loop the GIMP plug-in talks to) never has to import torch.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from core.errors import PasticheError
from core.settings import Settings


def probe(settings: Settings) -> dict[str, Any]:
    """Device and weights for ``settings``; never downloads."""
    from core.engine.device import pick_device

    try:  # the engine's own choice, so the probe reports what the workers will use
        device = str(pick_device(settings.device))
    except PasticheError:  # the workers will report it with the job; the weights still matter
        device = settings.device
    info: dict[str, Any] = {"device": device, "backbone": settings.backbone}
    if settings.backbone == "random":
        info.update(weights_present=True, weights_path=None, weights_message="Random weights.")
        return info
    from core.engine import weights

    try:
        path = weights.resolve(settings.backbone, settings.weights, download=False, progress=False)
    except PasticheError as exc:
        info.update(weights_present=False, weights_path=None, weights_message=str(exc))
    else:
        info.update(weights_present=True, weights_path=str(path), weights_message="")
    return info


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    settings = Settings.from_dict(json.loads(args[0]) if args else {})
    print(json.dumps(probe(settings)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
