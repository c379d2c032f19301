"""Training, written once over the backend facade (docs/ARCHITECTURE.md, "The training seam").

`losses.py` holds the objectives; each backend's `value_and_grad` differentiates them with its own autograd.
"""
