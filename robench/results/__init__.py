"""Results: the parquet schema and run folders (the only code that writes them),
sanity flags, regression checks and reports.
"""
