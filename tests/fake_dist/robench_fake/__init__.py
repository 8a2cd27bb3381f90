"""A fake third-party robench plugin package (installed via tests/fake_dist on pythonpath).

Its entry points live in the ``robench-test`` group, so normal robench runs never see them.
"""
