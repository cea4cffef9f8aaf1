"""The task service: users, tasks, their lifecycle, search, and the audit outbox."""
