"""Benchmark tasks for delta tuning: GLUE, SentEval-style and topic sets, read from the shared data folder.

`get_task(name)` loads a task's full splits, `get_task(name, kshot_seed=13)` LM-BFF's 16-shot split; `data_dir()`
says where the data is found (or how to point elsewhere); `templated(task, blank)` reads a task through LM-BFF's
manual template.
"""

from deltactl.tasks.data import Example, data_dir
from deltactl.tasks.registry import KSHOT_SEEDS, TASK_NAMES, get_task
from deltactl.tasks.task import MissingSplitError, Task
from deltactl.tasks.templates import TEMPLATES, templated

__all__ = ["KSHOT_SEEDS", "TASK_NAMES", "TEMPLATES", "Example", "MissingSplitError", "Task", "data_dir", "get_task",
           "templated"]
