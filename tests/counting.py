"""A dynamo backend for tests: it runs the traced graph as it is and counts graphs compiled and graph runs.
Imported only as ``tests.counting``, so it registers once."""

from __future__ import annotations

from torch._dynamo.backends.registry import list_backends, register_backend

NAME = "flux_test_counting"


class CountingBackend:
    def __init__(self):
        self.graphs = 0
        self.runs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1

        def run(*args):
            self.runs += 1
            return graph_module.forward(*args)

        return run


COUNTING = CountingBackend()
if NAME not in list_backends(exclude_tags=()):
    register_backend(compiler_fn=COUNTING, name=NAME)
