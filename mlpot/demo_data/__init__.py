"""Embedded demo data (see README.md here)."""
