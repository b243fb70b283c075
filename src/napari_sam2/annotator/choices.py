"""What a session is asked to run (the model, the lineage options) and the error a user can fix."""

from __future__ import annotations

from dataclasses import dataclass

from ..lineage import LOST_AFTER


class AnnotatorError(Exception):
    """Something the user can fix; the message says what and how."""


@dataclass(frozen=True)
class ModelChoice:
    """The network a session runs: registry name, checkpoint (None: official weights), device, size, precision."""

    model: str
    checkpoint: str | None = None
    device: str = "auto"
    image_size: int = 1024
    precision: str = "auto"


@dataclass(frozen=True)
class LineageOptions:
    """Cells entering the field (looked for every ``new_every`` frames) and divisions while propagating forward;
    a cell without a pixel on ``lost_after`` consecutive frames has left (None: never)."""

    new_every: int | None = None
    divisions: bool = False
    lost_after: int | None = LOST_AFTER

    @property
    def on(self) -> bool:
        return bool(self.new_every) or self.divisions
