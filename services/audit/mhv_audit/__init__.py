"""The audit service: append-only, hash-chained log of every task change."""
