"""`itmatch compare`: configs x seeds on one budget; Student-t intervals and paired bootstrap differences.

runs.py trains, resumes and evaluates the runs (with their caches), stats.py holds the statistics,
report.py writes compare.md / compare.json / compare.png, command.py ties them to the command line.
"""
