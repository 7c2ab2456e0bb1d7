"""Kept for old command lines: the sweep report is `python -m a2v_flower.sweep_report <folder>` (a2v_flower/sweep_report.py)."""
from a2v_flower.sweep_report import main

if __name__ == "__main__":
    main()
