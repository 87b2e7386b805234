"""Methods that find circuits on PGB-CT's objective, one module each, and their registry
(`jaxtrace.engine.methods.registry`: `Method`, `MethodContext`, `MethodResult`, `register`).

A new method is one more module here (its `run(objective, context) -> MethodResult` and its `register(Method(...))`
line) and one more import below; the order of the imports is the order `compare` runs the methods in (the report's
tables follow `Method.report_order`) and of `baseline --method`'s choices.
"""

from jaxtrace.engine.methods import pgbct  # noqa: F401  (each import registers its method)
from jaxtrace.engine.methods import pgbct_budgets  # noqa: F401
from jaxtrace.engine.methods import single  # noqa: F401
from jaxtrace.engine.methods import topk  # noqa: F401
from jaxtrace.engine.methods import greedy  # noqa: F401
from jaxtrace.engine.methods import random  # noqa: F401
from jaxtrace.engine.methods import exhaustive  # noqa: F401
from jaxtrace.engine.methods import atp  # noqa: F401
from jaxtrace.engine.methods import ig  # noqa: F401
from jaxtrace.engine.methods.registry import (
    METHODS,
    Method,
    MethodContext,
    MethodResult,
    Progress,
    baseline_methods,
    compare_methods,
    method_of,
    rankings_of,
    register,
    registered,
    report_order,
    run_method,
    top_circuits,
    unregister,
)

__all__ = ["METHODS", "Method", "MethodContext", "MethodResult", "Progress", "baseline_methods", "compare_methods",
           "method_of", "rankings_of", "register", "registered", "report_order", "run_method", "top_circuits",
           "unregister"]
