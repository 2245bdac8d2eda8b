"""
Runtime utilities of the frozen harness, imported by train.py: which device, which precision, how to wait for the
device, how much memory a run peaked at, the device's peak FLOP/s, and a default causal attention.
train.py stays free to replace any of them; the agent may read this file, never change it.
"""

import torch


def detect_device():
    """cuda, mps or cpu: the best device this machine has."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
