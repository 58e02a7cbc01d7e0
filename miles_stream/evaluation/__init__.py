"""Evaluation while training runs: `miles-stream eval` follows `{ns}:weights` and scores versions on a held-out
set (docs/evaluation.md). Imports nothing here: `config` is a section of the run config and loads without
torch; the evaluator (`evaluator.py`) pulls in the engines."""
