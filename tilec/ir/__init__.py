"""tilec's IR: op level (`graph`), tile level (`tasks`), schedule level (`schedule`).

Everything here is a frozen dataclass: passes build new objects, nothing mutates.
"""
from tilec.ir.graph import Graph, Op, Operand, TensorType, Group, FusedGraph
from tilec.ir.tasks import Buffer, Region, Task, TaskGraph
from tilec.ir.schedule import Event, Wait, Schedule
from tilec.ir.target import Target, TARGETS

__all__ = [
    "Graph", "Op", "Operand", "TensorType", "Group", "FusedGraph",
    "Buffer", "Region", "Task", "TaskGraph",
    "Event", "Wait", "Schedule", "Target", "TARGETS",
]
