"""Training, written once over the backend facade (docs/ARCHITECTURE.md, "The training seam").

`loop.train` runs a stage (`stages.py`: what it trains, its batch, its loss over `losses.py`) on any backend,
with `optim.py` (AdamW settings, schedules, EMA), `checkpoint.py` and the data of `data.py` / `shapes.py`.
"""
