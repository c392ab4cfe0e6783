"""Reproducing a release: replay recorded steps and compare the bytes."""
