"""The dense-labeling benchmark: tasks, training loops, protocol and summaries.

Imports matplotlib only when plotting and scikit-learn only for the digits task.
"""

from .protocol import (
    DISTILL_SETTINGS,
    PROFILES,
    NotApplicable,
    Profile,
    criterion_analysis,
    distill_config,
    run_benchmark,
    run_one,
)
from .summary import (
    aggregate,
    distill_gaps,
    distill_markdown,
    markdown,
    merge_results,
    plot_accuracy_vs_macs,
    plot_distill,
    write_summary,
)
from .tasks import TASKS, Task, get_task
from .training import make_loader, train

__all__ = [
    "DISTILL_SETTINGS",
    "NotApplicable",
    "PROFILES",
    "Profile",
    "TASKS",
    "Task",
    "aggregate",
    "criterion_analysis",
    "distill_config",
    "distill_gaps",
    "distill_markdown",
    "get_task",
    "make_loader",
    "markdown",
    "merge_results",
    "plot_accuracy_vs_macs",
    "plot_distill",
    "run_benchmark",
    "run_one",
    "train",
    "write_summary",
]
