"""Entry point: ``python -m mhv_task``."""

from mhv_task.app import main

if __name__ == "__main__":
    main()
