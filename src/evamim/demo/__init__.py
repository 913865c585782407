"""``evamim demo``: the EVA pipeline end to end on synthetic scenes, on a CPU, with a report.

``plan`` (the stages and their settings), ``stages`` (running or reusing each one), ``report`` (numbers,
report.md, results.json), ``figures`` (the PNGs), ``command`` (the CLI).
"""
