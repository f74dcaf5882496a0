"""Recursive Language Models as two Knative functions: `functions.infer` and `functions.execute`."""
