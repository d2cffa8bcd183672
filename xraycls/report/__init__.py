"""Reports drawn from finished runs: a run's plots (`plots`) and the cost study (`cost`).

Nothing is imported here, so importing one sub-module does not load the others.
"""
