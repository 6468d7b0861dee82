"""The engine: the only package of Pastiche that imports torch.

``stylize`` paints one image; everything below it (backbones, weights, losses, colour, and the
CPU speed work in ``core.engine.cpu``) is the engine's own business. Front ends reach it through
the job runner's worker processes or, in the CLI, directly.
"""

from core.engine.run import Engine, stylize

__all__ = ["Engine", "stylize"]
