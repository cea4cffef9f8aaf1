#!/usr/bin/env python3
"""Restore the latest backup into a scratch cluster, check it, print a JSON report.

    .venv/bin/python scripts/verify-backups.py [--home DIR] [--server NAME] [--anchors FILE]
                                               [--json-out FILE]

Exits 0 when every check passed, 1 otherwise (MHV-055). The checks: page checksums, every
B-tree index (pg_amcheck), row counts against the source at backup time, foreign keys, the
audit chain end to end with the audit service's verifier, the anchors kept outside the
database, and outbox/audit consistency; see libs/cli/mhv_cli/verify.py and
docs/dr/backups.md. Run it daily, after the backup (a cron job or Kubernetes CronJob).
"""

from mhv_cli.verify import main

if __name__ == "__main__":
    raise SystemExit(main())
