"""Helpers for scripts/make_golden.py (runs in .golden-venv, never imported by jlora)."""
