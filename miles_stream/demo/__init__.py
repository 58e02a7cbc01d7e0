"""`miles-stream demo`: a whole run on one machine, on CPU, with live progress, a plot and a summary."""

from miles_stream.demo.runner import DemoOptions, run_demo

__all__ = ["DemoOptions", "run_demo"]
