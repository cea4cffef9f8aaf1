"""Entry point: ``python -m mhv_webhook``."""

from mhv_webhook.app import main

if __name__ == "__main__":
    main()
