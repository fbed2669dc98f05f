"""`flashtile bench`: flashtile beside the other attention kernels on one GPU, in one run.

providers.py wraps each implementation behind the same factory signature, measure.py checks
and times one of them on one problem, report.py writes the tables, JSON and plot, and run.py
is the command line that walks the grid of problems. features.py, decode.py and varlen.py are
the presets of issues 4 and 5, each with its cases, providers and report; tables.py holds what
their reports share.
"""
