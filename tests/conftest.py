"""Test session set-up: a non-interactive matplotlib backend and quiet progress bars."""
import os

os.environ.setdefault("MPLBACKEND", "agg")
os.environ.setdefault("REPLICATION_QUIET", "1")
