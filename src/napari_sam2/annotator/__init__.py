"""The interactive annotator behind the napari widget, free of Qt (and unit-tested without a viewer).

- :mod:`.stack_view`: which image is segmented and how its video maps into the layers;
- :mod:`.layer_prompts`: the prompts in the Points / Shapes layers and painted masks, and what changed;
- :mod:`.tasks`: the one background worker that runs all heavy work in order, cancellable;
- :mod:`.engine`: :class:`Annotator`, the session (model, predictor state, prompts applied, results);
- :mod:`.objects`: the rows of the object list;
- :mod:`.finetuning`: fine-tuning on the corrected masklets (:meth:`Annotator.train`).
"""

from .choices import AnnotatorError, LineageOptions, ModelChoice
from .engine import Annotator, AnnotatorListener
from .layer_prompts import FramePrompt, collect_prompts, diff_prompts
from .objects import ObjectInfo
from .stack_view import StackView
from .tasks import Cancelled, Task, TaskQueue

__all__ = ["Annotator", "AnnotatorError", "AnnotatorListener", "Cancelled", "FramePrompt", "LineageOptions",
           "ModelChoice", "ObjectInfo", "StackView", "Task", "TaskQueue", "collect_prompts", "diff_prompts"]
