"""Reporting: paper reference numbers, claims tables, figures, notebook runner support."""
