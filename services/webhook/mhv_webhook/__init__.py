"""The webhook gateway: verified HTTPS ingest, replay protection, durable saga processing."""
