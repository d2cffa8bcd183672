"""Run reports: plots (`plots`), summary.json helpers (`summary`), phase timing and throughput (`timing`).

Nothing is imported here, so `xraycls.report.summary` can be used without loading matplotlib.
"""
