"""Disaster-recovery drills on real processes: ``scripts/test-dr.py`` runs `bench.dr.drill`.

`site` builds the system under test (a private primary streaming its WAL synchronously into a
backup repository, the three services), `ledger` drives load and records every acknowledged
write, `drill` runs the scenarios and prints their figures.
"""
