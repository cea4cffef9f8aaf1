"""Entry point: ``python -m mhv_audit``."""

from mhv_audit.app import main

if __name__ == "__main__":
    main()
